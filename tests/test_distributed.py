"""Two processes (torchrun, gloo on the CPU) train align and tune end to end with the same global batch as one."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port


def first_loss(run: Path) -> float:
    hist = json.loads((run / "log_history.json").read_text())
    return next(h["loss"] for h in hist if "loss" in h)


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qilin_lite", *args] if nproc > 1 else [sys.executable, "-m", "qilin_lite", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


COMMON = ["--set", "model.dtype=float32", "--set", "model.attn=sdpa", "--set", "train.bf16=false",
          "--set", "train.tf32=false", "--set", "train.gradient_checkpointing=false", "--set", "data.num_workers=0",
          "--set", "train.global_batch=4", "--set", "train.per_device_batch=2", "--set", "train.max_steps=2",
          "--set", "train.logging_steps=1", "--set", "train.save_steps=1000", "--set", "train.lr=1e-2",
          "--set", "data.group_by_length=false", "--set", "train.lora_r=4", "--set", "data.max_length=256"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_base, tiny_data):
    data = ["--image-folder", str(tiny_data["images"])]
    runs = {}
    for n in (1, 2):
        a = tmp_path / f"align{n}"
        r = launch(n, "align", "--model", str(tiny_base), "--data", str(tiny_data["align"]), *data, "--out", str(a), *COMMON)
        assert r.returncode == 0, r.stderr[-3000:]
        t = tmp_path / f"tune{n}"
        r = launch(n, "tune", "--lora", "--from", str(a), "--data", str(tiny_data["tune"]), *data, "--out", str(t), *COMMON)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = (a, t)
    for stage in (0, 1):
        one, two = runs[1][stage], runs[2][stage]
        s1 = json.loads((one / "train_summary.json").read_text())
        s2 = json.loads((two / "train_summary.json").read_text())
        assert s1["steps"] == s2["steps"] == 2
        # the same 4 samples make the first global batch, so the first loss agrees
        assert abs(first_loss(one) - first_loss(two)) < 2e-3 * abs(first_loss(one)), (first_loss(one), first_loss(two))
    assert (runs[2][1] / "adapter_model.safetensors").exists()


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_shards_and_trains_like_one_process(tmp_path, tiny_base, tiny_data):
    """FSDP2 over two gloo processes: align, tune --full and tune --lora end with the single-process weights, and
    an interrupted align resumes from its sharded checkpoint.

    Without our shim accelerate would have run these as DDP (every process holding everything); the summary's
    sharded fraction tells the two apart. The full fine-tune also guards the lm_head gradient, which trl's fused head
    got from one process's batch only under FSDP (fixed by QilinTrainer.compute_loss)."""
    data = ["--image-folder", str(tiny_data["images"])]
    fsdp = ["--set", "train.fsdp=full_shard"]
    no_dropout = ["--set", "train.lora_dropout=0"]  # dropout masks differ between one process and two
    runs: dict = {}
    for n in (1, 2):
        extra = fsdp if n == 2 else []
        a = tmp_path / f"align{n}"
        align = ["align", "--model", str(tiny_base), "--data", str(tiny_data["align"]), *data, "--out", str(a), *COMMON,
                 *extra, "--set", "train.save_steps=1"]
        r = launch(n, *align)
        assert r.returncode == 0, r.stderr[-3000:]
        if n == 2:  # interrupted after step 1, then resumed: the sharded checkpoint brings it to the same end
            uninterrupted = weights(a / "projector.safetensors")
            # the checkpoint holds the projector and its optimizer state, not a copy of the frozen model
            assert (a / "checkpoint-1" / "projector.safetensors").exists()
            assert not list((a / "checkpoint-1").glob("pytorch_model_fsdp*"))
            shutil.rmtree(a / "checkpoint-2")
            (a / "projector.safetensors").unlink()
            # a marker in the checkpoint's history: it is carried over only if step 1 is resumed, not retrained
            state = json.loads((a / "checkpoint-1" / "trainer_state.json").read_text())
            state["log_history"][0]["loss"] = 123.0
            (a / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(state))
            r = launch(n, *align, "--resume")
            assert r.returncode == 0, r.stderr[-3000:]
            assert first_loss(a) == 123.0
            assert max_diff(weights(a / "projector.safetensors"), uninterrupted) < 1e-6
        for mode in ("full", "lora"):
            t = tmp_path / f"{mode}{n}"
            r = launch(n, "tune", f"--{mode}", "--from", str(tmp_path / "align1"), "--data", str(tiny_data["tune"]),
                       *data, "--out", str(t), *COMMON, *no_dropout, *extra)
            assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = {"align": a / "projector.safetensors", "full": tmp_path / f"full{n}" / "model.safetensors",
                   "lora": tmp_path / f"lora{n}" / "adapter_model.safetensors"}
    for stage in ("align", "full", "lora"):
        summary = json.loads((runs[2][stage].parent / "train_summary.json").read_text())
        assert summary["steps"] == 2
        assert summary["fsdp_sharded_fraction"] > 0.99, summary  # really sharded, not DDP
        one, two = weights(runs[1][stage]), weights(runs[2][stage])
        base = weights(tiny_base / "model.safetensors") if stage == "full" else None
        if base is not None:  # the comparison means something only if training moved the weights
            assert max_diff({k: one[k] for k in base}, base) > 1e-3
        assert max_diff(one, two) < 1e-4, stage


