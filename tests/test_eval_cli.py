"""`qilin-lite eval` wired to a model: model_generate on the tiny QLoRA run, resume, the CLI, and the demo's scorer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qilin_lite.serve.generate
from qilin_lite.errors import UserError
from qilin_lite.eval import EvalItem, format_prompt, load_eval_items, model_generate, run_eval, score_demo_heldout
from qilin_lite.eval.matching import LETTERS

CLI = str(Path(sys.executable).with_name("qilin-lite"))


def qilin(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QILIN_LOG": "WARNING"}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


class Asked:
    """Wraps a generate callable and records which ids it was asked, batch by batch."""

    def __init__(self, generate):
        self.generate, self.batches = generate, []

    def __call__(self, batch):
        self.batches.append([it.id for it in batch])
        return self.generate(batch)

    @property
    def ids(self):
        return [i for b in self.batches for i in b]


@pytest.fixture(scope="module")
def heldout(tiny_data):
    return load_eval_items(tiny_data["heldout"], "llava", tiny_data["images"])


@pytest.fixture(scope="module")
def tiny_generate(qlora_run):
    """The tiny QLoRA run, loaded once for the module."""
    return model_generate(qlora_run, max_new_tokens=8, batch_size=4)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, heldout, tiny_generate):
    out = tmp_path_factory.mktemp("eval") / "fresh"
    return out, run_eval(heldout, tiny_generate, out, batch_size=4)


# ---------------------------------------------------------------- the demo's held-out file as a "llava" benchmark


def test_heldout_records_are_choice_items_shown_verbatim(tiny_data, heldout):
    records = json.loads(Path(tiny_data["heldout"]).read_text(encoding="utf-8"))
    assert len(heldout) == len(records) == 8
    for rec, item in zip(records, heldout):
        assert item.kind == "choice" and item.task == "llava" and item.choices == rec["choices"]
        assert item.choices[LETTERS.index(item.reference)] == rec["answer"]
        assert item.image == str(Path(tiny_data["images"]) / rec["image"])
        # the prompt the model was tuned on, with no lettered options added
        assert f"<image>\n{format_prompt(item)}" == rec["conversations"][0]["value"]


def test_llava_choice_records_that_cannot_be_scored(tmp_path):
    def load(rec):
        path = tmp_path / "h.json"
        path.write_text(json.dumps([rec], ensure_ascii=False), encoding="utf-8")
        return load_eval_items(path, "llava")

    base = {"id": "q1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n病灶位于哪一侧？"}, {"from": "gpt", "value": "左侧"}]}
    assert load({**base, "choices": ["左侧", "右侧"]})[0].reference == "A"  # no `answer`: the gpt turn
    with pytest.raises(UserError, match=r"h\.json \(q1\): answer '中间' is not one of its choices"):
        load({**base, "choices": ["左侧", "右侧"], "answer": "中间"})
    with pytest.raises(UserError, match=r"h\.json \(q1\): choices .* must be 2 to 8 distinct"):
        load({**base, "choices": ["左侧", "左侧"], "answer": "左侧"})
    with pytest.raises(UserError, match=r"h\.json \(q1\): choices must be a list of option texts"):
        load({**base, "choices": "左侧,右侧", "answer": "左侧"})
    assert load(base)[0].kind == "open"  # without choices: the VQA rule, as for every other task


# ---------------------------------------------------------------- model_generate


class FakeGenerator:
    from qilin_lite.families import get_template

    template = get_template("chatml")  # the run's own: a test that overrides it sees vicuna_v1 instead

    def __init__(self):
        self.calls = []

    def generate(self, conversations, images):
        self.calls.append((conversations, images))
        return [f"answer {len(self.calls)}.{k}" for k in range(len(conversations))]


def test_model_generate_prompts_batches_and_greedy(monkeypatch):
    fake, loads = FakeGenerator(), []

    def fake_load_generator(model_dir, **kw):
        loads.append((model_dir, kw))
        return fake, None

    monkeypatch.setattr(qilin_lite.serve.generate, "load_generator", fake_load_generator)
    generate = model_generate("run-dir", bits=4, max_new_tokens=5, batch_size=2, dtype="float16", template="vicuna_v1")
    items = [
        EvalItem("0", "/img/a.png", "病灶位于哪一侧？", "左侧", "slake", "open"),
        EvalItem("1", "/img/b.png", "诊断？", "B", "pmc-vqa", "choice", ["肺炎", "气胸"]),
        EvalItem("2", None, "请描述这张图片。", "胸片", "caption", "caption"),
    ]
    assert generate(items) == ["answer 1.0", "answer 1.1", "answer 2.0"]
    assert generate(items[:1]) == ["answer 3.0"]
    assert loads == [("run-dir", {"bits": 4, "dtype": "float16", "attn": "auto", "max_new_tokens": 5,
                                  "temperature": 0.0})]
    assert fake.template.name == "vicuna_v1"
    (convs1, images1), (convs2, images2) = fake.calls[:2]
    assert convs1 == [
        [{"role": "user", "content": "<image>\n病灶位于哪一侧？"}],
        [{"role": "user", "content": "<image>\n" + format_prompt(items[1])}],  # lettered options for PMC-VQA
    ]
    assert images1 == [["/img/a.png"], ["/img/b.png"]]
    assert convs2 == [[{"role": "user", "content": "请描述这张图片。"}]] and images2 == [[]]  # no image, no token

    with pytest.raises(UserError, match="unknown template 'alpaca'"):
        model_generate("run-dir", template="alpaca")
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        model_generate("run-dir", batch_size=0)
    assert len(loads) == 1  # neither bad call loaded a model


# ---------------------------------------------------------------- end to end on the tiny model


def test_run_eval_with_the_tiny_model(fresh_run, heldout):
    out, metrics = fresh_run
    lines = read_lines(out / "predictions.jsonl")
    assert [x["id"] for x in lines] == [it.id for it in heldout]
    assert all(isinstance(x["prediction"], str) and x["kind"] == "choice" for x in lines)
    assert metrics["n"] == len(heldout) == metrics["groups"]["all"]["n_choice"]
    assert metrics["groups"]["all"]["accuracy"] == sum(x["correct"] for x in lines) / len(lines)
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == metrics
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# qilin-lite eval: llava") and "| n (choice) | 8 |" in report


def test_limit_then_resume_matches_a_fresh_run(tmp_path, fresh_run, heldout, tiny_generate):
    out = tmp_path / "resumed"
    first = Asked(tiny_generate)
    metrics = run_eval(heldout, first, out, batch_size=4, limit=4)
    assert metrics["n"] == 4 and first.ids == [it.id for it in heldout[:4]]
    assert len(read_lines(out / "predictions.jsonl")) == 4

    second = Asked(tiny_generate)
    run_eval(heldout, second, out, batch_size=4)
    assert second.ids == [it.id for it in heldout[4:]]  # the first four are not asked again
    ids = [x["id"] for x in read_lines(out / "predictions.jsonl")]
    assert ids == [it.id for it in heldout]  # no duplicates
    # same batches as the fresh run ([0:4], [4:8]), so the same greedy answers and byte-identical metrics
    assert (out / "metrics.json").read_bytes() == (fresh_run[0] / "metrics.json").read_bytes()


def test_score_demo_heldout_on_the_tiny_model(qlora_run, tiny_data):
    records = json.loads(Path(tiny_data["heldout"]).read_text(encoding="utf-8"))
    result = score_demo_heldout(qlora_run, tiny_data["heldout"], tiny_data["images"])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_task"]) == {r["task"] for r in records}
    assert all(0.0 <= v <= 1.0 for v in result["per_task"].values())


def test_score_demo_heldout_rule_names_the_reference_and_no_other(monkeypatch, tmp_path):
    """Scored with canned answers: right only when the answer names its reference and no other choice."""
    cases = [  # (task, choices, answer, model's answer, right?)
        ("side", ["左侧", "右侧"], "左侧", "左侧", True),
        ("side", ["左侧", "右侧"], "右侧", "病灶位于右侧", True),
        ("side", ["左侧", "右侧"], "左侧", "左侧还是右侧", False),
        ("side", ["左侧", "右侧"], "右侧", "左侧", False),
        ("modality", ["CT", "磁共振", "X光"], "CT", "CT", True),
        ("modality", ["CT", "磁共振", "X光"], "磁共振", "磁共振", True),
        ("modality", ["CT", "磁共振", "X光"], "X光", "X光片", True),
        ("modality", ["CT", "磁共振", "X光"], "CT", "", False),
        ("modality", ["CT", "磁共振", "X光"], "CT", "CT和磁共振", False),
        ("modality", ["CT", "磁共振", "X光"], "X光", "磁共振", False),
    ]
    records = []
    for i, (task, choices, answer, _, _) in enumerate(cases):
        (tmp_path / f"{i}.png").write_bytes(b"")
        records.append({"id": f"h{i}", "image": f"{i}.png", "task": task, "choices": choices, "answer": answer,
                        "conversations": [{"from": "human", "value": "<image>\n问？"}, {"from": "gpt", "value": answer}]})
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")

    class Canned(FakeGenerator):
        def generate(self, conversations, images):
            return [cases[int(Path(im[0]).stem)][3] for im in images]  # image i.png gets case i's answer

    monkeypatch.setattr(qilin_lite.serve.generate, "load_generator", lambda *a, **kw: (Canned(), None))
    result = score_demo_heldout("unused", path, tmp_path)
    assert result == {"accuracy": 5 / 10, "per_task": {"side": 2 / 4, "modality": 3 / 6}}
    assert sum(c[-1] for c in cases) == 5  # the table above agrees


# ---------------------------------------------------------------- the command line


def write_answers(path: Path, records: list[dict], wrong: set[int]) -> Path:
    """Answers made elsewhere: the reference, or for the indexes in `wrong` every choice at once."""
    lines = [{"question_id": r["id"], "text": "".join(r["choices"]) if i in wrong else r["answer"]}
             for i, r in enumerate(records)]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def test_cli_scores_predictions_without_a_model_and_compares(tmp_path, tiny_data):
    records = json.loads(Path(tiny_data["heldout"]).read_text(encoding="utf-8"))
    data = ["--data", tiny_data["heldout"], "--task", "llava", "--image-folder", tiny_data["images"]]
    answers = write_answers(tmp_path / "answers.jsonl", records, wrong={1, 3})

    r = qilin("eval", "run", *data, "--out", tmp_path / "a", "--predictions", answers, "--limit", 5)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 5 and metrics["groups"]["all"]["accuracy"] == 0.6
    assert "# qilin-lite eval: llava" in r.stdout and "| accuracy | 60.00 [20.0, 100.0] |" in r.stdout
    assert f"written: {tmp_path / 'a' / 'predictions.jsonl'}, " in r.stdout

    # `eval --data ...` is short for `eval run --data ...`
    r = qilin("eval", *data, "--out", tmp_path / "b", "--predictions", write_answers(answers, records, wrong=set()))
    assert r.returncode == 0, r.stderr
    assert len(read_lines(tmp_path / "b" / "predictions.jsonl")) == len(records)

    r = qilin("eval", "compare", tmp_path / "a", tmp_path / "b" / "metrics.json")
    assert r.returncode == 2 and r.stderr.strip() == (  # 5 questions against 8: not one protocol
        "error: a and b were not scored the same way (benchmark.limit: 5 vs null; benchmark.n: 5 vs 8); compare "
        "runs of one protocol, or pass --allow-protocol-diff")
    r = qilin("eval", "compare", tmp_path / "a", tmp_path / "b" / "metrics.json", "--allow-protocol-diff")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("**WARNING: a and b were not scored the same way**: benchmark.limit: 5 vs null")
    assert lines[2:4] == ["| metric | a | b |", "|---|---|---|"]
    assert "| accuracy | 60.00 [20.0, 100.0] | 100.00 [100.0, 100.0] |" in lines
    assert "| accuracy | b − a | 5 | +40.00 | [" in r.stdout  # paired on the 5 questions both answered
    assert "- b: paired tests on the 5 questions both runs answered" in lines


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "vqa", "--model", "m"],
         "error: unknown task 'vqa'; use one of: pmc-vqa, vqa-rad, slake, pathvqa, caption, llava, omnimedvqa, mmmu"),
        (["--limit", "0", "--model", "m"], "error: --limit must be at least 1, got 0"),
        ([], "error: give one source of answers, not both or none: a model (--model), a server (--endpoint URL "
             "--served-model NAME) or answers made elsewhere (--predictions FILE)"),
        # images are checked before the model loads: there is no model at /nonexistent to load
        (["--model", "/nonexistent", "--image-folder", "/nonexistent"], "error: /nonexistent/img_"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, tiny_data, args, message):
    opts = {"--data": tiny_data["heldout"], "--task": "llava", "--out": tmp_path / "out"}
    opts.update(zip(args[::2], args[1::2]))
    r = qilin("eval", "run", *[x for kv in opts.items() for x in kv])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr


def test_cli_bad_flag_is_a_usage_error(tmp_path):
    r = qilin("eval", "run", "--bogus", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "No such option: --bogus" in r.stderr


def test_a_separate_image_template_is_asked_with_each_image(monkeypatch):
    """An item with several images (MMMU) reaches a huatuo / chatml model as its images, one `<image>\\n` each in
    front of the question, and a composite template's model as the one composite."""
    from qilin_lite.families import get_template

    for name, want in (("huatuo", ["/img/p1.png", "/img/p2.png"]), ("vicuna_v1", ["/img/both.png"])):
        fake = FakeGenerator()
        fake.template = get_template(name)
        monkeypatch.setattr(qilin_lite.serve.generate, "load_generator", lambda model_dir, **kw: (fake, None))
        item = EvalItem("0", "/img/both.png", "哪张有积液？", "B", "mmmu", "choice", ["第一张", "第二张"],
                        parts=("/img/p1.png", "/img/p2.png"))
        model_generate("run-dir")([item])
        (convs, images), = fake.calls
        assert images == [want]
        assert convs[0][0]["content"].startswith("<image>\n" * len(want) + "哪张")
        assert convs[0][0]["content"].count("<image>") == len(want)
