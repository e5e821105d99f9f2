"""The benchmark's measuring code, on small inputs: no timings here (speed goals live in benchmarks/, never in tests)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks/`

from benchmarks.harness import lengths as L  # noqa: E402


def test_length_fit_matches_published_quartiles():
    rng = np.random.default_rng(0)
    for stat in (L.CAPTION, L.CONTEXT, L.QUESTION, L.ANSWER):
        q1, med, q3 = L.quartiles(stat.sample(rng, 20_000))
        assert abs(med - stat.median) <= max(1, 0.03 * stat.median)
        assert abs(q1 - stat.q1) <= max(1, 0.05 * stat.q1) and abs(q3 - stat.q3) <= max(1, 0.05 * stat.q3)
        assert stat.sample(rng, 20_000).max() <= stat.max


def test_real_token_fraction_counts_padding():
    lengths = np.array([10, 10, 5, 1])
    assert L.real_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(26 / 30)
    assert L.real_fraction(lengths, [np.array([0, 3]), np.array([1, 2])]) == pytest.approx(26 / 40)


@pytest.mark.parametrize("stage", ["align", "tune"])
def test_length_grouping_pads_less_than_random_order(stage):
    lens = L.real_model_lengths(stage, 2_000, seed=1)
    assert lens.min() > L.REAL_IMAGE_TOKENS and lens.max() <= L.MAX_LENGTH
    f = L.fractions(lens, batch=16, seed=1)
    assert f["grouped"] > f["random"]
    assert f["packed"] > f["random"]
    # every sample lands in exactly one batch, in both orders
    for batches in (L.grouped_batches(lens, 16, seed=1), L.random_batches(len(lens), 16, seed=1)):
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lens)))


def test_quick_mode_parses_to_a_small_plan():
    from benchmarks import vs_trl

    args = vs_trl.parse_args(["--quick", "--skip", "speed", "memory", "--no-write"])
    plan = vs_trl.plan_for(args)
    assert args.quick and args.no_write and set(args.skip) == {"speed", "memory"}
    assert plan.rounds == 1 and not plan.profile
    assert plan.fraction_samples < vs_trl.FULL.fraction_samples
    assert vs_trl.plan_for(vs_trl.parse_args(["--rounds", "5"])).rounds == 5
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--rounds", "0"])


def test_readme_section_replaces_only_its_own_part(tmp_path):
    from benchmarks import vs_trl

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Memory planner\nkeep me\n", encoding="utf-8")
    vs_trl.write_readme(f"{vs_trl.README_START}\nfirst\n{vs_trl.README_END}", readme)
    vs_trl.write_readme(f"{vs_trl.README_START}\nsecond\n{vs_trl.README_END}", readme)
    text = readme.read_text(encoding="utf-8")
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(vs_trl.README_START) == 1


def test_fraction_part_of_the_benchmark_runs_on_the_quick_plan():
    from benchmarks import vs_trl

    out = vs_trl.part_fraction(vs_trl.QUICK, echo=lambda *a: None)
    assert {r["stage"] for r in out["rows"]} == {"align", "tune"}
    for r in out["rows"]:
        assert r["random"] < r["grouped"] <= 1 and r["random"] < r["packed"] <= 1
    assert all(isinstance(g["met"], bool) for g in out["goals"])


@pytest.mark.slow
def test_gpu_benchmark_runs_at_toy_sizes():
    """benchmarks/gpu/qlora_lora_steps.py is written for one GPU; at toy sizes the same code (qilin-lite's loading,
    QLoRA / LoRA configuration, the fused-head step, the planner) runs here, so it is ready when a GPU is."""
    from benchmarks.gpu import qlora_lora_steps

    rows = qlora_lora_steps.main(["--toy", "--steps", "1", "--attn", "sdpa"])
    assert [(r["mode"], r["attn"]) for r in rows] == [("qlora", "sdpa"), ("lora", "sdpa")]
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["positions"] == 96 + 16 - 1 and r["planned_bytes"] > 0
        # the accumulated step with the Trainer's per-micro-batch host work, and with ours
        assert r["habits_micro_batches"] == 8 and r["habits_trainer_step_s"] > 0 and r["habits_ours_step_s"] > 0
    # QLoRA and LoRA train the same adapters and projector
    assert rows[0]["trained_params"] == rows[1]["trained_params"]


@pytest.mark.slow
def test_overhead_benchmark_splits_a_step(capsys):
    from benchmarks import trainer_vs_bare_loop

    r = trainer_vs_bare_loop.main(["--quick"])
    assert set(r["runs"]) == {"lean", "trl", "trainer"}
    for name in ("lean", "trl", "trainer"):
        x = r["runs"][name]
        # each part measured, none counted twice ("other" is what is left, so overlapping parts make it negative)
        assert x["forward_loss_s"] > 0 and x["backward_s"] > 0 and x["optimizer_s"] > 0 and x["data_wait_s"] > 0
        assert x["other_s"] >= 0 and x["forward_loss_s"] + x["backward_s"] < x["step_s"]
    assert r["bare_step_s"] > 0 and "| bare |" in capsys.readouterr().out


def test_host_cost_benchmark_builds_the_recipe_models_on_meta(capsys):
    """benchmarks/host_work_vs_trainer.py times the Trainer's per-micro-batch module walks against ours on models
    configured as the recipes configure them; at toy sizes it checks that LoRA multiplies the modules walked and that the
    per-step figure scales with each recipe's accumulation."""
    from benchmarks import host_work_vs_trainer

    rows = {r["mode"]: r for r in host_work_vs_trainer.main(["--toy"])}
    assert rows["lora"]["modules"] == rows["qlora"]["modules"] > 2 * rows["full"]["modules"]
    for r in rows.values():
        per = r["per_micro_batch_ms"]
        assert r["per_step_ms"]["trainer"] == per["trainer"] * host_work_vs_trainer.RECIPE_MICRO_BATCHES[r["mode"]]
        assert set(r["trainer_ms"]) == set(r["ours_ms"]) == {"model.train()", "floating_point_ops"}
    assert "| qlora |" in capsys.readouterr().out