@pytest.mark.slow
def test_processes_share_image_checks_and_drop_the_same_records(tmp_path, tiny_base, tiny_data):
    """Each process decodes its share of the images; all drop the same corrupt ones (or training would hang on
    mismatched datasets), one writes rejects.jsonl, and without --skip-bad all stop with the one-line error."""
    images = tmp_path / "images"
    shutil.copytree(tiny_data["images"], images)
    first = sorted(images.iterdir())[0]
    (images / "坏图.png").write_bytes(first.read_bytes()[:40])  # a truncated PNG
    rows = json.loads(Path(tiny_data["align"]).read_text(encoding="utf-8"))
    rows[5] = dict(rows[5], id="bad-5", image="坏图.png")
    rows[10] = dict(rows[10], id="bad-10", image="坏图.png")
    data = tmp_path / "align.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    args = ["align", "--model", str(tiny_base), "--data", str(data), "--image-folder", str(images), *COMMON]

    r = launch(2, *args, "--out", str(tmp_path / "strict"))
    assert r.returncode != 0
    assert f"error: {data}:6 (bad-5)" in r.stderr
    # the only traceback is torchrun's own failure report, none through our code
    assert f'File "{Path(__file__).resolve().parents[1] / "qilin_lite"}' not in r.stderr

    out = tmp_path / "skip"
    r = launch(2, *args, "--out", str(out), "--skip-bad")
    assert r.returncode == 0, r.stderr[-3000:]
    listed = [json.loads(line)["id"] for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert listed == ["bad-5", "bad-10"]  # once each, though two processes found them
    assert json.loads((out / "train_summary.json").read_text())["samples"] == len(rows) - 2


@pytest.mark.slow
def test_fsdp_with_bf16_computes_in_bf16_and_reduces_gradients_in_fp32(tmp_path, align_run, tiny_data):
    out = tmp_path / "bf16"
    r = launch(2, "tune", "--lora", "--from", str(align_run), "--data", str(tiny_data["tune"]), "--image-folder",
               str(tiny_data["images"]), "--out", str(out), *COMMON, "--set", "train.fsdp=full_shard",
               "--set", "model.dtype=bfloat16")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["fsdp_sharded_fraction"] > 0.99
    assert summary["fsdp_dtypes"] == {"param": "bfloat16", "reduce": "float32"}
    assert math.isfinite(summary["final_loss"])


SHARE_PROBE = """
import json, sys
from transformers import AutoConfig
from qilin_lite.families import get_template
from qilin_lite.model import load_tokenizer_and_processor, token_layout
from qilin_lite.data.records import read_records
from qilin_lite.train.data import shared_lengths
base, data, images, out = sys.argv[1:5]
records = read_records(data, images)
tok, _ = load_tokenizer_and_processor(base)
layout = token_layout(AutoConfig.from_pretrained(base), int(sys.argv[5]))
lengths, bad = shared_lengths(records, get_template("vicuna_v1"), tok, layout)
json.dump({"lengths": lengths.tolist(), "bad": {str(k): v for k, v in bad.items()}}, open(out, "w"))
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()  # exiting with the group up can abort in gloo's teardown
"""


@pytest.mark.slow
def test_processes_split_the_length_count_and_all_get_every_length(tmp_path, tiny_base, tiny_data):
    """Each process tokenizes 1/N of the records; every process ends with all the lengths and reasons, the same as
    one process computing them all."""
    from transformers import AutoConfig

    from qilin_lite.families import get_template
    from qilin_lite.data.records import read_records
    from qilin_lite.model import load_tokenizer_and_processor, token_layout
    from qilin_lite.encoding import sample_lengths

    rows = json.loads(Path(tiny_data["tune"]).read_text(encoding="utf-8"))
    question = rows[3]["conversations"][0]["value"]
    rows[3]["conversations"][0]["value"] = question + question.replace("<image>", "") * 80  # its reply no longer
    # fits: a reason, not a length (the demo's own words, which its tokenizer knows, so they are many tokens)
    data = tmp_path / "tune.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    max_length = 160
    records = read_records(data, tiny_data["images"])
    tok, _ = load_tokenizer_and_processor(str(tiny_base))
    expected, expected_bad = sample_lengths(records, get_template("vicuna_v1"), tok,
                                            token_layout(AutoConfig.from_pretrained(tiny_base), max_length))
    assert 3 in expected_bad and len(set(expected.tolist())) > 3

    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", SHARE_PROBE, str(tiny_base), str(data),
                                       str(tiny_data["images"]), str(tmp_path / f"r{rank}.json"), str(max_length)],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert got["lengths"] == expected.tolist()
        assert got["bad"] == {str(k): v for k, v in expected_bad.items()}


