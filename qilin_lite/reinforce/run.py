"""`qilin-lite reinforce`: GRPO on questions whose answers can be checked, rewarded by eval's own scoring.

In:  a recipe of stage "reinforce": `model.from_run` (as prefer's: a lora / qlora tune run, or whole weights),
     questions in `data.train` as [TASK:]FILE (any benchmark layout eval reads: closed, multiple choice, short open
     answers; a bare FILE is held-out dialogs with answers), train.num_generations / temperature /
     max_completion_length / beta / grpo_loss / scale_rewards / reasoning / format_weight.
Out: tune's output contract (qilin.json, the adapter or whole model, recipe.yaml, log_history.json,
     train_summary.json with the reward per step).

Each step, every question is asked as eval asks it (eval.run.conversation_for: the same prompt `chat` would send,
built by the family's template) and answered `num_generations` times by sampling; each answer's reward is
eval.metrics.score_item's "correct" (plus, with train.reasoning, `format_weight` for the
<think>...</think><answer>...</answer> layout, the answer scored on its <answer> part in eval too). The sampled ids
themselves are scored. Advantages are the rewards less their question's mean, over its standard deviation; the
loss is GRPO's on-policy objective with the k3 KL estimate against the starting policy (trl's GRPOTrainer math,
one optimisation pass per batch of samples, so the importance ratio is one and its clipping never binds).

trl's GRPOTrainer renders prompts with the processor's own chat template and recomputes the image inputs from it
(grpo_trainer.py, `_generate_and_score_completions`), which is not the template the paper's models were trained
with; the rollout and loss here are a Trainer.compute_loss instead, in ~100 lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from ..config import Recipe
from ..errors import UserError
from ..train import private_api, run_dir
from ..train.trainer import full_checkpoint, load_full_checkpoint, trainable_to_fp32

log = logging.getLogger(__name__)

REF_ADAPTER = "ref"
# what a question is told with train.reasoning (Med-R1 / MedVLM-R1's layout), in the question's language; eval asks
# the same with --instruction
REASONING_INSTRUCTION = {
    "zh": "请先在 <think> </think> 中写出推理过程，再在 <answer> </answer> 中给出最终答案。",
    "en": "First think through the question inside <think> </think>, then give the final answer inside "
          "<answer> </answer>.",
}


def rewards_for(items, answers: list[str], reasoning: bool, format_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(reward, correctness) per answer: eval's score of the answer, plus the format reward with reasoning."""
    from ..eval.matching import reasoning_layout
    from ..eval.metrics import score_item

    correct = np.array([float(score_item(it, a)["correct"]) for it, a in zip(items, answers)])
    if not reasoning:
        return correct, correct
    layout = np.array([float(reasoning_layout(a)) for a in answers])
    return correct + format_weight * layout, correct


def instruction_for(item, reasoning: bool) -> str | None:
    if not reasoning:
        return None
    import re

    zh = re.search(r"[\u4e00-\u9fff]", item.question + "".join(item.choices or []))
    return REASONING_INSTRUCTION["zh" if zh else "en"]


def vision_token_ids(config, layout) -> list[int]:
    names = ("image_token_id", "image_token_index", "vision_start_token_id", "vision_end_token_id", "video_token_id",
             "boi_token_index", "eoi_token_index")
    found = {layout.image_token_id} | {getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)}
    return sorted(found)


def no_dropout(model) -> None:
    """Dropout off: the answers are sampled from the model as it is scored (trl's GRPO does the same)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@contextlib.contextmanager
def reference(model):
    """While inside: `model` answers as the starting policy. A continued adapter has a frozen copy (REF_ADAPTER);
    a new adapter is switched off; which parameters train is left as it was."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise RuntimeError("reference() needs a peft model; --full keeps a separate reference copy")
    if REF_ADAPTER not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    model.base_model.set_adapter(REF_ADAPTER)
    try:
        yield
    finally:
        model.base_model.set_adapter("default")
        for n, p in model.named_parameters():
            p.requires_grad_(trains[n])


def add_reference_adapter(model) -> None:
    """A frozen copy of the adapter being continued: the reference is the tune run as it was, not the base."""
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", f".{REF_ADAPTER}.")).copy_(param)
    for n, p in model.named_parameters():
        p.requires_grad_(trains.get(n, False))


