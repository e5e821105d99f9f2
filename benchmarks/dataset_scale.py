"""ChiMed-VL scale: the time before the first step, the time of a restart, and memory per record across DataLoader
workers, measured at two dataset sizes so the 500k and 1M figures follow from the per-record costs.

    python benchmarks/dataset_scale.py                # 10k and 100k records, ~10 min on 2 CPU cores; writes
                                                      # results/dataset_scale.json
    python benchmarks/dataset_scale.py --sizes 2000   # a quick look

Data: N distinct 224x192 JPEGs and N stage-2 records (Chinese question and answer of ChiMed-VL's median lengths),
a tiny Llava whose LLM has a SentencePiece tokenizer (so the authors' encoding runs, as for LLaMA-2).
- read once: every image decoded by `images.load_image`, one after another, and with a thread per core;
- first start: `train.build_dataset` on a fresh output directory (read, check, decode, tokenize, write the index);
- restart: the same call again (what `--resume` and a rerun do); goal under 30 s at 100k;
- memory: PSS of the whole process tree (main + 4 DataLoader workers, the recipes' count) after 20 batches, for the
  record index and, for comparison, for the same records held as a Python list (the layout before the index).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pss_tree(pid: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                children = open(f"/proc/{p}/task/{t}/children").read().split()
                stack.extend(int(c) for c in children)
        except OSError:
            pass
    return total


def make_data(root: Path, n: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (192, 224, 3), dtype=np.uint8)
    data = root / f"tune-{n}.jsonl"
    q = "该图像显示的病灶位于哪个部位，大小约为多少厘米？"
    a = "病灶位于右肺下叶，大小约为二点三厘米，边界清楚。"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(n):
            name = f"{i:07d}.jpg"
            if not (images / name).exists():
                arr = np.roll(base, i % 224, axis=1)
                Image.fromarray(arr).save(images / name, quality=85)
            f.write(json.dumps({"id": f"r{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}, ensure_ascii=False) + "\n")
    return data, images


def tiny_base(root: Path) -> Path:
    from qilin_lite.families import TEMPLATES
    from qilin_lite.demo.base import TinySpec, build_tiny_base, train_sentencepiece
    from qilin_lite.model import assemble_base

    if (root / "base" / "config.json").exists():
        return root / "base"
    texts = ["该图像显示的病灶位于哪个部位，大小约为多少厘米？", "病灶位于右肺下叶，大小约为二点三厘米，边界清楚。",
             TEMPLATES["vicuna_v1"].system, "USER: ASSISTANT: </s>"] * 20
    vision, llm = build_tiny_base(root / "tiny", texts, [("问题", ["答"])], TinySpec(image_size=64, pretrain_steps=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (llm / f).unlink(missing_ok=True)
    tok = train_sentencepiece(texts, llm, vocab_size=400)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(llm))
    lm.resize_token_embeddings(len(tok))
    lm.save_pretrained(llm)
    return assemble_base(str(vision), str(llm), root / "base", dtype="float32")


def measure(root: Path, n: int, base: Path) -> dict:
    import torch
    from transformers import AutoConfig

    from qilin_lite.config import load_recipe
    from qilin_lite.data.records import read_records
    from qilin_lite.images.decode import load_image
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.train.collator import Collator
    from qilin_lite.train.dataset import VisionTextDataset, as_hf_dataset
    from qilin_lite.train.data import build_dataset

    data, images = make_data(root, n)
    names = [images / f"{i:07d}.jpg" for i in range(n)]
    t = time.perf_counter()
    for p in names:
        load_image(p)
    read_seq = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(load_image, names))
    read_par = time.perf_counter() - t

    tok, ip = load_tokenizer_and_processor(str(base))
    cfg = AutoConfig.from_pretrained(str(base))
    out = root / f"run-{n}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(ROOT / "recipes/qilin-med-vl/tune-qlora.yaml", None, output_dir=str(out), **{
        "data.train": str(data), "data.image_folder": str(images), "model.base": str(base), "data.max_length": 256})
    t = time.perf_counter()
    ds, _ = build_dataset(recipe, tok, ip, cfg, out)
    first = time.perf_counter() - t
    t = time.perf_counter()
    ds, _ = build_dataset(recipe, tok, ip, cfg, out)
    restart = time.perf_counter() - t

    def tree_pss(dataset) -> int:
        loader = torch.utils.data.DataLoader(as_hf_dataset(dataset), batch_size=16, num_workers=4,
                                             collate_fn=Collator(tok.pad_token_id), persistent_workers=True)
        it = iter(loader)
        for _ in range(20):
            next(it)
        value = pss_tree(os.getpid())
        del it, loader
        return value

    import gc

    gc.collect()
    pss_index = tree_pss(ds)
    as_list = read_records(data, images)  # the same records as Python objects, as the dataset held them before
    listed = VisionTextDataset(as_list, tok, ds.images, ds.template, ds.layout, ds.lengths)
    gc.collect()
    pss_list = tree_pss(listed)
    del as_list, listed
    return {"records": n, "read_once_sequential_s": read_seq, "read_once_threads_s": read_par,
            "first_start_s": first, "restart_s": restart, "pss_index_bytes": pss_index, "pss_list_bytes": pss_list}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--work", default="/tmp/qilin-scale")
    args = ap.parse_args()
    import subprocess

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    tiny_base(root)  # built once here; each size runs in its own process and loads it
    rows = []
    for n in args.sizes:  # each size in a fresh process, so one size's memory does not count in the next
        r = subprocess.run([sys.executable, __file__, "--one", str(n), "--work", str(root)], capture_output=True,
                           text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'records':>8s} {'read once (1 thread / all)':>27s} {'first start':>12s} {'x read once':>12s} "
          f"{'restart':>8s} {'PSS index':>10s} {'PSS list':>9s}")
    for r in rows:
        print(f"{r['records']:8d} {r['read_once_sequential_s']:12.1f} s / {r['read_once_threads_s']:6.1f} s "
              f"{r['first_start_s']:10.1f} s {r['first_start_s'] / r['read_once_threads_s']:11.2f}x "
              f"{r['restart_s']:6.2f} s {r['pss_index_bytes'] / 2**20:8.0f} MB {r['pss_list_bytes'] / 2**20:7.0f} MB")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        dn = b["records"] - a["records"]
        per = {k: (b[k] - a[k]) / dn for k in ("first_start_s", "restart_s", "pss_index_bytes", "pss_list_bytes")}
        print(f"per record: first start {per['first_start_s'] * 1e3:.2f} ms, restart {per['restart_s'] * 1e6:.0f} us, "
              f"memory {per['pss_index_bytes']:.0f} B with the index ({per['pss_list_bytes']:.0f} B as a list)")
        for n in (500_000, 1_000_000):
            print(f"projected at {n:,}: first start {b['first_start_s'] + per['first_start_s'] * (n - b['records']):.0f} s, "
                  f"restart {b['restart_s'] + per['restart_s'] * (n - b['records']):.0f} s, "
                  f"process tree {(b['pss_index_bytes'] + per['pss_index_bytes'] * (n - b['records'])) / 2**30:.2f} GiB "
                  f"(list: {(b['pss_list_bytes'] + per['pss_list_bytes'] * (n - b['records'])) / 2**30:.2f} GiB)")
        from benchmarks.harness import RESULTS

        (RESULTS / "dataset_scale.json").write_text(json.dumps({"rows": rows, "per_record": per}, indent=1))


if __name__ == "__main__":
    if "--one" in sys.argv:
        i = sys.argv.index("--one")
        work = Path(sys.argv[sys.argv.index("--work") + 1])
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(measure(work, int(sys.argv[i + 1]), work / "base")))
    else:
        main()
