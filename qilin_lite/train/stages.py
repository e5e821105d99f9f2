"""Which parameters train in each mode.

In:  a loaded model of a family (a Llava, a Qwen2.5-VL) and a mode: align | lora | qlora | full; the family says
     where its vision tower, projector (Qwen's patch merger) and LLM sit.
Out: the same model (wrapped by peft for lora/qlora) with exactly these parameters trainable:
- align: the projector only (vision tower and LLM frozen), as the paper's stage 1;
- lora / qlora: LoRA adapters on every linear layer of the LLM's decoder, plus the whole projector;
- full: the LLM (embeddings, decoder, lm_head) and the projector.
The vision tower is frozen in every mode (the paper never trains it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..families import family_of_config
from ..families.llava import LLAVA

MODES = ("align", "lora", "qlora", "full")
# every linear layer of the LLM decoder, and nothing in the vision tower or projector (those match too by name)
LORA_TARGETS = LLAVA.lora_targets  # the LLM's attention and MLP projections (families/base.py)


def llm_bits(mode: str, load_4bit: bool = False) -> int | None:
    """The LLM's storage bits while training: 4 (NF4) for qlora, and for align with its frozen LLM in 4-bit."""
    return 4 if mode == "qlora" or (mode == "align" and load_4bit) else None


@dataclass
class LoraSettings:
    r: int = 64  # higher: more capacity and memory (LLaVA's LoRA recipe uses 128)
    alpha: int = 16
    dropout: float = 0.05

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA settings out of range: r={self.r} alpha={self.alpha} dropout={self.dropout}")


def configure(model, mode: str, lora: LoraSettings | None = None, gradient_checkpointing: bool = False,
              projector_trains: bool = True):
    """`projector_trains` False (prefer's default): the projector stays as it came; with LoRA it still rides in the
    adapter (modules_to_save), frozen, so the run's directory carries the projector it started from."""
    if mode not in MODES:
        raise UserError(f"unknown training mode '{mode}'; choose one of {', '.join(MODES)}")
    model.requires_grad_(False)
    family = family_of_config(model.config)
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if mode == "qlora":
            norms_to_fp32(model)
        lora = lora or LoraSettings()
        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=family.lora_targets,
            # the trained projector is saved inside the adapter (peft matches the module's own name)
            modules_to_save=[family.projector.split(".")[-1]],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        if not projector_trains:
            freeze_projector(model)
        if gradient_checkpointing:
            model.enable_input_require_grads()
        return model
    model.get_submodule(family.projector).requires_grad_(mode == "align" or projector_trains)
    if mode == "full":
        model.get_submodule(family.llm).requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return model


def keep_4bit_differentiable(model) -> int:
    """bitsandbytes repacks a 4-bit layer's weight for its CPU inference kernel the first time the layer runs in
    eval mode on a CPU with AVX512-BF16, and keeps it so: every later training forward then goes through a kernel
    with no autograd formula. torch 2.13 still differentiates it through a deprecated fallback (the gradients match
    here) and warns "may lead to silently incorrect behavior ... will be removed". A model that answers while it
    trains (--eval-data, --eval-task, reinforce's rollouts) keeps its training kernels instead. Returns the layers
    told so."""
    told = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            told += 1
    return told


def freeze_projector(model) -> None:
    """The projector's copy inside a peft adapter (modules_to_save) made frozen; LoRA matrices untouched."""
    from ..model import projector_of

    projector_of(model).requires_grad_(False)


def norms_to_fp32(model) -> int:
    """QLoRA's precision layout: normalisation weights in fp32, everything else unquantized in the load dtype.

    peft's `prepare_model_for_kbit_training` casts every unquantized weight to fp32 instead: the frozen vision tower,
    the embeddings and lm_head, about 2.7 GiB more at 13B for no gain (they compute under bf16 autocast anyway).
    QLoRA's own script and LLaVA's cast embeddings and lm_head back to bf16 after it and keep only the norms in fp32;
    this does that without the round trip. Input gradients for checkpointing are hooked after peft wraps the model.
    Returns the number of norm modules cast."""
    import torch

    cast = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Norm") or name.endswith("LayerNorm"):
            module.to(torch.float32)
            cast += 1
    return cast


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {train:,} of {total:,} ({100 * train / max(total, 1):.3f}%)"