def test_published_results_live_apart_from_the_code():
    """Each measurement publishes its JSON in benchmarks/results/, named after the module that wrote it."""
    from benchmarks.harness import RESULTS

    bench = RESULTS.parent
    assert [p for p in bench.rglob("*.json") if p.parent != RESULTS] == []
    published = sorted(RESULTS.glob("*.json"))
    assert published and all((bench / f"{p.stem}.py").is_file() for p in published), published


@pytest.mark.slow
def test_gpu_check_runs_at_toy_size(demo_run, tmp_path):
    """scripts/gpu-check.sh validates a lent GPU in one command; at toy sizes every check runs here on the CPU, through
    the script itself, and reports where chat, eval and web put the weights and the inputs."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "scripts" / "gpu-check.sh"), "--toy", "--demo-dir", str(demo_run[0])],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    report = json.loads((tmp_path / "gpu-check.json").read_text(encoding="utf-8"))
    checks = report["checks"]
    assert {k: c["status"] for k, c in checks.items()} == dict.fromkeys(
        ["environment", "demo", "placement", "training", "planner", "packing", "native", "native-qwen3-vl",
         "native-gemma3"], "ok")
    for name, family in (("native", "qwen2.5-vl"), ("native-qwen3-vl", "qwen3-vl"), ("native-gemma3", "gemma3")):
        native = checks[name]["result"]
        assert native["family"] == family and native["trained"]["attn"] == "sdpa"
        assert native["trained"]["loss_finite"] and native["steps"] == 2
    placed = checks["placement"]["result"]
    assert placed["expected"] == {"weights": "cpu", "dtype": "float32", "attn": "sdpa", "inputs": "cpu"}
    for command in ("chat", "eval", "web"):
        assert placed[command]["ok"] and placed[command]["answer"], command
    sizes = [(row["size"], row["mode"]) for c in ("training", "planner") for row in checks[c]["result"]]
    assert sizes == [("toy", "qlora"), ("toy", "lora"), ("toy-wide", "qlora"), ("toy-deep", "qlora")]
    table = (tmp_path / "gpu-check.md").read_text(encoding="utf-8")
    assert "| placement | ok |" in table and "| toy-deep | qlora | sdpa |" in table
    # packing in random order: unpacked and the three packed layouts; packed rows attend per sample (segments.py)
    packed = checks["packing"]["result"]["rows"]
    assert set(packed) == {f"sdpa/random/{x}" for x in ("unpacked", "packed-auto", "packed-max", "packed-max-tokens")}
    assert packed["sdpa/random/packed-max"]["attention"] == "qilin_segments"
    assert packed["sdpa/random/packed-max"]["rows"] < packed["sdpa/random/unpacked"]["rows"] == 32
    assert "| sdpa/random/packed-max | qilin_segments |" in table
