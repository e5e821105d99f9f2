"""Hostile recipe values (NaN, inf, -1, 0, huge numbers, wrong types, '[', /etc/passwd) through the override parser
and the checks the CLI runs before any work: each gives a valid recipe or one line naming the field, never a
traceback; and a run whose weights stop being finite stops with one line, keeps its last finite checkpoint, and
never writes a model or says "done"."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qilin_lite.config import SECTIONS, Recipe, load_recipe, save_recipe
from qilin_lite.errors import UserError
from qilin_lite.rules import kind_of
from qilin_lite.train.stage import check_before_work

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _fields():
    for f in dataclasses.fields(Recipe):
        if f.name not in SECTIONS:
            yield f.name, f
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f


FIELDS = dict(_fields())


def _files() -> dict[str, str]:
    d = Path(tempfile.mkdtemp(prefix="hostile-"))
    files = {"not_deepspeed.json": b'{"a": 1}', "list.json": b"[1, 2]", "deep.json": b"[" * 100_000,
             "bad_stage.json": b'{"zero_optimization": {"stage": 7}}', "binary.json": b"\xff\xfe\x00{",
             "recipe.yaml": b"train: {lr: '['}"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: str(d / name) for name in files}


HOSTILE_FILES = _files()
HOSTILE = [
    "", " ", "[", "]", "{", "}", "{a: 1}", "[1, 2]", "[[[[[[[[[[", ".nan", ".inf", "-.inf", "nan", "inf", "1e400",
    "-1e400", "1e-400", "-1", "0", "-0", "1", "0.5", "1.5", "-2", "true", "false", "yes", "off", "~", "null", "none",
    str(2**64), str(-2**63), "9" * 5000, "1" + "0" * 400, "!!binary aGk=", "!!python/object/apply:os.system [ls]",
    "&a [*a]", "*undefined", "2024-01-01", "'quoted'", "\x00", "a\x00b", "a\nb", "\t", "/etc/passwd", "/dev/null",
    "/", "../../etc/passwd", "x" * 10_000, "💥", "%s%n{0}", "--help", "=", "a=b", *HOSTILE_FILES.values(),
]
BASE = ["output_dir=out", "data.train=train.jsonl"]  # what --out and --data give; a later --set may change them


def attempt(overrides: list[str], **fields):
    """What the CLI does with these --set values before any work: a checked Recipe, or the UserError it prints."""
    try:
        recipe = load_recipe(None, [*BASE, *overrides], **fields)
        check_before_work(recipe)
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return e
    return recipe


def assert_valid(recipe: Recipe, round_trip: bool = True) -> None:
    """A recipe that passed is one training can use as it is and --resume can read back the same."""
    for key, f in FIELDS.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(recipe, section) if section else recipe, name)
        kind, optional = kind_of(f)
        assert value is not None or optional, key
        if kind == "float" and value is not None:
            assert isinstance(value, float) and math.isfinite(value), (key, value)
        if kind == "int" and value is not None:
            assert isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**32, (key, value)
    if not round_trip:
        return
    with tempfile.TemporaryDirectory() as d:
        save_recipe(recipe, Path(d) / "recipe.yaml")
        assert load_recipe(Path(d) / "recipe.yaml").to_dict() == recipe.to_dict()


def test_every_field_declares_a_rule():
    """A setting added without its check fails on the first construction: no field can go unchecked."""
    from qilin_lite.rules import TEXT, check_fields, setting

    assert len(FIELDS) > 50
    for key, f in FIELDS.items():
        assert "rule" in f.metadata, f"{key} has no rule (declare it with rules.setting)"

    @dataclasses.dataclass
    class Section:
        checked: str = setting("x", TEXT)
        unchecked: int = 3

    with pytest.raises(TypeError, match="Section.unchecked is declared without a rule"):
        check_fields(Section())


@pytest.mark.parametrize("override, field", [
    ("train.weight_decay=.nan", "train.weight_decay"), ("train.epochs=-1", "train.epochs"),
    ("train.lr=[", "train.lr"), ("data.max_length=1e400", "data.max_length"), ("train.epochs=.nan", "train.epochs"),
    ("train.seed=-1", "train.seed"), ("train.scheduler=cosine_annealing", "train.scheduler"),
    ("train.scheduler=cosine_with_min_lr", "train.scheduler"), ("train.optim=adamw_typo", "train.optim"),
    ("data.num_workers=-1", "data.num_workers"), ("train.logging_steps=0", "train.logging_steps"),
    ("train.deepspeed=/etc/passwd", "/etc/passwd: not a DeepSpeed config"), ("train.max_steps=0", "train.max_steps"),
    ("train.weight_decay=1e30", "train.weight_decay"), ("train.save_steps=0", "train.save_steps"),
    ("data.template=nope", "data.template"), ("model.dtype=float8", "model.dtype"), ("train.lr=.inf", "train.lr"),
    ("train.seed=" + "9" * 5000, "train.seed"), ("model.base={a: 1}", "model.base"), ("data.split=", "data.split"),
    ("train.deepspeed=" + HOSTILE_FILES["deep.json"], "not a DeepSpeed config"),
    ("train.deepspeed=" + HOSTILE_FILES["bad_stage.json"], "stage is 0, 1, 2 or 3"),
])
def test_the_issues_values_are_one_line_naming_the_field(override, field):
    result = attempt([override])
    assert isinstance(result, UserError) and field in str(result), result


def test_every_field_with_every_hostile_value():
    """Each field by name, each hostile value: a valid recipe or one line; every refusal names the field (or the
    file or model it names, or says what is missing)."""
    for key in FIELDS:
        for raw in HOSTILE:
            result = attempt([f"{key}={raw}"])
            if isinstance(result, UserError):
                named = key in str(result) or ": " in str(result)  # the field, or `file or model: problem`
                assert named or key in ("output_dir", "data.train"), (key, raw, str(result))
            else:
                assert_valid(result, round_trip=False)  # (the fuzz below reads each back; YAML is slow)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def as_override_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


keys = st.sampled_from(sorted(FIELDS)) | st.sampled_from(["train", "model", "", ".", "train..lr", "train.lr.x",
                                                          "nope.x", " train.lr", "data.train.x"])
raws = st.sampled_from(HOSTILE) | yaml_values.map(as_override_text) | st.text(max_size=40)
overrides = st.lists(st.tuples(keys, raws).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=4)


@SETTINGS
@given(overrides, st.sampled_from([{}, {"stage": "tune", "train.mode": "lora"}, {"stage": "tune"}]))
def test_fuzz_overrides_give_a_valid_recipe_or_one_line(sets, fields):
    result = attempt(sets, **fields)
    if not isinstance(result, UserError):
        assert_valid(result)


def test_a_recipe_file_with_a_bad_value_is_one_line():
    with pytest.raises(UserError) as e:
        load_recipe(HOSTILE_FILES["recipe.yaml"])
    assert "\n" not in str(e.value) and "train.lr" in str(e.value)


def test_a_logged_non_finite_loss_stops_before_the_save():
    """The loss check (the weights check runs in the CLI test below): the step's save and evaluation are
    cancelled and training stops."""
    from transformers import TrainerControl, TrainerState

    from qilin_lite.train.finite import NonFinite

    guard, state = NonFinite(), TrainerState(global_step=7)
    control = TrainerControl(should_save=True, should_evaluate=True)
    guard.on_log(None, state, control, logs={"loss": 2.5})
    assert guard.problem is None and control.should_save
    guard.on_log(None, state, control, logs={"loss": float("inf")})
    assert (guard.step, control.should_save, control.should_evaluate, control.should_training_stop) == (7, False, False, True)
    assert "loss is inf" in guard.problem


def _tune_args(tiny_base, tiny_data, out, *sets):
    common = ["model.dtype=float32", "model.attn=sdpa", "train.bf16=false", "train.tf32=false", "data.num_workers=0",
              "train.gradient_checkpointing=false", "train.global_batch=4", "train.per_device_batch=4",
              "train.lora_r=4", "train.lora_alpha=8", "data.max_length=256", *sets]
    return ["tune", "--lora", "--model", tiny_base, "--data", tiny_data["tune"], "--image-folder", tiny_data["images"],
            "--out", out, *[a for s in common for a in ("--set", s)]]


@pytest.mark.parametrize("bad, field", [("train.weight_decay=.nan", "train.weight_decay"),
                                        ("train.epochs=-1", "train.epochs")])
def test_cli_refuses_a_bad_value_before_any_work(bad, field, tiny_base, tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import run_cli_captured

    out = tmp_path / "run"
    code, stdout, stderr = run_cli_captured(monkeypatch, capsys, *_tune_args(tiny_base, tiny_data, out, bad))
    assert code == 2 and "Traceback" not in stderr and "done" not in stdout
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and field in lines[0], stderr
    assert not out.exists()  # nothing written: refused before the output directory was claimed


@pytest.mark.slow
def test_cli_run_whose_weights_become_nan_stops_and_keeps_the_last_finite_checkpoint(tiny_base, tiny_data, tmp_path,
                                                                                      monkeypatch, capsys):
    """A learning rate of 1e30 is a valid number and ruins the weights within steps: the run stops at the first
    step whose weights are not finite, with one line naming it; the checkpoint before it stays; no model is
    written and nothing says done."""
    from conftest import run_cli_captured
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = _tune_args(tiny_base, tiny_data, out, "train.lr=1e30", "train.max_steps=4", "train.save_steps=1",
                      "train.save_total_limit=0", "train.max_grad_norm=0", "train.warmup_ratio=0")
    code, stdout, stderr = run_cli_captured(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in stderr and "done" not in stdout, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN or infinite" in lines[0], stderr
    step = int(lines[0].split("training stopped at step ")[1].split(":")[0])
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == list(range(1, step)) and f"checkpoint-{step - 1} holds the last finite weights" in lines[0]
    for n in kept:  # every checkpoint on disk holds finite weights
        weights = load_file(out / f"checkpoint-{n}" / "adapter_model.safetensors")
        assert all(t.isfinite().all() for t in weights.values())
    assert not (out / "qilin.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not (out / "train_summary.json").exists()
