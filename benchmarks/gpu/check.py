"""One command that validates a lent GPU (check.sh beside it runs this; `bash scripts/gpu-check.sh` is the entry
point): does qilin-lite do on it what the CPU tests say it would?

    bash scripts/gpu-check.sh                                   # on the GPU machine; results in $OUT or gpu-check-out/
    python -m benchmarks.gpu.check --toy --demo-dir D --out O   # toy sizes on any device (the test suite)

Checks, in order, each recorded as ok / failed / skipped with what it measured:
1. environment: torch, the CUDA device, bf16, flash-attn, bitsandbytes;
2. demo: `qilin-lite demo` end to end on this device (held-out accuracy before / after tuning, where training ran);
3. placement, for real: chat (ChatSession), eval (model_generate) and web (WebApp) load the demo's tuned model
   through the one loader and answer; where the weights and the inputs went, their dtype and the attention kernel,
   against what device.placement() promises for this machine (tests/test_placement.py checks the same on a fake);
4. training: qlora_lora_steps.py's QLoRA (bitsandbytes' CUDA kernels) and LoRA steps at the paper's 13B shapes;
5. planner: `qilin-lite plan`'s estimate against torch.cuda.max_memory_allocated for QLoRA at 1B, 3B and 13B.
6. packing: benchmarks/packed_vs_unpacked.py in random order on a 2048-wide, 8-layer LLM in bf16: unpacked,
   `--packing` as shipped, rows of 2048 (per-sample sdpa, and flash-attention 2's varlen kernel where installed),
   samples/s ratios.
7. native, native-qwen3-vl, native-gemma3: a Qwen2.5-VL, a Qwen3-VL and a Gemma 3 built from config each train
   `tune --lora` on 64-1024 px images in bf16 with the attention "auto" picks (flash-attention 2 where installed),
   answer through chat's loader; flash-attention's logits against sdpa's on one batch (benchmarks/gpu/native.py).
Writes gpu-check.json (everything) and gpu-check.md (the tables for the README). A time budget (default 540 s of
the 10 minutes a lent machine runs one command) skips what would not finish; the exit code is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def environment() -> dict:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    found = {"torch": torch.__version__, "cuda": cuda,
             "device": torch.cuda.get_device_name(0) if cuda else "cpu",
             "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
             "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded: a missing wheel is what this check is for
            found[name] = f"missing ({type(e).__name__})"
    return found


def demo(work: Path, demo_dir: Path | None) -> dict:
    """The bundled demo end to end (or an existing demo output directory, at toy size)."""
    out = demo_dir or work / "demo"
    if demo_dir is None:
        r = subprocess.run([sys.executable, "-m", "qilin_lite", "demo", "--out", str(out)], capture_output=True,
                           text=True, env={**_env(), "QILIN_LOG": "WARNING"}, timeout=480)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1][:300])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    summary = json.loads((out / "tune" / "train_summary.json").read_text(encoding="utf-8"))
    return {"dir": str(out), "accuracy_before": metrics.get("accuracy_before"),
            "accuracy_after": metrics.get("accuracy_after"), "tune_seconds": summary.get("seconds"),
            "ok": metrics.get("accuracy_after", 0) >= 0.9}


def placement(run_dir: Path, data_dir: Path) -> dict:
    """Load the tuned demo model as chat, eval and web do, answer once each, and record where everything went."""
    import base64
    import functools

    import torch
    from transformers import LlavaForConditionalGeneration

    from qilin_lite.device import placement as promised
    from qilin_lite.eval.benchmarks import load_eval_items
    from qilin_lite.eval.run import model_generate
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.chat_session import ChatSession
    from qilin_lite.serve.web_app import WebApp

    seen: dict = {}
    real_forward = LlavaForConditionalGeneration.forward

    @functools.wraps(real_forward)  # generate() checks its arguments against forward's signature
    def recording(self, *args, **kwargs):  # what reaches the model, and where its weights are
        p = next(self.parameters())
        ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
        seen.setdefault("first", {
            "weights": p.device.type, "dtype": str(p.dtype).replace("torch.", ""),
            "attn": self.config._attn_implementation,
            "inputs": ids.device.type if ids is not None else None,
            "pixels": (pixels.device.type, str(pixels.dtype).replace("torch.", "")) if pixels is not None else None})
        return real_forward(self, *args, **kwargs)

    want = promised()
    expected = {"weights": want.device, "dtype": want.dtype, "attn": want.attn, "inputs": want.device}
    items = load_eval_items(data_dir / "heldout.json", "llava", data_dir / "images")[:4]
    results = {"expected": expected}
    LlavaForConditionalGeneration.forward = recording
    try:
        for command in ("chat", "eval", "web"):
            seen.clear()
            t = time.perf_counter()
            if command == "chat":
                session = ChatSession.load(str(run_dir), temperature=0, max_new_tokens=8)
                session.load_image([items[0].image])
                answer = session.ask(items[0].question)
            elif command == "eval":
                answer = model_generate(str(run_dir), max_new_tokens=8, batch_size=4)(items)[0]
            else:
                generator, info = load_generator(str(run_dir), temperature=0, max_new_tokens=8)  # as `web` loads
                app = WebApp(generator, info, str(run_dir))
                image = Path(items[0].image)
                sid = app.new_session()
                app.set_image(sid, [{"name": image.name, "data": base64.b64encode(image.read_bytes()).decode()}])
                events = list(app.ask(sid, items[0].question, {}))
                answer = next((e["answer"] for e in events if e.get("done")), events[-1] if events else None)
            found = dict(seen.get("first", {}))
            found["seconds"] = round(time.perf_counter() - t, 2)
            found["answer"] = answer
            found["ok"] = all(found.get(k) == v for k, v in expected.items()) and (
                found.get("pixels") is None or found["pixels"][0] == want.device)
            results[command] = found
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    finally:
        LlavaForConditionalGeneration.forward = real_forward
    results["ok"] = all(results[c]["ok"] for c in ("chat", "eval", "web"))
    return results


def training(sizes: list[str], modes: list[str], steps: int) -> list[dict]:
    """qlora_lora_steps.py's rows (a fresh process per case), at each size."""
    from benchmarks.gpu import qlora_lora_steps as qlora_lora

    rows = []
    for size in sizes:
        attn = qlora_lora.available_attention()[-1:]  # flash-attention 2 where installed, else sdpa: what "auto" picks
        rows += qlora_lora.main(["--size", size, "--modes", *modes, "--steps", str(steps), "--attn", *attn])
    return rows