@pytest.mark.slow
def test_two_nodes_by_rendezvous_match_one_process(tmp_path, tiny_base, tiny_data):
    """Multi-node as clusters launch it: two torchrun agents ("nodes" of one process each, here both on 127.0.0.1)
    meet through the c10d rendezvous; the first-step loss equals one process's on the same global batch."""
    data = ["--image-folder", str(tiny_data["images"])]
    args = ["align", "--model", str(tiny_base), "--data", str(tiny_data["align"]), *data, *COMMON]
    one = tmp_path / "one"
    r = launch(1, *args, "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=qilin-test", "-m", "qilin_lite", *args, "--out", str(two)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in nodes:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    s = json.loads((two / "train_summary.json").read_text())
    assert s["steps"] == 2 and s["processes"] == 2
    assert json.loads((one / "train_summary.json").read_text())["processes"] == 1
    assert abs(first_loss(one) - first_loss(two)) < 2e-3 * abs(first_loss(one)), (first_loss(one), first_loss(two))


@pytest.mark.slow
def test_metrics_on_logging_steps_only_under_ddp(tmp_path, align_run, tiny_data):
    """Two DDP processes, 2 micro-batches per step, a log every 2 steps: with `lean_metrics` (trl's metrics and
    gathers only on a logging step's last micro-batch, the token count gathered at the log) the run ends with the
    same adapter, losses and token count as trl's path, and no process waits on a gather the other skipped."""
    data = ["--image-folder", str(tiny_data["images"])]
    sets = [s for s in COMMON]
    for old, new in (("train.global_batch=4", "train.global_batch=8"), ("train.max_steps=2", "train.max_steps=4"),
                     ("train.logging_steps=1", "train.logging_steps=2")):
        sets[sets.index(old)] = new
    out = {}
    for lean in ("true", "false"):
        t = tmp_path / f"lean-{lean}"
        r = launch(2, "tune", "--lora", "--from", str(align_run), "--data", str(tiny_data["tune"]), *data,
                   "--out", str(t), *sets, "--set", "train.lora_dropout=0", "--set", f"train.lean_metrics={lean}")
        assert r.returncode == 0, r.stderr[-3000:]
        hist = [h for h in json.loads((t / "log_history.json").read_text()) if "loss" in h]
        out[lean] = (weights(t / "adapter_model.safetensors"), hist)
    (w_lean, h_lean), (w_trl, h_trl) = out["true"], out["false"]
    assert max_diff(w_lean, w_trl) == 0.0
    assert [h["loss"] for h in h_lean] == [h["loss"] for h in h_trl] and len(h_lean) == 2
    assert [h["num_tokens"] for h in h_lean] == [h["num_tokens"] for h in h_trl]
    assert all("entropy" in h and "mean_token_accuracy" in h for h in h_lean)


@pytest.mark.slow
def test_task_evaluation_is_shared_by_the_processes_and_scores_as_eval(tmp_path, align_run, tiny_data):
    """tune --eval-task under two processes: eval's batches are dealt out (each process answers its share, not the
    whole set) and the score logged at the last step is what `qilin-lite eval` gives the finished run."""
    from qilin_lite.eval.run import run_benchmark

    rows = json.loads(Path(tiny_data["heldout"]).read_text(encoding="utf-8"))
    task = tmp_path / "task.json"  # three of eval's batches of 8
    task.write_text(json.dumps([{**r, "id": f"{r['id']}-{k}"} for k in range(3) for r in rows][:24],
                               ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "tune"
    r = launch(2, "tune", "--lora", "--from", str(align_run), "--data", str(tiny_data["tune"]), "--image-folder",
               str(tiny_data["images"]), "--out", str(out), "--eval-task", str(task), "--eval-every", "1", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((out / "eval_history.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["answered_per_process"] == [16, 8] and h["n"] == 24 for h in history), history
    scored = run_benchmark(task, "llava", tmp_path / "eval", model=str(out), image_folder=tiny_data["images"],
                           dtype="float32", attn="sdpa")
    assert scored["groups"]["all"][history[-1]["metric"]] == history[-1]["value"]
