"""`qilin-lite reinforce` (GRPO): rewards are eval's scoring, the prompt is chat's, the scored tokens are the sampled
ones at the positions generation saw, and the output directory is tune's contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli_captured, tiny_recipe
from safetensors.torch import load_file

from qilin_lite.eval.items import EvalItem
from qilin_lite.eval.matching import answer_part, reasoning_layout
from qilin_lite.eval.metrics import score_item
from qilin_lite.reinforce.run import rewards_for


def _items():
    return [EvalItem("c1", None, "是否可见病灶？", "yes", "slake", "closed"),
            EvalItem("m1", None, "哪种成像？", "B", "pmc-vqa", "choice", ["CT", "磁共振", "X光"]),
            EvalItem("o1", None, "病灶在哪？", "左肺上叶", "slake", "open")]


def test_rewards_are_evals_scores_and_follow_a_changed_rule(monkeypatch):
    import qilin_lite.eval.metrics as metrics

    items = _items()
    answers = ["是的，可见", "B", "左肺"]
    rewards, correct = rewards_for(items, answers, reasoning=False, format_weight=1.0)
    assert rewards.tolist() == [float(score_item(it, a)["correct"]) for it, a in zip(items, answers)]
    assert rewards.tolist()[1] == 1.0
    # change a scoring rule: the reward follows it, since it is the same function
    monkeypatch.setattr(metrics, "extract_option", lambda text, choices: "A")
    assert rewards_for(items, answers, False, 1.0)[0].tolist()[1] == 0.0


def test_the_reasoning_layout_is_rewarded_and_scored_on_its_answer():
    item = _items()[1]
    good = "<think>T2 信号高，提示磁共振。</think>\n<answer>B</answer>"
    assert reasoning_layout(good) and not reasoning_layout("B") and not reasoning_layout("<answer>B</answer>")
    assert answer_part(good) == "B" and answer_part("plain B") == "plain B"
    assert score_item(item, good)["correct"]  # eval reads the answer part too
    # the option named in the thinking does not count: only the answer part is scored
    assert not score_item(item, "<think>可能是 B</think><answer>A</answer>")["correct"]
    rewards, correct = rewards_for([item, item], [good, "B"], reasoning=True, format_weight=0.5)
    assert rewards.tolist() == [1.5, 1.0] and correct.tolist() == [1.0, 1.0]


def _trainer_parts(run_dir, items_path, images, tmp_path):
    """A ReinforceTrainer's rollout pieces for a run directory, without training."""
    from qilin_lite.families import get_template
    from qilin_lite.images.pixel_values import image_loader
    from qilin_lite.model import image_mode_for, load_run, token_layout
    from qilin_lite.reinforce.run import ReinforceTrainer, load_questions

    model, tok, ip, info = load_run(str(run_dir), dtype="float32", attn="sdpa")
    r = tiny_recipe("reinforce", "lora", tmp_path / "x", items_path, images,
                    **{"model.from_run": str(run_dir), "train.num_generations": 2, "train.max_completion_length": 5})
    t = ReinforceTrainer.__new__(ReinforceTrainer)  # the rollout's methods only: no Trainer set-up
    t.items, t.template = load_questions(r), get_template(info.template)
    t.images, t.tok = image_loader(ip, image_mode_for(model.config, None, info.image_mode)), tok
    t.layout = token_layout(model.config, max_length=10**9)
    t.g, t.temperature, t.max_new, t.reasoning, t.format_weight = 2, 1.0, 5, False, 1.0
    return t, model