def packing_case(toy: bool) -> dict:
    """benchmarks/packed_vs_unpacked.py on this GPU, random order (where padding is left to remove): unpacked,
    `--packing` as shipped, rows of max_length, and those rows with the batch in tokens, for sdpa (packed rows:
    FlexAttention's document mask) and flash-attention 2 where installed (its variable-length kernel). ok: every
    run trained, packed rows never attended across samples (the attention they trained with), and `--packing` as
    shipped no slower than unpacked beyond the run-to-run noise (0.9x)."""
    from benchmarks import packed_vs_unpacked as packing
    from benchmarks.gpu import qlora_lora_steps as qlora_lora

    size = ["--records", "32", "--hidden", "64", "--layers", "1"] if toy else \
        ["--records", "480", "--hidden", "2048", "--layers", "8", "--dtype", "bfloat16"]
    rows = packing.main(["--rounds", "1", "--orders", "random", "--attn", *qlora_lora.available_attention(), *size])
    per_sample = {"flex_attention", "qilin_segments", "flash_attention_2"}
    ok = all(x["attention"] in per_sample for k, x in rows.items() if "packed-max" in k) and all(
        x["vs_unpacked"] >= 0.9 or toy for k, x in rows.items() if k.endswith("packed-auto"))
    return {"ok": ok, "table": packing.table(rows), "rows": rows}


def native_case(work: Path, toy: bool, family: str = "qwen2.5-vl") -> dict:
    from benchmarks.gpu.native import native_case as run

    return run(work, toy, family)


