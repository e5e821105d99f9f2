"""Model directory -> `Generator`; model + images + conversation -> answer text. Shared by chat, web, eval
and the demo: `load_generator` is the one place inference loads a model.

The prompt is built by encoding.prompt_ids, beside training's `encode`: the same template steps
(placement, `render(..., add_generation_prompt=True)`, the template's tokenization) and the same image expansion, so inference sees exactly the prefix training saw.
Batches pad on the left so every prompt ends where generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..device import placement
from ..encoding import TokenLayout, prompt_ids
from ..errors import UserError
from ..families import Template
from ..images.pixel_values import ImageLoader, image_loader


@dataclass
class Generator:
    model: object
    tokenizer: object
    images: ImageLoader
    template: Template
    layout: TokenLayout
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None  # nucleus sampling when temperature > 0 (None: off)
    extra: dict = field(default_factory=dict)

    last_prompt_ids: list[int] = field(default_factory=list)  # the ids of the latest prompt (images expanded)

    def prompt_ids(self, messages: list[dict], counts=None) -> np.ndarray:
        """The prompt as training encoded it (image placement, the authors' tokenization for their templates on
        LLaMA SentencePiece tokenizers), ending where the assistant speaks; images expanded (`counts`: each image's
        token count at native resolution)."""
        return prompt_ids(messages, self.template, self.tokenizer, self.layout, counts)

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict]], images: list[list], streamer=None) -> list[str]:
        """One answer per conversation (each ending with a user turn); `images[i]` are that conversation's images."""
        _, new = self.generate_ids(conversations, images, streamer)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    @torch.inference_mode()
    def generate_ids(self, conversations: list[list[dict]], images: list[list], streamer=None):
        """(each conversation's prompt ids, the generated ids after them: one row per conversation, padded after
        its stop token). `reinforce` scores the sampled ids themselves, not a re-tokenization of their text."""
        opened = [[self.images.open(ref) for ref in imgs or ()] for imgs in images]
        prompts = [self.prompt_ids(m, self.images.counts(o)) for m, o in zip(conversations, opened)]
        self.last_prompt_ids = prompts[-1].tolist()
        longest = max(len(p) for p in prompts)
        context = self.context_length()
        if context and longest >= context:  # past its positions a model answers garbage, or fails deep inside
            raise UserError(f"the conversation is {longest} tokens (image included), more than this model's "
                            f"context of {context}; clear the conversation or ask a shorter question")
        max_new = min(self.max_new_tokens, context - longest) if context else self.max_new_tokens
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), longest), dtype=torch.long)
        for k, p in enumerate(prompts):
            input_ids[k, longest - len(p):] = torch.from_numpy(p)
            attention[k, longest - len(p):] = 1
        kwargs = {"input_ids": input_ids, "attention_mask": attention}
        if self.layout.marks:  # image tokens marked, as the model's processor marks them
            kwargs[self.layout.marks] = (input_ids == self.layout.image_token_id).long()
        flat = [img for o in opened for img in o]
        if flat:
            dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
            vision = self.images.inputs(flat)
            kwargs.update(vision, pixel_values=vision["pixel_values"].to(dtype))
        device = next(self.model.parameters()).device
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        sample = self.temperature > 0
        extra = {**dict(self.template.generation), **self.extra}  # the model family's defaults, then the caller's
        out = self.model.generate(
            **kwargs,
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=self.temperature if sample else None,
            top_p=self.top_p if sample else None,
            top_k=None,
            eos_token_id=self.stop_ids(),
            pad_token_id=pad,
            use_cache=True,
            streamer=streamer,
            **extra,
        )
        return prompts, out[:, longest:]

    def stop_ids(self) -> list[int]:
        """The tokenizer's end token and the template's own stop tokens (ChatML's <|im_end|>)."""
        ids = [self.tokenizer.eos_token_id]
        for t in self.template.stop:
            tid = self.tokenizer.convert_tokens_to_ids(t)
            if tid is not None and tid != self.tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def context_length(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        cfg = getattr(cfg, "text_config", cfg)
        return getattr(cfg, "max_position_embeddings", None)

    def answer(self, images: list, question: str, history: list[dict] | None = None) -> str:
        msgs = list(history or []) + [{"role": "user", "content": question}]
        return self.generate([msgs], [images])[0]


def load_generator(model: str, *, adapter: str | None = None, bits: int | None = None, dtype: str | None = None,
                   temperature: float = 0.2, max_new_tokens: int = 512, attn: str = "auto"):
    """Any model directory qilin-lite accepts (+ a peft adapter) -> (a ready `Generator` using the template saved
    with the weights, its RunInfo). The one loader chat, web, eval and the demo share. `dtype` None and `attn`
    "auto" choose for this machine (device.placement): on a GPU the weights load straight onto it."""
    from ..families import get_template
    from ..model import load_run, token_layout

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), not {temperature}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    p = Path(model)
    if not p.exists() and (str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        raise UserError(f"{model}: model directory not found; pass a run directory or a hub id")
    where = placement(dtype=dtype, attn=attn)  # device, dtype and attention: decided in device.py alone
    model_obj, tok, ip, info = load_run(model, bits=bits, dtype=where.dtype, attn=where.attn,
                                        device_map=where.device_map)
    if adapter:
        model_obj, info = _apply_adapter(model_obj, info, Path(adapter))
    model_obj.eval()
    layout = token_layout(model_obj.config, max_length=10**9)
    generator = Generator(model_obj, tok, image_loader(ip, info.image_mode), get_template(info.template), layout,
                          max_new_tokens=max_new_tokens, temperature=temperature)
    return generator, info


def _apply_adapter(model, info, adapter: Path):
    from peft import PeftModel

    from ..model import RunInfo
    from ..weights import check_safetensors

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json; --adapter takes a peft adapter directory "
                        "(a lora/qlora run)")
    if isinstance(model, PeftModel):
        raise UserError(
            f"--model is a {info.kind} run that already carries an adapter; pass {adapter} as --model on its own, "
            "or merge the first one (`qilin-lite merge`) and use the merged directory as --model"
        )
    check_safetensors(adapter, "adapter weights")  # a truncated file: one line naming it
    model = PeftModel.from_pretrained(model, str(adapter))
    own = RunInfo.load(adapter)  # a qilin-lite run carries the template it was trained with
    return model, (own if own is not None else info)