class ReinforceTrainer(private_api.TrainerHooks, Trainer):
    """GRPO as a Trainer: each micro-batch of questions is answered, rewarded and turned into one policy-gradient
    loss in compute_loss; the Trainer does the rest (accumulation, clipping, checkpoints, resume, logging)."""

    def __init__(self, *args, items, template, images, tokenizer, layout, recipe: Recipe, ref_model=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.items, self.template, self.images, self.tok, self.layout = items, template, images, tokenizer, layout
        tr = recipe.train
        self.g, self.temperature, self.max_new = tr.num_generations, tr.temperature, tr.max_completion_length
        self.beta, self.loss_type, self.scale = recipe.beta, tr.grpo_loss, tr.scale_rewards
        self.reasoning, self.format_weight = tr.reasoning, tr.format_weight
        self.projector_trains = recipe.projector_trains
        self.ref_model = ref_model
        self.stats: list[dict] = []  # per micro-batch, averaged into the next log row

    # ---------------------------------------------------------------- rollout
    def rollout(self, model, items):
        """Sample G answers per question from chat's prompt: (batch for the loss, answers, rewards, correctness)."""
        from ..eval.run import conversation_for
        from ..serve.generate import Generator

        gen = Generator(model, self.tok, self.images, self.template, self.layout, max_new_tokens=self.max_new,
                        temperature=self.temperature, top_p=1.0)
        # a sampled image token (or a Qwen / Gemma vision mark) would be read as an image slot when the answer is
        # scored: never sampled, as trl's GRPO suppresses the image token
        gen.extra = {"suppress_tokens": vision_token_ids(model.config, self.layout)}
        asked = [it for it in items for _ in range(self.g)]
        convs = [conversation_for(it, self.template, instruction_for(it, self.reasoning)) for it in asked]
        shown = [it.shown(self.template) for it in asked]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                prompts, new = gen.generate_ids(convs, shown)
        finally:
            model.train(was)
        stops = set(gen.stop_ids())
        completions = []
        for row in new.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            completions.append(row[:cut])
        answers = [self.tok.decode(c, skip_special_tokens=True).strip() for c in completions]
        rewards, correct = rewards_for(asked, answers, self.reasoning, self.format_weight)
        batch = self.sequences(prompts, completions, shown, model)
        return batch, answers, rewards, correct

    def sequences(self, prompts, completions, shown, model) -> dict:
        """Prompts padded on the left, completions on the right (as generation saw them), the images per row."""
        pad = self.tok.pad_token_id
        P, C = max(len(p) for p in prompts), max(max(len(c) for c in completions), 1)
        n = len(prompts)
        ids = torch.full((n, P + C), pad, dtype=torch.long)
        attention = torch.zeros((n, P + C), dtype=torch.long)
        for k, (p, c) in enumerate(zip(prompts, completions)):
            ids[k, P - len(p):P] = torch.from_numpy(np.asarray(p))
            attention[k, P - len(p):P] = 1
            ids[k, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[k, P:P + len(c)] = 1
        batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": attention[:, P:].clone()}
        if self.layout.marks:
            batch[self.layout.marks] = (ids == self.layout.image_token_id).long()
        opened = [self.images.open(ref) for refs in shown for ref in refs]
        if opened:
            dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
            vision = self.images.inputs(opened)
            batch.update(vision, pixel_values=vision["pixel_values"].to(dtype))
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def token_logps(self, model, batch) -> torch.Tensor:
        """log p of each completion token (temperature applied, as sampled)."""
        C = batch["completion_mask"].shape[1]
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        logits = model(**inputs, logits_to_keep=C + 1, use_cache=False).logits[:, :-1].float() / self.temperature
        target = batch["input_ids"][:, -C:]
        return torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        items = [self.items[i] for i in inputs["index"]]
        unwrapped = self.accelerator.unwrap_model(model)
        batch, answers, rewards, correct = self.rollout(unwrapped, items)
        r = torch.tensor(rewards, dtype=torch.float32).view(len(items), self.g)
        advantages = r - r.mean(1, keepdim=True)
        if self.scale == "group":
            advantages = advantages / (r.std(1, keepdim=True) + 1e-4)
        elif self.scale == "batch":
            advantages = advantages / (r.std() + 1e-4)
        advantages = advantages.view(-1, 1).to(batch["input_ids"].device)
        mask = batch["completion_mask"].float()
        logps = self.token_logps(model, batch)
        per_token = -torch.exp(logps - logps.detach()) * advantages
        kl = None
        if self.beta > 0:
            with torch.no_grad():
                if self.ref_model is not None:
                    ref = self.token_logps(self.ref_model, batch)
                else:
                    with reference(unwrapped):
                        ref = self.token_logps(model, batch)
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            per_token = per_token + self.beta * kl
        if self.loss_type == "grpo":
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        elif self.loss_type == "dapo":
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        else:  # dr_grpo
            loss = (per_token * mask).sum() / (mask.shape[0] * self.max_new)
        groups_flat = float((r.std(1) == 0).float().mean())
        self.stats.append({"reward": float(r.mean()), "reward_std": float(r.std(1).mean()),
                           "task_correct": float(np.mean(correct)), "frac_reward_zero_std": groups_flat,
                           "completion_length": float(mask.sum(1).mean()),
                           **({"kl": float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))} if kl is not None else {})})
        return loss

    def log(self, logs, start_time=None):
        if self.stats and "loss" in logs:  # a training row: the rollouts since the last one
            for key in self.stats[-1]:
                values = [s[key] for s in self.stats if key in s]
                logs[key] = round(float(np.mean(values)), 6)
            self.stats = []
        return super().log(logs, start_time)

    # ---------------------------------------------------------------- resume
    def load_weights(self, resume_from_checkpoint, model=None):
        if full_checkpoint(Path(resume_from_checkpoint)) and not self.is_fsdp_enabled:
            return load_full_checkpoint(model or self.model, Path(resume_from_checkpoint))
        done = super().load_weights(resume_from_checkpoint, model)
        if not self.projector_trains:  # peft's load_adapter(is_trainable=True) unfreezes the projector's copy
            from ..train.stages import freeze_projector

            freeze_projector(model or self.model)
        return done