def markdown(report: dict) -> str:
    from benchmarks.gpu import qlora_lora_steps as qlora_lora

    env = report["checks"].get("environment", {}).get("result", {})
    lines = [f"GPU check: {env.get('device', '?')}, torch {env.get('torch', '?')}, transformers "
             f"{env.get('transformers', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}, flash-attn "
             f"{'yes' if env.get('flash_attn') else 'no'} ({report['seconds']:.0f} s)", "",
             "| check | status | what was measured |", "|---|---|---|"]
    for name, c in report["checks"].items():
        lines.append(f"| {name} | {c['status']} | {_short(name, c)} |")
    rows = [r for name in ("training", "planner") for r in report["checks"].get(name, {}).get("result", []) or []]
    if rows:
        lines += ["", qlora_lora.table(rows, report["peak_tflops"])]
    packed = report["checks"].get("packing", {}).get("result")
    if packed:
        lines += ["", "Packing (benchmarks/packed_vs_unpacked.py, random order):", "", packed["table"]]
    return "\n".join(lines) + "\n"


def _short(name: str, c: dict) -> str:
    r = c.get("result")
    if c["status"] != "ok" or r is None:
        return c.get("error", "")
    if name == "demo":
        return f"held-out accuracy {r['accuracy_before']} -> {r['accuracy_after']}"
    if name == "packing":
        return ", ".join(f"{k.split('/', 1)[0]} {k.rsplit('/', 1)[1]} {x['vs_unpacked']:.2f}x"
                         for k, x in r["rows"].items() if not k.endswith("unpacked"))
    if name.startswith("native"):
        t = r["trained"]
        return (f"{r['family']} lora, images 64-1024 px: {t['compute_dtype']}, {t['attn']}, loss finite "
                f"{t['loss_finite']}, peak {t['peak_gib']} GiB, flash = sdpa logits {r['flash_vs_sdpa_logits_agree']}")
    if name == "placement":
        return "; ".join(f"{k}: weights {r[k].get('weights')} {r[k].get('dtype')}, inputs {r[k].get('inputs')}, "
                         f"{r[k].get('attn')}" for k in ("chat", "eval", "web"))
    if isinstance(r, list):
        return f"{len(r)} rows below"
    return ", ".join(f"{k} {v}" for k, v in r.items() if k in ("device", "bf16", "flash_attn"))


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT) + (":" + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else "")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    ap.add_argument("--toy", action="store_true", help="toy sizes on any device (what the test suite runs)")
    ap.add_argument("--demo-dir", type=Path, default=None, help="an existing `qilin-lite demo` output to reuse")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; checks that would start later are skipped")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"checks": {}, "peak_tflops": args.peak_tflops}
    train_sizes, plan_sizes = (["toy"], ["toy-wide", "toy-deep"]) if args.toy else (["13b"], ["1b", "3b"])
    plan = [("environment", environment),
            ("demo", lambda: demo(args.out, args.demo_dir)),
            ("placement", lambda: placement(Path(report["checks"]["demo"]["result"]["dir"]) / "tune",
                                            Path(report["checks"]["demo"]["result"]["dir"]) / "data")),
            ("training", lambda: training(train_sizes, ["qlora", "lora"], 1 if args.toy else 2)),
            # the 13B QLoRA row of "training" is the planner's third size
            ("planner", lambda: training(plan_sizes, ["qlora"], 1)),
            ("packing", lambda: packing_case(args.toy)),
            ("native", lambda: native_case(args.out, args.toy)),
            ("native-qwen3-vl", lambda: native_case(args.out, args.toy, "qwen3-vl")),
            ("native-gemma3", lambda: native_case(args.out, args.toy, "gemma3"))]
    for name, check in plan:
        if time.perf_counter() - start > args.budget:
            report["checks"][name] = {"status": "skipped", "error": f"time budget of {args.budget:.0f} s spent"}
            continue
        t = time.perf_counter()
        try:
            result = check()
            failed = (isinstance(result, dict) and result.get("ok") is False) or (
                isinstance(result, list) and any("error" in r for r in result))
            report["checks"][name] = {"status": "failed" if failed else "ok", "result": result}
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            report["checks"][name] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        report["checks"][name]["seconds"] = round(time.perf_counter() - t, 1)
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n",
                                             encoding="utf-8")
    text = markdown(report)
    (args.out / "gpu-check.md").write_text(text, encoding="utf-8")
    print(text)
    report["exit"] = 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0
    return report


if __name__ == "__main__":
    sys.exit(main()["exit"])
