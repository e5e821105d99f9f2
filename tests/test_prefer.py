"""`qilin-lite prefer` (DPO through trl's DPOTrainer) and `qilin-lite data pairs`.

What is checked against something other than the code under test:
- the prompt a pair is scored on is chat's prompt (Generator.prompt_ids) and the scored tokens are exactly the
  final reply as tune supervises it, for the paper's Llava and for Qwen2.5-VL at native resolution;
- trl's logged log-probabilities of the chosen replies at the first step equal a plain forward of the starting
  model over those ids (so trl scored our ids and our mask, not a re-tokenization of its own);
- the reference is the starting model: the loss at step 0 is log 2 and the margin starts at 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli_captured, tiny_recipe
from safetensors.torch import load_file

from qilin_lite.errors import UserError
from qilin_lite.families import IGNORE
from qilin_lite.prefer.pairs import read_pairs, reply_only


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, tiny_data):
    from qilin_lite.demo.data import make_demo_pairs

    return make_demo_pairs(tiny_data["tune"], tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def _write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading pairs
def test_every_common_pair_layout_reads_as_the_same_pair(tmp_path, tiny_data):
    img = sorted(p.name for p in tiny_data["images"].iterdir())[0]
    rows = [
        # trl / RLAIF-V: prompt text, replies as text, images without tags
        {"prompt": "病灶在哪一侧？", "chosen": "左侧", "rejected": "右侧", "images": [img]},
        # trl conversational: lists of turns
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "病灶在哪一侧？"}]}],
         "chosen": [{"role": "assistant", "content": "左侧"}], "rejected": [{"role": "assistant", "content": "右侧"}],
         "images": [img]},
        # LLaMA-Factory ShareGPT
        {"conversations": [{"from": "human", "value": "<image>\n病灶在哪一侧？"}], "chosen": {"from": "gpt", "value": "左侧"},
         "rejected": {"from": "gpt", "value": "右侧"}, "images": [img]},
        # LLaMA-Factory Alpaca
        {"instruction": "病灶在哪一侧？", "chosen": "左侧", "rejected": "右侧", "images": [img]},
        # RLAIF-V's own field names
        {"question": "病灶在哪一侧？", "chosen": "左侧", "rejected": "右侧", "image": img},
    ]
    pairs = read_pairs(_write(tmp_path, rows), tiny_data["images"])
    assert len(pairs) == 5
    for p in pairs:
        assert p.prompt == [{"role": "user", "content": "<image>\n病灶在哪一侧？"}]
        assert (p.chosen, p.rejected, [x.name for x in p.images]) == ("左侧", "右侧", [img])


@pytest.mark.parametrize("row, says", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' reply"),
    ({"prompt": "q", "chosen": "a", "rejected": " a "}, "are the same reply"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "no prompt"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], "chosen": "a",
      "rejected": "b"}, "must end with the user's turn"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["missing.png"]}, "not found"),
    ({"prompt": "<image>\n<image>\nq", "chosen": "a", "rejected": "b", "images": ["x.png"]}, "2 '<image>' tag"),
    ({"prompt": "q", "chosen": {"from": "gpt"}, "rejected": "b"}, "'chosen' must be a non-empty reply"),
])
def test_a_bad_pair_is_one_line_naming_its_line(tmp_path, tiny_data, row, says):
    if row.get("images") == ["x.png"]:  # an image that exists: the tags are the problem
        row = {**row, "images": [sorted(p.name for p in tiny_data["images"].iterdir())[0]]}
    path = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(UserError, match=r"p\.jsonl:2: ") as e:
        read_pairs(path, tiny_data["images"])
    assert says in str(e.value) and "\n" not in str(e.value)
    rejects = []
    assert len(read_pairs(path, tiny_data["images"], skip_bad=True, rejects=rejects)) == 1 and len(rejects) == 1


def test_only_the_last_reply_is_scored():
    """Nothing before the end of chat's prompt scores: an earlier reply (context) and, where the family's own
    fine-tuning supervises the prompt text (Gemma 3), the prompt; a reply cut off by --max-length is a bad record."""
    from qilin_lite.data.records import BadRecord

    ids = np.array([1, 5, 6, 3, 4, 7, 8, 2, 9])
    labels = np.array([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, 2, IGNORE])
    assert reply_only(ids, labels, ids[:5]).tolist() == [IGNORE] * 5 + [7, 8, 2, IGNORE]
    assert reply_only(ids, ids.copy(), ids[:5]).tolist() == [IGNORE] * 5 + [7, 8, 2, 9]  # all text supervised
    with pytest.raises(BadRecord, match="max-length"):
        reply_only(ids[:5], labels[:5], ids[:5])
    with pytest.raises(BadRecord, match="does not start"):
        reply_only(ids, labels, np.array([1, 5, 6, 3, 0]))


# ---------------------------------------------------------------- ids: chat's prompt, tune's reply
def _check_ids_are_chats(dataset, pairs):
    from qilin_lite.serve.generate import Generator

    gen = Generator(None, dataset.tokenizer, dataset.images, dataset.template, dataset.layout)
    for pair in pairs:
        opened = dataset.images.open_record(list(pair.images), dataset.template)
        counts = dataset.images.counts(opened)
        chosen, rejected = dataset.encode(pair, counts)
        prompt = gen.prompt_ids(pair.prompt, counts)
        from qilin_lite.encoding import encode

        for side, reply in ((chosen, pair.chosen), (rejected, pair.rejected)):
            ids, labels = side["input_ids"].numpy(), side["labels"].numpy()
            start = int(np.flatnonzero(labels != IGNORE)[0])
            assert ids[:start].tolist() == prompt.tolist()  # the prefix is exactly chat's prompt
            # the scored tokens are the reply as tune supervises it
            t_ids, t_labels = encode(pair.prompt + [{"role": "assistant", "content": reply}], dataset.template,
                                     dataset.tokenizer, dataset.layout, counts)
            assert ids.tolist() == t_ids.tolist()
            assert labels[start:].tolist() == t_labels[start:].tolist()


def test_llava_pairs_are_scored_on_chats_prompt(tiny_base, pairs_file, tiny_data, tmp_path):
    from qilin_lite.prefer.run import build_pairs
    from qilin_lite.model import load_tokenizer_and_processor
    from transformers import AutoConfig

    r = tiny_recipe("prefer", "lora", tmp_path / "o", pairs_file, tiny_data["images"],
                    **{"model.base": str(tiny_base), "data.template": "vicuna_v1"})
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    dataset, _ = build_pairs(r, tok, ip, AutoConfig.from_pretrained(str(tiny_base)), tmp_path)
    assert any(len(p.prompt) > 1 for p in dataset.pairs)  # multi-turn prompts are among them
    _check_ids_are_chats(dataset, dataset.pairs)


# ---------------------------------------------------------------- training
def _prefer(tmp_path, pairs_file, tiny_data, start, mode="lora", name="prefer", **extra):
    from qilin_lite.prefer.run import run_prefer

    r = tiny_recipe("prefer", mode, tmp_path / name, pairs_file, tiny_data["images"],
                    **{"model.from_run": str(start), "train.max_steps": 4, "train.lr": 1e-2, **extra})
    return run_prefer(r)


def _history(out):
    return [h for h in json.loads((out / "log_history.json").read_text()) if "rewards/margins" in h]


def test_trl_scores_our_ids_from_the_tune_runs_weights(tmp_path, pairs_file, tiny_data, lora_run):
    """One step over all 16 pairs: the chosen replies' mean log-probability trl logs equals a plain forward of the
    tune run over our ids; the loss is log 2 with policy = reference."""
    from qilin_lite.model import load_run
    from qilin_lite.prefer.pairs import PairDataset
    from qilin_lite.prefer.run import build_pairs

    out = _prefer(tmp_path, pairs_file, tiny_data, lora_run, **{"train.max_steps": 1, "train.global_batch": 16,
                                                                "train.per_device_batch": 16})
    row = _history(out)[0]
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and row["rewards/margins"] == 0
    model, tok, ip, _ = load_run(str(lora_run), dtype="float32", attn="sdpa")
    model.eval()
    r = tiny_recipe("prefer", "lora", tmp_path / "x", pairs_file, tiny_data["images"], **{"model.from_run": str(lora_run)})
    dataset, _ = build_pairs(r, tok, ip, model.config, tmp_path)
    assert isinstance(dataset, PairDataset) and len(dataset) == 16
    total = []
    with torch.no_grad():
        for item in dataset.__getitems__(list(range(16))):
            s = item["chosen"]
            logits = model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"]).logits[0, :-1]
            target = s["labels"][1:]
            keep = target != IGNORE
            lp = torch.log_softmax(logits.float(), -1)[keep].gather(1, target[keep][:, None]).sum()
            total.append(float(lp))
    assert row["logps/chosen"] == pytest.approx(float(np.mean(total)), rel=1e-4)


def test_prefer_from_a_tune_run_raises_the_margin_and_keeps_the_contract(tmp_path, pairs_file, tiny_data, lora_run):
    from qilin_lite.eval.run import run_benchmark
    from qilin_lite.model import RunInfo

    # every pair in each step (batch 16): the margin's rise is the model's, not which four pairs a step drew
    out = _prefer(tmp_path, pairs_file, tiny_data, lora_run, **{"train.max_steps": 60, "train.lr": 1e-2, "train.scheduler": "constant",
                                                                "train.warmup_ratio": 0, "train.global_batch": 16,
                                                                "train.per_device_batch": 8})
    rows = _history(out)
    margins = [round(h["rewards/margins"], 4) for h in rows]
    assert margins[0] == 0 and np.mean(margins[-3:]) > 0.1 and np.mean([h["rewards/accuracies"] for h in rows[-3:]]) > 0.7
    info = RunInfo.load(out)
    assert info.kind == "lora" and info.template == RunInfo.load(lora_run).template
    assert not (out / "ref").exists()  # the reference adapter is not part of the run
    before, after = load_file(lora_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    projector = [k for k in before if "multi_modal_projector" in k]
    lora = [k for k in before if "lora_" in k]
    assert projector and all(torch.equal(before[k], after[k]) for k in projector)  # frozen by default
    assert any(not torch.equal(before[k], after[k]) for k in lora)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stage"] == "prefer" and summary["samples"] == 16 and summary["steps"] == 60
    # eval (and so chat, which loads the same way) reads the output directory as a tune run
    scored = run_benchmark(tiny_data["heldout"], "llava", tmp_path / "eval", model=str(out),
                           image_folder=tiny_data["images"], dtype="float32", attn="sdpa")
    assert scored["n"] == 8


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_prefer_from_whole_weights(tmp_path, pairs_file, tiny_data, align_run, mode):
    """From an align run: a new adapter (reference: adapters disabled) or the whole LLM (reference: a second
    copy); the loss starts at log 2 either way, and the projector stays the align run's."""
    from qilin_lite.model import PROJECTOR_FILE

    out = _prefer(tmp_path, pairs_file, tiny_data, align_run, mode=mode)
    assert _history(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    start = load_file(align_run / PROJECTOR_FILE)
    saved = load_file(out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"))
    now = {k.split("multi_modal_projector.")[1]: v for k, v in saved.items() if "multi_modal_projector." in k}
    assert start.keys() == now.keys() and all(torch.equal(start[k], now[k]) for k in start)
    assert any("lora_" in k for k in saved) == (mode == "lora")


def test_a_crashed_prefer_run_resumes_to_the_same_weights(tmp_path, pairs_file, tiny_data, lora_run):
    from qilin_lite.prefer.run import PreferTrainer, run_prefer

    settings = {"model.from_run": str(lora_run), "train.max_steps": 6, "train.save_steps": 3, "train.lr": 1e-2,
                "train.global_batch": 4, "train.per_device_batch": 2}

    class Crash(PreferTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == 4:
                raise KeyboardInterrupt("the machine went away")
            return super().training_step(*a, **k)

    def recipe(name):
        return tiny_recipe("prefer", "lora", tmp_path / name, pairs_file, tiny_data["images"], **settings)

    run_prefer(recipe("whole"))
    with pytest.raises(KeyboardInterrupt):
        run_prefer(recipe("cut"), trainer_cls=Crash)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "qilin.json").exists()
    run_prefer(recipe("cut"), resume=True)
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_flags_are_checked_before_any_work(tmp_path, pairs_file, tiny_data, lora_run, monkeypatch, capsys):
    base = ["prefer", "--data", str(pairs_file), "--image-folder", str(tiny_data["images"]), "--set",
            "model.dtype=float32"]
    for extra, says in (
        ([], "prefer starts from a trained model"),
        (["--from", str(lora_run), "--loss", "sigmoid,nope"], "train.dpo_loss 'sigmoid,nope': choose from sigmoid"),
        (["--from", str(lora_run), "--beta", "0"], "train.beta"),
        (["--from", str(lora_run), "--lora", "--full"], "choose one of --lora, --qlora, --full"),
        (["--from", str(lora_run), "--full"], "--full needs whole weights; merge it first"),
    ):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        code, _, err = run_cli_captured(monkeypatch, capsys, *base, "--out", str(out), *extra)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], (extra, err)
        assert not (out / "qilin.json").exists()


def test_the_command_line_runs_prefer(tmp_path, pairs_file, tiny_data, lora_run, monkeypatch, capsys):
    out = tmp_path / "cli"
    code, stdout, err = run_cli_captured(
        monkeypatch, capsys, "prefer", "--from", str(lora_run), "--data", str(pairs_file), "--image-folder",
        str(tiny_data["images"]), "--out", str(out), "--beta", "0.2", "--loss", "sigmoid,sft", "--set",
        "model.dtype=float32", "--set", "train.max_steps=2", "--set", "train.global_batch=4", "--set",
        "train.per_device_batch=4", "--set", "model.attn=sdpa", "--set", "train.bf16=false")
    assert code == 0, err
    assert f"prefer done: {out}" in stdout
    recipe = (out / "recipe.yaml").read_text()
    assert "beta: 0.2" in recipe and "sigmoid,sft" in recipe and "lr: 5.0e-06" in recipe  # DPO's rate, not align's


# ---------------------------------------------------------------- pairs from eval
def test_wrong_eval_answers_become_pairs(tmp_path, tiny_data, lora_run, monkeypatch, capsys):
    from qilin_lite.eval.run import run_benchmark

    run_benchmark(tiny_data["heldout"], "llava", tmp_path / "eval", model=str(lora_run),
                  image_folder=tiny_data["images"], dtype="float32", attn="sdpa")
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    wrong = [p for p in preds if not p["correct"] and p["prediction"].strip()]
    assert wrong, "the tiny tuned model gets some held-out questions wrong"
    code, stdout, err = run_cli_captured(monkeypatch, capsys, "data", "pairs", str(tmp_path / "eval"), "--out",
                                         str(tmp_path / "pairs.jsonl"))
    assert code == 0, err
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert [p.id for p in pairs] == [p["id"] for p in wrong]
    for pair, p in zip(pairs, wrong):
        # held-out dialogs are asked as written: the reference option's text is the reply to prefer
        assert p["kind"] == "choice" and p["task"] == "llava"
        assert (pair.chosen, pair.rejected) == (p["choices"][ord(p["reference"]) - ord("A")], p["prediction"])
        assert pair.prompt[-1]["content"].endswith(p["question"]) and len(pair.images) == 1
    code, _, err = run_cli_captured(monkeypatch, capsys, "data", "pairs", str(tmp_path / "eval"), "--out",
                                    str(tmp_path / "pairs.jsonl"))
    assert code == 2 and "exists" in err  # never over a file


# ---------------------------------------------------------------- Qwen2.5-VL
def _sized_pairs(tmp_path, sizes) -> Path:
    """One pair per image size (tmp_path/img/N.png, a flat colour each): the same prompt, chosen and rejected."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 100, 200 - 40 * i)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"prompt": "病灶位于哪里？", "chosen": "左肺上叶可见结节影。", "rejected": "未见异常",
                     "images": [f"{i}.png"]})
    return _write(tmp_path, rows)


def test_qwen2_5_vl_prefer_at_native_resolution(tmp_path):
    """A tiny Qwen2.5-VL release: images of different sizes, pairs scored on chat's prompt, a DPO run from the
    release itself (new adapter, merger frozen)."""
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.prefer.run import build_pairs, run_prefer
    from transformers import AutoConfig

    texts = ["胸部X光片显示双肺纹理清晰。", "病灶位于哪里？", "左肺上叶可见结节影。", "右侧", "左侧", "未见异常"]
    release = build_tiny_qwen2_5_vl(tmp_path / "release", texts * 30)
    path = _sized_pairs(tmp_path, [(40, 60), (120, 90), (230, 200), (64, 64)])
    r = tiny_recipe("prefer", "lora", tmp_path / "run", path, tmp_path / "img",
                    **{"model.from_run": str(release), "train.max_steps": 2, "train.global_batch": 2,
                       "train.per_device_batch": 2})
    tok, ip = load_tokenizer_and_processor(str(release))
    from qilin_lite.train.stage import settle_template

    settle_template(r)
    dataset, _ = build_pairs(r, tok, ip, AutoConfig.from_pretrained(str(release)), tmp_path)
    _check_ids_are_chats(dataset, dataset.pairs)
    counts = {int((dataset.encode(p, dataset.images.counts(dataset.images.open_record(p.images, dataset.template)))[0]
                   ["input_ids"] == dataset.layout.image_token_id).sum()) for p in dataset.pairs}
    assert len(counts) == 4  # each image at its own size
    out = run_prefer(r)
    assert _history(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    after = load_file(out / "adapter_model.safetensors")
    assert any("merger" in k for k in after)


@pytest.mark.parametrize("family, template", [("gemma3", "gemma3"), ("qwen3-vl", "qwen3-vl")])
def test_gemma3_and_qwen3_vl_pairs_are_scored_on_chats_prompt(tmp_path, family, template):
    """MedGemma's class and Qwen3-VL's: each pair's prefix is chat's prompt, its reply tune's ids, and a DPO run
    from the release starts at log 2 and saves an adapter."""
    from transformers import AutoConfig

    from qilin_lite.demo.gemma3 import build_tiny_gemma3
    from qilin_lite.demo.qwen_vl import build_tiny_qwen3_vl
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.prefer.run import build_pairs, run_prefer
    from qilin_lite.train.stage import settle_template

    texts = ["胸部X光片显示双肺纹理清晰。", "病灶位于哪里？", "左肺上叶可见结节影。", "右侧", "左侧", "未见异常"]
    build = {"gemma3": build_tiny_gemma3, "qwen3-vl": build_tiny_qwen3_vl}[family]
    release = build(tmp_path / "release", texts * 30)
    path = _sized_pairs(tmp_path, [(40, 60), (120, 90), (230, 200)])
    r = tiny_recipe("prefer", "lora", tmp_path / "run", path, tmp_path / "img",
                    **{"model.from_run": str(release), "train.max_steps": 1, "train.global_batch": 2,
                       "train.per_device_batch": 2})
    settle_template(r)
    assert r.template == template
    tok, ip = load_tokenizer_and_processor(str(release))
    dataset, _ = build_pairs(r, tok, ip, AutoConfig.from_pretrained(str(release)), tmp_path)
    _check_ids_are_chats(dataset, dataset.pairs)
    out = run_prefer(r)
    assert _history(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "adapter_model.safetensors").exists()
