"""DeepSpeed executed, not just loaded: the shipped ZeRO-2 and ZeRO-3 configs train align, tune --full, --lora and
--qlora in two CPU processes (torchrun, gloo, DeepSpeed's CPU accelerator) to the single-process weights, write the
same output directory as a one-GPU run, and resume from a DeepSpeed checkpoint.

DeepSpeed compiles a small communication op (shm) on its first CPU run; it is cached under
~/.cache/qilin-lite/torch_extensions (or $TORCH_EXTENSIONS_DIR), so only a machine's first run pays the build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.slow
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "qilin-lite" / "torch_extensions")
ZERO = {2: "recipes/deepspeed/zero2.json", 3: "recipes/deepspeed/zero3.json"}
COMMON = ["--set", "model.dtype=float32", "--set", "model.attn=sdpa", "--set", "train.bf16=false",
          "--set", "train.tf32=false", "--set", "train.gradient_checkpointing=false", "--set", "data.num_workers=0",
          "--set", "train.global_batch=4", "--set", "train.per_device_batch=2", "--set", "train.max_steps=2",
          "--set", "train.logging_steps=1", "--set", "train.save_steps=1000", "--set", "train.lr=1e-2",
          "--set", "data.group_by_length=false", "--set", "train.lora_r=4", "--set", "data.max_length=256",
          "--set", "train.lora_dropout=0"]  # dropout masks differ between one process and two


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=EXTENSIONS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qilin_lite", *args] if nproc > 1 else [sys.executable, "-m", "qilin_lite", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def stage_args(mode: str, out: Path, tiny_base, tiny_data, align_from: Path | None) -> list[str]:
    data = ["--image-folder", str(tiny_data["images"]), "--out", str(out), *COMMON]
    if mode == "align":
        return ["align", "--model", str(tiny_base), "--data", str(tiny_data["align"]), *data]
    return ["tune", f"--{mode}", "--from", str(align_from), "--data", str(tiny_data["tune"]), *data]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    found: dict = {}
    for f in sorted(run.glob("*.safetensors")):
        found.update(load_file(str(f)))
    return found


def top_level(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_base, tiny_data):
    """One process, no DeepSpeed: what a one-GPU run writes, per mode."""
    root = tmp_path_factory.mktemp("single")
    runs = {"align": root / "align"}
    launch(1, *stage_args("align", runs["align"], tiny_base, tiny_data, None))
    for mode in ("full", "lora", "qlora"):
        runs[mode] = root / mode
        launch(1, *stage_args(mode, runs[mode], tiny_base, tiny_data, runs["align"]))
    return runs


# each mode once and each stage with a fully trained LLM: ZeRO-3 where sharded parameters meet peft and 4-bit
# layers, ZeRO-2 (sharded optimizer state) where only the projector or the whole model trains. The full 4x2 matrix
# passed on 18facab..f759686; five cases keep the suite inside its time budget.
@pytest.mark.parametrize("mode, zero", [("align", 2), ("full", 2), ("full", 3), ("lora", 3), ("qlora", 3)])
def test_zero_trains_to_the_single_process_weights(tmp_path, tiny_base, tiny_data, single, mode, zero):
    out = tmp_path / f"{mode}-zero{zero}"
    launch(2, *stage_args(mode, out, tiny_base, tiny_data, single["align"]), "--set", f"train.deepspeed={ZERO[zero]}")
    one, two = weights(single[mode]), weights(out)
    assert one.keys() == two.keys() and one
    for k in one:
        assert one[k].dtype == two[k].dtype, k
        assert (one[k].float() - two[k].float()).abs().max().item() < 1e-5, k
    # the output directory is the contract: the same files, the same run description
    assert top_level(out) == top_level(single[mode])
    assert json.loads((out / "qilin.json").read_text()) == json.loads((single[mode] / "qilin.json").read_text())
    s1, s2 = (json.loads((r / "train_summary.json").read_text()) for r in (single[mode], out))
    assert (s1["steps"], s2["steps"], s2["processes"]) == (2, 2, 2)
    assert abs(s1["final_loss"] - s2["final_loss"]) < 1e-4 * abs(s1["final_loss"])


def test_a_zero3_run_resumes_from_its_deepspeed_checkpoint(tmp_path, tiny_base, tiny_data, single):
    """The paper's stage 2 (full fine-tune, ZeRO-3), stopped after step 1 and resumed: the same end as one run."""
    out = tmp_path / "full"
    args = [*stage_args("full", out, tiny_base, tiny_data, single["align"]), "--set", f"train.deepspeed={ZERO[3]}",
            "--set", "train.save_steps=1"]
    launch(2, *args)
    uninterrupted = weights(out)
    assert (out / "checkpoint-1" / "global_step1").is_dir()  # DeepSpeed's own sharded state
    shutil.rmtree(out / "checkpoint-2")
    for f in out.glob("*.safetensors"):
        f.unlink()
    # a marker in the checkpoint's history: it is carried over only if step 1 is resumed, not trained again
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    state["log_history"][0]["loss"] = 123.0
    (out / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(state))
    launch(2, *args, "--resume")
    resumed = weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert (resumed[k] - uninterrupted[k]).abs().max().item() < 1e-6, k
    history = json.loads((out / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h][0] == 123.0