def _check_rollout_is_chats_prompt_and_scores_what_was_sampled(t, model):
    from qilin_lite.eval.run import conversation_for
    from qilin_lite.serve.generate import Generator

    torch.manual_seed(0)
    items = t.items[:3]
    batch, answers, rewards, correct = t.rollout(model, items)
    gen = Generator(model, t.tok, t.images, t.template, t.layout)
    n_prompt = batch["input_ids"].shape[1] - batch["completion_mask"].shape[1]
    for row in range(len(answers)):
        item = items[row // t.g]
        opened = [t.images.open(x) for x in item.shown(t.template)]
        want = gen.prompt_ids(conversation_for(item, t.template), t.images.counts(opened)).tolist()
        got = batch["input_ids"][row, :n_prompt][batch["attention_mask"][row, :n_prompt] == 1].tolist()
        assert got == want  # every sampled answer was asked with chat's prompt
        sampled = batch["input_ids"][row, n_prompt:][batch["completion_mask"][row] == 1]
        assert t.tok.decode(sampled, skip_special_tokens=True).strip() == answers[row]
        assert t.layout.image_token_id not in sampled.tolist()  # never an image slot in an answer
    assert rewards.tolist() == [float(score_item(items[k // t.g], a)["correct"]) for k, a in enumerate(answers)]
    # the log-probabilities scored are a plain forward's over each row alone (no padding): left padding and the
    # kept logits change nothing
    with torch.no_grad():
        logps = t.token_logps(model, batch)
        for row in range(len(answers)):
            keep = batch["attention_mask"][row] == 1
            alone = {k: v[row:row + 1][:, keep] for k, v in batch.items()
                     if k in ("input_ids", t.layout.marks) and v is not None}
            vision = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
            if "image_grid_thw" in vision:  # the row's own image patches
                sizes = vision["image_grid_thw"].prod(-1).tolist()
                start = sum(sizes[:row])
                vision = {"pixel_values": vision["pixel_values"][start:start + sizes[row]],
                          "image_grid_thw": vision["image_grid_thw"][row:row + 1]}
            elif vision:
                vision = {"pixel_values": vision["pixel_values"][row:row + 1]}
            logits = model(**alone, **vision).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, alone["input_ids"][0, 1:, None]).squeeze(1)
            n = int(batch["completion_mask"][row].sum())
            assert torch.allclose(logps[row][:n], lp[-n:], atol=1e-4), row


def test_llava_rollouts_are_chats_prompt_and_score_the_sampled_ids(lora_run, tiny_data, tmp_path):
    t, model = _trainer_parts(lora_run, tiny_data["heldout"], tiny_data["images"], tmp_path)
    _check_rollout_is_chats_prompt_and_scores_what_was_sampled(t, model)


def _reinforce(tmp_path, tiny_data, start, name="rl", mode="lora", **extra):
    from qilin_lite.reinforce.run import run_reinforce

    r = tiny_recipe("reinforce", mode, tmp_path / name, str(tiny_data["heldout"]), tiny_data["images"],
                    **{"model.from_run": str(start), "train.max_steps": 3, "train.num_generations": 4,
                       "train.max_completion_length": 6, "train.global_batch": 2, "train.per_device_batch": 2,
                       "train.lr": 1e-3, **extra})
    return run_reinforce(r)


def test_reinforce_from_a_tune_run_keeps_the_contract(tmp_path, tiny_data, lora_run):
    from qilin_lite.eval.run import run_benchmark
    from qilin_lite.model import RunInfo

    out = _reinforce(tmp_path, tiny_data, lora_run)
    rows = [h for h in json.loads((out / "log_history.json").read_text()) if "reward" in h]
    assert len(rows) == 3 and all(0 <= h["reward"] <= 1 and "kl" in h for h in rows)
    assert rows[0]["kl"] == 0  # the first step's policy is its reference
    info = RunInfo.load(out)
    assert info.kind == "lora" and info.template == RunInfo.load(lora_run).template
    before, after = load_file(lora_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # no reference adapter saved
    assert all(torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stage"] == "reinforce" and summary["num_generations"] == 4 and summary["beta"] == 0.04
    scored = run_benchmark(tiny_data["heldout"], "llava", tmp_path / "eval", model=str(out),
                           image_folder=tiny_data["images"], dtype="float32", attn="sdpa")
    assert scored["n"] == 8


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reinforce_from_whole_weights(tmp_path, tiny_data, align_run, mode):
    out = _reinforce(tmp_path, tiny_data, align_run, mode=mode, **{"train.max_steps": 2})
    rows = [h for h in json.loads((out / "log_history.json").read_text()) if "reward" in h]
    assert rows and rows[0]["kl"] == 0
    assert (out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()


def test_a_crashed_reinforce_run_resumes_to_the_same_weights(tmp_path, tiny_data, lora_run):
    """Sampling draws from torch's generator, which the checkpoint carries: the resumed run samples the answers
    the uninterrupted one sampled, and ends with its weights bit for bit."""
    from qilin_lite.reinforce.run import ReinforceTrainer, run_reinforce

    settings = {"model.from_run": str(lora_run), "train.max_steps": 4, "train.save_steps": 2,
                "train.num_generations": 4, "train.max_completion_length": 6, "train.global_batch": 2,
                "train.per_device_batch": 2, "train.lr": 1e-3}

    class Crash(ReinforceTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == 3:
                raise KeyboardInterrupt("the machine went away")
            return super().training_step(*a, **k)

    def recipe(name):
        return tiny_recipe("reinforce", "lora", tmp_path / name, str(tiny_data["heldout"]), tiny_data["images"],
                           **settings)

    run_reinforce(recipe("whole"))
    with pytest.raises(KeyboardInterrupt):
        run_reinforce(recipe("cut"), trainer_cls=Crash)
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "qilin.json").exists()
    run_reinforce(recipe("cut"), resume=True)
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    for k in want:
        assert torch.equal(want[k], got[k]), k
    rewards = [[h["reward"] for h in json.loads((tmp_path / d / "log_history.json").read_text()) if "reward" in h]
               for d in ("whole", "cut")]
    assert rewards[0][-2:] == rewards[1][-2:]


def test_flags_and_questions_are_checked_before_any_work(tmp_path, tiny_data, lora_run, monkeypatch, capsys):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"id": "c", "image": sorted(p.name for p in tiny_data["images"].iterdir())[0],
                                     "caption": "胸片"}]), encoding="utf-8")
    base = ["reinforce", "--image-folder", str(tiny_data["images"]), "--set", "model.dtype=float32"]
    for extra, says in (
        (["--data", str(tiny_data["heldout"])], "reinforce starts from a trained model"),
        (["--from", str(lora_run), "--data", str(tmp_path / "none.json")], "no such question file"),
        (["--from", str(lora_run), "--data", f"caption:{captions}"], "is a caption, which has no answer to check"),
        (["--from", str(lora_run), "--data", str(tiny_data["heldout"]), "--generations", "1"],
         "train.num_generations"),
        (["--from", str(lora_run), "--data", str(tiny_data["heldout"]), "--lora", "--qlora"], "choose one of"),
    ):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        code, _, err = run_cli_captured(monkeypatch, capsys, *base, "--out", str(out), *extra)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], (extra, err)
        assert not (out / "qilin.json").exists()


def _sized_questions(tmp_path, sizes) -> Path:
    """One closed question per image size (tmp_path/img/N.png, a flat colour each), answer 左肺 of two choices."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 100, 200 - 40 * i)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n病灶位于哪里？"}, {"from": "gpt", "value": "左肺"}],
            "answer": "左肺", "choices": ["左肺", "右肺"]})
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return questions


def test_qwen2_5_vl_rollouts_and_a_run_at_native_resolution(tmp_path):
    """A tiny Qwen2.5-VL release, images of different sizes: M-RoPE positions under left padding give the same
    log-probabilities as each row alone, and a GRPO run from the release saves an adapter."""
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl
    from qilin_lite.reinforce.run import run_reinforce

    texts = ["胸部X光片显示双肺纹理清晰。", "病灶位于哪里？", "左肺", "右肺", "是否可见病灶？", "是", "否"]
    release = build_tiny_qwen2_5_vl(tmp_path / "release", texts * 30)
    questions = _sized_questions(tmp_path, [(40, 60), (120, 90), (230, 200), (64, 64)])
    t, model = _trainer_parts(release, questions, tmp_path / "img", tmp_path)
    assert t.template.name == "qwen2-vl"
    _check_rollout_is_chats_prompt_and_scores_what_was_sampled(t, model)
    r = tiny_recipe("reinforce", "lora", tmp_path / "run", str(questions), tmp_path / "img",
                    **{"model.from_run": str(release), "train.max_steps": 2, "train.num_generations": 2,
                       "train.max_completion_length": 4, "train.global_batch": 2, "train.per_device_batch": 2})
    out = run_reinforce(r)
    assert any("merger" in k for k in load_file(out / "adapter_model.safetensors"))
    assert json.loads((out / "qilin.json").read_text())["template"] == "qwen2-vl"


@pytest.mark.slow
def test_the_reinforce_demo_raises_heldout_accuracy(tmp_path):
    """`qilin-lite demo --stage reinforce`: GRPO from a tune run stopped early raises held-out accuracy (greedy, by
    eval's code) and the mean reward, within minutes on this CPU."""
    from qilin_lite.demo.run import run_demo

    lines: list[str] = []
    m = run_demo(tmp_path / "demo", echo=lines.append, stage="reinforce")
    assert m["accuracy_after"] >= m["accuracy_before"] + 0.1, m
    assert m["reward_last"] > m["reward_first"], m
    assert "after GRPO" in lines[-1] and (tmp_path / "demo" / "reinforce" / "qilin.json").is_file()


@pytest.mark.slow
def test_the_prefer_demo_raises_the_margin_and_keeps_accuracy(tmp_path):
    from qilin_lite.demo.run import run_demo

    lines: list[str] = []
    m = run_demo(tmp_path / "demo", echo=lines.append, stage="prefer")
    assert m["margin_last"] > m["margin_first"] * 5 and m["margin_last"] > 0.02, m
    assert m["accuracy_after"] >= m["accuracy_before"] - 0.02, m
    assert "after DPO" in lines[-1]


def _release(family: str, out, texts):
    from qilin_lite.demo.gemma3 import build_tiny_gemma3
    from qilin_lite.demo.qwen_vl import build_tiny_qwen3_vl

    return {"gemma3": build_tiny_gemma3, "qwen3-vl": build_tiny_qwen3_vl}[family](out, texts)


@pytest.mark.parametrize("family, template", [("gemma3", "gemma3"), ("qwen3-vl", "qwen3-vl")])
def test_gemma3_and_qwen3_vl_rollouts_are_chats_prompt(tmp_path, family, template):
    """MedGemma's class (image tokens attend both ways through token_type_ids) and Qwen3-VL's (DeepStack,
    interleaved M-RoPE): sampled from chat's prompt, scored as each row alone, and a run from the release."""
    from qilin_lite.reinforce.run import run_reinforce

    texts = ["胸部X光片显示双肺纹理清晰。", "病灶位于哪里？", "左肺", "右肺", "是否可见病灶？", "是", "否"]
    release = _release(family, tmp_path / "release", texts * 30)
    questions = _sized_questions(tmp_path, [(40, 60), (120, 90), (230, 200)])
    t, model = _trainer_parts(release, questions, tmp_path / "img", tmp_path)
    assert t.template.name == template
    _check_rollout_is_chats_prompt_and_scores_what_was_sampled(t, model)
    r = tiny_recipe("reinforce", "lora", tmp_path / "run", str(questions), tmp_path / "img",
                    **{"model.from_run": str(release), "train.max_steps": 1, "train.num_generations": 2,
                       "train.max_completion_length": 3, "train.global_batch": 2, "train.per_device_batch": 2})
    out = run_reinforce(r)
    assert json.loads((out / "qilin.json").read_text())["template"] == template
    assert (out / "adapter_model.safetensors").exists()
