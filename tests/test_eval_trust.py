"""Evaluation the field can trust: intervals, paired tests, a recorded protocol, and whether the image mattered."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qilin_lite.errors import UserError
from qilin_lite.eval import EvalItem
from qilin_lite.eval.report import compare
from qilin_lite.eval.run import run_eval
from qilin_lite.eval.stats import bootstrap_ci, mcnemar_exact, paired

CLI = str(Path(sys.executable).with_name("qilin-lite"))


def test_bootstrap_interval_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.7).astype(float)
    lo, hi = bootstrap_ci(values)
    # direct: resample the questions 2000 times with the recorded seed, take the 2.5th and 97.5th percentiles
    direct = np.random.default_rng(0)
    means = [values[direct.integers(0, 400, 400)].mean() for _ in range(2000)]
    assert [lo, hi] != [0, 0]
    # (the implementation draws 256 resamples per call; the same stream drawn one at a time gives the same numbers)
    assert [lo, hi] == [round(float(x), 6) for x in np.percentile(means, [2.5, 97.5])]
    # and the textbook normal interval for a proportion agrees to within a point
    p, half = values.mean(), 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / 400)
    assert lo == pytest.approx(p - half, abs=0.01) and hi == pytest.approx(p + half, abs=0.01)
    assert bootstrap_ci(values) == [lo, hi]  # seeded: the same numbers every time
    assert bootstrap_ci([]) is None


def test_mcnemar_and_paired_bootstrap():
    # 10 discordant questions, 9 of them for b: exact two-sided p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = [0] * 9 + [1] + [1] * 20
    b = [1] * 9 + [0] + [1] * 20
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10) / 1024)
    t = paired(a, b)
    assert t["test"] == "mcnemar-exact" and t["diff"] == pytest.approx(8 / 30, abs=1e-6) and t["significant"]
    assert t["ci95"][0] > 0 < t["ci95"][1]
    assert paired(a, a)["p"] == 1.0 and not paired(a, a)["significant"]
    rng = np.random.default_rng(2)
    x = rng.random(200)
    t = paired(x, x + 0.05 + rng.normal(0, 0.05, 200))  # recall-like values: the paired bootstrap
    assert t["test"] == "paired-bootstrap" and t["significant"] and t["p"] < 0.001
    t = paired(x, x + rng.normal(0, 0.05, 200))
    assert not t["significant"] or t["p"] > 0.01


class Sighted:
    """A fake model that answers from its image: the right option for the right image, else the first one."""

    def __init__(self, items):
        self.right = {it.image: it for it in items}

    def __call__(self, batch):
        out = []
        for it in batch:
            seen = self.right.get(it.image)
            out.append(seen.reference if seen is not None and seen.id == it.id else "A")
        return out


def choice_items(tmp_path, n=40):
    from PIL import Image

    items = []
    for i in range(n):
        img = tmp_path / f"img{i}.png"
        Image.new("RGB", (30 + i % 3, 20), (i, 0, 0)).save(img)
        items.append(EvalItem(str(i), str(img), "哪一侧？", "ABCD"[1 + i % 3], "llava", "choice", ["左", "右", "双侧", "无"]))
    return items


def test_image_blind_reports_the_drop_and_flags_a_model_that_ignores_the_image(tmp_path):
    items = choice_items(tmp_path)
    m = run_eval(items, Sighted(items), tmp_path / "sighted", controls=("blank", "swapped"), fill=(122, 116, 104))
    blank = m["image_reliance"]["blank"]
    assert blank["metrics"]["accuracy"]["with_image"] == 1.0 and blank["metrics"]["accuracy"]["control"] == 0.0
    assert blank["changed"] == 1.0 and blank["metrics"]["accuracy"]["paired"]["significant"]
    assert m["image_reliance"]["swapped"]["metrics"]["accuracy"]["control"] == 0.0
    report = (tmp_path / "sighted" / "report.md").read_text(encoding="utf-8")
    assert report.splitlines()[2].startswith("**The image matters**: accuracy 100.00 with the image, 0.00 with a blank")
    # what the model was shown: a blank of each image's own size in the padding colour; swapped: another's image
    from PIL import Image

    shown = [json.loads(x) for x in (tmp_path / "sighted" / "predictions.blank.jsonl").read_text().splitlines()]
    with Image.open(shown[1]["image"]) as im:
        assert im.size == (31, 20) and im.getcolors() == [(31 * 20, (122, 116, 104))]
    swapped = [json.loads(x)["image"] for x in (tmp_path / "sighted" / "predictions.swapped.jsonl").read_text().splitlines()]
    assert all(s != it.image for s, it in zip(swapped, items)) and sorted(swapped) == sorted(it.image for it in items)

    blind = run_eval(items, lambda b: [it.reference for it in b], tmp_path / "blind", controls=("blank",))
    report = (tmp_path / "blind" / "report.md").read_text(encoding="utf-8")
    assert report.splitlines()[2].startswith("**Warning: this model scores the same without the image** (accuracy "
                                             "100.00 with the image, 100.00 with a blank one")
    assert blind["image_reliance"]["blank"]["changed"] == 0.0
    # resumable like the main predictions: a rerun generates nothing
    calls = []
    run_eval(items, lambda b: calls.append(b) or [it.reference for it in b], tmp_path / "blind", controls=("blank",))
    assert calls == []


def test_a_rerun_under_another_protocol_is_refused(tmp_path):
    from qilin_lite.eval.protocol import build_protocol

    items = choice_items(tmp_path, 4)
    proto = build_protocol(data=tmp_path / "img0.png", task="llava", limit=None, n=4, instruction=None,
                           decoding={"max_new_tokens": 8}, controls=[], model={"name": "m"})
    run_eval(items, lambda b: ["A"] * len(b), tmp_path / "out", protocol=proto)
    other = {**proto, "decoding": {"greedy": True, "max_new_tokens": 64}}
    with pytest.raises(UserError, match=r"answered before under another protocol \(decoding.max_new_tokens: 8 vs 64\)"):
        run_eval(items, lambda b: ["A"] * len(b), tmp_path / "out", protocol=other)


@pytest.fixture(scope="module")
def two_instructions(qlora_run, tiny_data, tmp_path_factory):
    from qilin_lite.eval.run import run_benchmark  # what `qilin-lite eval` calls

    root = tmp_path_factory.mktemp("proto")
    for name, instruction in (("plain", None), ("told", "请只回答一个词。")):
        run_benchmark(tiny_data["heldout"], "llava", root / name, model=str(qlora_run), image_folder=tiny_data["images"],
                      max_new_tokens=4, limit=4, instruction=instruction)
    return root


def test_a_changed_prompt_is_flagged_by_compare(two_instructions, qlora_run):
    root = two_instructions
    proto = json.loads((root / "told" / "metrics.json").read_text(encoding="utf-8"))["protocol"]
    assert proto["prompt"]["instruction"] == "请只回答一个词。" and proto["benchmark"]["sha256"]
    assert proto["model"]["name"] == Path(qlora_run).name and len(proto["model"]["fingerprint"]) == 16
    assert proto["model"]["template"] == "vicuna_v1" and proto["model"]["image_processor"]["image_mean"]
    assert proto["model"]["base"]["fingerprint"] and proto["decoding"]["max_new_tokens"] == 4
    with pytest.raises(UserError, match=r"^plain and told were not scored the same way \(prompt.instruction: null "
                                        r"vs '请只回答一个词。'\); compare runs of one protocol"):
        compare([root / "plain", root / "told"])
    table = compare([root / "plain", root / "told"], allow_protocol_diff=True)
    assert table.startswith("**WARNING: plain and told were not scored the same way**: prompt.instruction")
    assert "| accuracy | told − plain | 4 |" in table
    assert "plain" in compare([root / "plain", root / "plain" / "predictions.jsonl"])  # one protocol: no fuss


def test_a_served_export_compares_with_the_run_it_came_from(two_instructions, tmp_path):
    """How a system ran (a server's temperature / top_p / served, a dtype, a batch size) is no scoring protocol: an
    `eval --endpoint` result compares with `eval --model`'s, the difference in the notes; a changed max_new_tokens
    still refuses."""
    import shutil

    root = two_instructions
    served = tmp_path / "served"
    shutil.copytree(root / "plain", served)
    metrics = json.loads((served / "metrics.json").read_text(encoding="utf-8"))
    metrics["protocol"]["decoding"] = {"greedy": True, "max_new_tokens": metrics["protocol"]["decoding"]["max_new_tokens"],
                                       "temperature": 0, "top_p": 1, "served": True}
    (served / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    table = compare([root / "plain", served])
    assert "WARNING" not in table and "decoding.served: null vs true" in table
    metrics["protocol"]["decoding"]["max_new_tokens"] = 99
    (served / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="decoding.max_new_tokens"):
        compare([root / "plain", served])


@pytest.fixture
def fake_judge():
    """A local OpenAI-compatible endpoint: CORRECT when the model's answer shares a character with the reference."""
    import http.server
    import threading

    from conftest import reply_chat_completion

    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            asked.append((self.path, body["model"], body["temperature"], prompt))
            ref = prompt.split("Reference answer: ")[1].split("\n")[0]
            answer = prompt.split("Model answer: ")[1]
            reply = "CORRECT" if set(ref) & set(answer) else "INCORRECT."
            reply_chat_completion(self, reply)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()


def open_items(tmp_path):
    refs = [("病灶在哪里?", "右肺"), ("哪个器官最大?", "肝脏"), ("What organ?", "liver"), ("哪一侧?", "左侧")]
    return [EvalItem(str(i), None, q, r, "slake", "open") for i, (q, r) in enumerate(refs)]


def test_the_judge_end_to_end_with_its_cache(tmp_path, fake_judge):
    from qilin_lite.eval.judge import PROMPT, http_judge

    url, asked = fake_judge
    items = open_items(tmp_path)
    answers = {"0": "右侧肺部", "1": "肾", "2": "the liver", "3": "左边"}  # judge: right, wrong, right, right
    judge = (http_judge(url, "fake-judge"), "fake-judge")
    m = run_eval(items, lambda b: [answers[it.id] for it in b], tmp_path / "out", judge=judge)
    j = m["judge"]
    assert len(asked) == 4 and asked[0][:3] == ("/v1/chat/completions", "fake-judge", 0)
    assert asked[0][3] == PROMPT.format(question="病灶在哪里?", reference="右肺", answer="右侧肺部")  # the pinned prompt
    assert j["accuracy"] == 0.75 and j["n_open"] == 4 and j["unreadable"] == 0
    # token recall >= 0.5: 右侧肺部 has 右 and 肺 (1.0), 肾 (0), the liver (1.0), 左边 (0.5): agrees on all four
    assert j["agreement_with_recall"] == 1.0 and j["kappa_with_recall"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Judge (fake-judge, prompt v1)" in report and "| 4 | 75.00 [" in report
    run_eval(items, lambda b: [answers[it.id] for it in b], tmp_path / "out", judge=judge)
    assert len(asked) == 4  # a rerun costs nothing: every verdict came from OUT/judge.jsonl
    answers["1"] = "肝"  # a changed answer is a new question for the judge, and only it is asked
    run_eval(items, lambda b: [answers[it.id] for it in b], tmp_path / "new", judge=judge)
    assert len(asked) == 8


def test_judge_flags_and_an_unreachable_judge_are_one_line(tmp_path, tiny_data):
    rows = [{"qid": 1, "image_name": "a.png", "question": "哪一侧?", "answer": "左侧", "answer_type": "OPEN"}]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "1", "prediction": "左"}, ensure_ascii=False) + "\n", encoding="utf-8")
    base = [CLI, "eval", "--data", str(data), "--task", "vqa-rad", "--predictions", str(answers)]
    r = subprocess.run([*base, "--out", str(tmp_path / "a"), "--judge", "http://127.0.0.1:9"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --judge URL and --judge-model NAME go together")
    r = subprocess.run([*base, "--out", str(tmp_path / "a"), "--judge", "http://127.0.0.1:9", "--judge-model", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --judge http://127.0.0.1:9/v1/chat/completions: "
                                                         "cannot reach the judge")
    assert (tmp_path / "a" / "predictions.jsonl").is_file()  # the answers scored so far are kept
