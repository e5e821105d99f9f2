"""Every shipped recipe loads and says what it reproduces; the paper's numbers are the paper's."""

from __future__ import annotations

import json

import pytest
import yaml

from qilin_lite.config import REPO_RECIPES, load_recipe

RECIPES = sorted(p for p in REPO_RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_RECIPES)))
def test_every_recipe_loads_and_starts_with_its_command(path):
    r = load_recipe(path, **{"data.train": "x.jsonl"}, output_dir="out")
    if r.stage in ("prefer", "reinforce"):  # after tune: their command names the run they start from
        r = load_recipe(path, **{"data.train": "x.jsonl", "model.from_run": "runs/tune"}, output_dir="out")
    r.check()
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and "qilin" in first and r.stage in first
    assert r.reproduces
    if r.train.deepspeed:
        assert (REPO_RECIPES.parent / r.train.deepspeed).is_file()


def test_paper_settings():
    a = load_recipe(REPO_RECIPES / "qilin-med-vl/align.yaml")
    t = load_recipe(REPO_RECIPES / "qilin-med-vl/tune-full.yaml")
    assert (a.train.global_batch, a.train.per_device_batch, a.train.lr) == (256, 32, 1e-3)
    assert (t.train.global_batch, t.train.per_device_batch, t.train.lr) == (128, 16, 2e-5)
    for r in (a, t):
        assert (r.train.epochs, r.train.warmup_ratio, r.train.weight_decay, r.train.scheduler) == (1, 0.03, 0.0, "cosine")
        assert r.data.max_length == 2048 and r.train.bf16 and r.train.tf32 and r.train.gradient_checkpointing
    assert (a.template, a.image_mode, t.template, t.image_mode) == ("plain", "crop", "vicuna_v1", "pad")
    assert a.train.grad_accum(8) == 1 and a.train.grad_accum(1) == 8
    assert t.train.grad_accum(8) == 1 and t.train.grad_accum(2) == 4
    assert json.loads((REPO_RECIPES / "deepspeed/zero2.json").read_text())["zero_optimization"]["stage"] == 2
    assert json.loads((REPO_RECIPES / "deepspeed/zero3.json").read_text())["zero_optimization"]["stage"] == 3
    assert a.train.deepspeed.endswith("zero2.json") and t.train.deepspeed.endswith("zero3.json")


@pytest.mark.parametrize("path", sorted((REPO_RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_point_at_shipped_deepspeed_files(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["num_processes"] == 8
    assert (REPO_RECIPES.parent / cfg["deepspeed_config"]["deepspeed_config_file"]).is_file()


def test_global_batch_that_does_not_divide_is_an_error():
    from qilin_lite.errors import UserError

    r = load_recipe(REPO_RECIPES / "qilin-med-vl/tune-full.yaml", ["train.per_device_batch=48"])
    with pytest.raises(UserError, match="not a multiple"):
        r.train.grad_accum(1)


def test_flags_override_recipe_fields():
    r = load_recipe(REPO_RECIPES / "qilin-med-vl/tune-qlora.yaml", ["train.lr=1e-4", "data.max_length=1024"],
                    **{"train.mode": "lora"})
    assert (r.train.lr, r.data.max_length, r.train.mode) == (1e-4, 1024, "lora")


def test_fsdp_setting_is_checked():
    from qilin_lite.errors import UserError

    full = REPO_RECIPES / "qilin-med-vl/tune-full.yaml"
    ok = load_recipe(full, ["train.deepspeed=null", "train.fsdp=full_shard+offload"], output_dir="o", **{"data.train": "d.jsonl"})
    assert ok.train.fsdp_options == (True, True)
    assert load_recipe(full, ["train.fsdp=shard_grad_op"]).train.fsdp_options == (False, False)
    with pytest.raises(UserError, match="full_shard or shard_grad_op"):
        load_recipe(full, ["train.fsdp=zero3"])
    with pytest.raises(UserError, match="pick one way to shard"):
        load_recipe(full, ["train.fsdp=full_shard"], output_dir="o", **{"data.train": "d.jsonl"}).check()
    with pytest.raises(UserError, match="does not shard 4-bit weights"):
        load_recipe(REPO_RECIPES / "qilin-med-vl/tune-qlora.yaml", ["train.fsdp=full_shard"], output_dir="o", **{"data.train": "d.jsonl"}).check()
    ok.check()


def test_report_to_is_checked_before_training():
    from transformers.integrations import get_available_reporting_integrations

    from qilin_lite.errors import UserError
    from qilin_lite.train.args import report_targets

    assert report_targets("none") == "none"
    installed = get_available_reporting_integrations()
    assert report_targets("auto") == (["tensorboard"] if "tensorboard" in installed else "none")
    with pytest.raises(UserError, match="unknown tracker 'weights-and-biases'"):
        report_targets("weights-and-biases")
    missing = next(t for t in ("swanlab", "wandb", "trackio", "mlflow") if t not in installed)
    with pytest.raises(UserError, match=f"{missing} is not installed; pip install {missing}"):
        report_targets(f" {missing} ")