def load_questions(recipe: Recipe) -> list:
    from ..eval.benchmarks import load_eval_items
    from ..eval.run import check_images
    from ..train.task_eval import split_task

    task, path = split_task(recipe.data.train)
    if not Path(path).exists():
        raise UserError(f"{path}: no such question file; give --data [TASK:]FILE (any layout eval reads, e.g. "
                        "slake:SLAKE/train.json)")
    items = load_eval_items(path, task, recipe.data.image_folder)
    unscorable = [it for it in items if it.kind == "caption"]
    if unscorable:
        raise UserError(f"{path}: question {unscorable[0].id} is a caption, which has no answer to check; reinforce "
                        "takes closed, multiple-choice and short-answer questions (drop captions, or use tune)")
    check_images(items)
    return items


def run_reinforce(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                  trainer_cls: type = ReinforceTrainer) -> Path:
    from ..families import get_template
    from ..images.pixel_values import image_loader
    from ..model import RunInfo, image_mode_for, token_layout
    from ..prefer.run import load_policy
    from ..train.args import check_optimizer, trainer_settings
    from ..train.stage import prepare_output, save_outputs, train

    if recipe.stage != "reinforce":
        raise UserError(f"run_reinforce takes a reinforce recipe, not stage {recipe.stage}")
    if recipe.train.fsdp or recipe.train.deepspeed:
        raise UserError("reinforce runs on one process here (sampling needs the whole model); drop train.fsdp / "
                        "train.deepspeed")
    if recipe.data.packing:
        raise UserError("reinforce does not pack: answers are sampled per question; drop --packing")
    t0 = time.time()
    items = load_questions(recipe)  # before any model loads: a bad file costs seconds
    out = prepare_output(recipe, resume, overwrite)
    try:
        base, model, ref_model, tokenizer, image_processor = load_policy(recipe, out)
        from peft import PeftModel

        info = RunInfo.load(Path(recipe.model.from_run)) if recipe.model.from_run else None
        if isinstance(model, PeftModel) and info is not None and info.kind in ("lora", "qlora"):
            add_reference_adapter(model)
        no_dropout(model)
        template = get_template(recipe.template)
        images = image_loader(image_processor, image_mode_for(model.config, recipe.data.image_mode, recipe.image_mode))
        layout = token_layout(model.config, max_length=10**9)
        import datasets
        from transformers import TrainingArguments

        args = TrainingArguments(**trainer_settings(recipe, out))
        check_optimizer(args, model)
        trainer = trainer_cls(
            model=model, args=args, train_dataset=datasets.Dataset.from_dict({"index": list(range(len(items)))}),
            data_collator=lambda rows: {"index": [r["index"] for r in rows]}, processing_class=tokenizer,
            items=items, template=template, images=images, tokenizer=tokenizer, layout=layout, recipe=recipe,
            ref_model=ref_model)
        trainable_to_fp32(trainer.model)
        train(trainer, out, resume)
        inner = trainer.accelerator.unwrap_model(trainer.model)
        if REF_ADAPTER in getattr(inner, "peft_config", {}):
            inner.delete_adapter(REF_ADAPTER)
        save_outputs(trainer, recipe, out, base, tokenizer, image_processor)
        write_summary(trainer, recipe, out, len(items), time.time() - t0)
    finally:
        run_dir.release(out)
    return out


def write_summary(trainer, recipe: Recipe, out: Path, questions: int, seconds: float) -> None:
    from ..train.stage import write_loss_curve

    if not trainer.args.should_save:
        return
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    write_loss_curve(history, out / "loss.png", title=f"reinforce ({recipe.train.mode}, GRPO)")
    rows = [h for h in history if "reward" in h]
    tr = recipe.train
    summary = {"stage": "reinforce", "mode": tr.mode, "samples": questions, "steps": trainer.state.global_step,
               "seconds": round(seconds, 1), "num_generations": tr.num_generations, "beta": recipe.beta,
               "temperature": tr.temperature, "loss_type": tr.grpo_loss, "reasoning": tr.reasoning,
               "first_reward": rows[0]["reward"] if rows else None, "final_reward": rows[-1]["reward"] if rows else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
