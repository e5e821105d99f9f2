"""`eval` throughput: questions per second answered in-process (transformers' generate, batch 8) against the same
questions through servers (`eval --endpoint`), on the same model, with the same scores.

    python benchmarks/eval_throughput.py DEMO_OUT [--rounds 2] [--concurrency 1 4]

DEMO_OUT is a finished `qilin-lite demo` directory; its tuned run answers the 120 held-out questions greedily:
- `generate`: `qilin-lite eval --model DEMO_OUT/tune` (float32, sdpa, batch 8), the in-process path;
- `llama-server`: its f16 GGUF export (`export gguf`) in llama.cpp's server (scripts/llama-server.sh builds it), with
  as many slots as requests in flight, through `eval --endpoint --images-as DEMO_OUT/tune`;
- `transformers serve`: the run merged (`qilin-lite merge`) in transformers' server, through `eval --endpoint`.
Each run is timed as a user meets it, from the command's start to metrics.json (the in-process path loads its model
inside that time; the servers' start-up is printed apart), after one untimed warm-up pass per path, rounds
interleaved; printed: questions/s per round and their median, the ratio to `generate`, accuracy and
the share of answers equal to `generate`'s. JSON in OUT/results.json and benchmarks/results/eval_throughput.json.
At 7B-13B on a GPU the engines' continuous batching is where they gain (vLLM, SGLang); scripts/gpu-check.sh does
not start those engines (they are not qilin-lite dependencies); this benchmark is what runs on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))


def _wait(url: str, proc: subprocess.Popen, log: Path, limit: float = 180) -> float:
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    body = r.read()
                    if b'"loading' not in body:
                        return time.time() - t0
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > limit:
            raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def _answers(out: Path) -> list[str]:
    return [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def run(demo_out: Path, rounds: int, concurrency: list[int], work: Path) -> dict:
    from qilin_lite.eval.run import run_benchmark
    from qilin_lite.export import export_gguf
    from qilin_lite.merge import merge_run

    from tests.conftest import free_port

    run_dir, data = demo_out / "tune", demo_out / "data" / "heldout.json"
    common = dict(image_folder=demo_out / "data" / "images", max_new_tokens=16)
    llama_server = Path(sys.executable).parent / "llama-server"
    gguf = export_gguf(run_dir, work / "gguf", quant="f16")
    merged = merge_run(run_dir, work / "merged")
    servers, setup = {}, {}
    try:
        if llama_server.is_file():
            port, log = free_port(), work / "llama-server.log"
            proc = subprocess.Popen([str(llama_server), "-m", str(gguf.model), "--mmproj", str(gguf.mmproj), "--jinja",
                                     "--host", "127.0.0.1", "--port", str(port), "-c", str(2048 * max(concurrency)),
                                     "-np", str(max(concurrency)), "-t", str(os.cpu_count() or 2)],
                                    stdout=log.open("w"), stderr=subprocess.STDOUT)
            servers["llama-server"] = (proc, f"http://127.0.0.1:{port}", gguf.model.name, str(run_dir))
            setup["llama-server_start_s"] = round(_wait(f"http://127.0.0.1:{port}/health", proc, log), 1)
        port, log = free_port(), work / "transformers-serve.log"
        proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(merged), "--device",
                                 "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        servers["transformers-serve"] = (proc, f"http://127.0.0.1:{port}", str(merged), str(merged))
        setup["transformers-serve_start_s"] = round(_wait(f"http://127.0.0.1:{port}/health", proc, log), 1)

        # one untimed pass of a few questions on every path first: torch's and the servers' first calls are slow
        run_benchmark(data, "llava", work / "warm-generate", model=str(run_dir), dtype="float32", attn="sdpa",
                      limit=8, **common)
        for name, (_, url, model, images_as) in servers.items():
            run_benchmark(data, "llava", work / f"warm-{name}", endpoint=url, served_model=model, images_as=images_as,
                          limit=8, **common)
        times: dict[str, list[float]] = {}
        scores: dict[str, dict] = {}
        for k in range(rounds):
            out = work / f"generate-{k}"
            t0 = time.time()
            m = run_benchmark(data, "llava", out, model=str(run_dir), dtype="float32", attn="sdpa", **common)
            times.setdefault("generate", []).append(time.time() - t0)
            scores["generate"] = {"accuracy": m["groups"]["all"]["accuracy"], "answers": _answers(out)}
            for name, (_, url, model, images_as) in servers.items():
                for c in concurrency:
                    key = f"{name} x{c}"
                    out = work / f"{name}-{c}-{k}"
                    t0 = time.time()
                    m = run_benchmark(data, "llava", out, endpoint=url, served_model=model, images_as=images_as,
                                      concurrency=c, **common)
                    times.setdefault(key, []).append(time.time() - t0)
                    scores[key] = {"accuracy": m["groups"]["all"]["accuracy"], "answers": _answers(out)}
    finally:
        for proc, *_ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    n = len(scores["generate"]["answers"])
    base = statistics.median([n / t for t in times["generate"]])
    rows = {}
    for key, ts in times.items():
        qps = [round(n / t, 1) for t in ts]
        rows[key] = {"questions_per_s": qps, "median": statistics.median(qps),
                     "vs_generate": round(statistics.median([n / t for t in ts]) / base, 2),
                     "accuracy": scores[key]["accuracy"],
                     "same_answers_as_generate": round(sum(a == b for a, b in zip(scores[key]["answers"],
                                                       scores["generate"]["answers"])) / n, 3)}
    return {"questions": n, "rounds": rounds, "setup": setup, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['questions']} questions, {result['rounds']} rounds; start-up (not timed): "
             + ", ".join(f"{k} {v} s" for k, v in result["setup"].items()), "",
             "| answered by | questions/s (rounds) | median | vs generate | accuracy | same answers as generate |",
             "|---|---|---|---|---|---|"]
    for key, r in result["rows"].items():
        lines.append(f"| {key} | {', '.join(map(str, r['questions_per_s']))} | {r['median']} | {r['vs_generate']}x | "
                     f"{r['accuracy']:.3f} | {r['same_answers_as_generate']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", type=Path, nargs="?")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--table", type=Path, help="only print the table of a results.json this script wrote")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text(encoding="utf-8"))))
        return
    if args.demo_out is None:
        ap.error("give a finished demo directory (qilin-lite demo --out DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.demo_out, args.rounds, args.concurrency, Path(tmp))
    print(table(result))
    if not args.no_write:
        (ROOT / "benchmarks" / "results" / "eval_throughput.json").write_text(
            json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
