"""Memory planner: a recipe -> per-GPU memory estimate, whether it fits, and the smallest change that makes it fit.

In:  a recipe plus the run's shape (GPUs, GPU memory, per-device batch, max length, mode, dtype).
Out: a `Plan`: exact parameter counts per group (models built on the meta device from configs, nothing downloaded),
     bytes per component at the step's peak, a verdict and, when it does not fit, a suggested change with its flags.
     `qilin-lite plan` prints it as a table, or JSON with `--json`.

What is modelled is this repository's training path, tensor by tensor (see `layer_activation_bytes`):
- transformers 5 Llava: the frozen CLIP tower runs forward only and keeps only the selected layer's output;
- LLaMA decoder layers: saved tensors counted per op, as in Korthikanti et al. (2022), but for RMSNorm (saves an
  fp32 copy of its input), SwiGLU and flash / memory-efficient attention (q, k, v, output and log-sum-exp only: no
  s x s scores; sdpa with a padding mask keeps one b x s x s bias per layer; eager keeps the fp32 scores);
- peft LoRA (fp32 adapters; dropout keeps a mask and the adapter's input), bitsandbytes NF4 (no activations saved),
  and QLoRA's fp32 norms (`stages.norms_to_fp32`): their fp32 outputs make the residual stream fp32 from the first
  layer on, while the vision tower, embeddings and lm_head stay in the load dtype;
- trl >= 1's SFTTrainer loss: a chunked LM head (4096 tokens x 32768 vocabulary tiles), so the b x s x vocab logits
  are never materialised (`fused_lm_head=False` models the classic fp32-logits cross-entropy instead);
- torch fused AdamW (the Trainer's default): m and v in the parameter's dtype; outside DeepSpeed stage.py keeps every
  trained parameter in fp32 (frozen ones in the load dtype) and autocast computes in bf16; DeepSpeed ZeRO:
  bf16 weights and gradients, fp32 master + m + v (12 bytes per trained parameter) sharded over the GPUs from stage 1,
  gradients from stage 2, weights from stage 3 (which then gathers two decoder layers at a time);
- peak = persistent state (weights, optimizer, persistent gradients) + the largest of: start of backward (all saved
  activations + the LM head's backward buffers), the top and the bottom decoder layer's backward (with the layer's
  recompute under checkpointing; the bottom one beside the gradients of every layer above), the end of backward,
  the optimizer step, the vision forward;
- on a GPU, a fixed allowance: 1 GiB for the CUDA context, cuBLAS workspaces and NCCL buffers, plus 5% of the peak
  for the caching allocator's fragmentation.
The estimate is validated against the measured peaks of training steps on the CPU, in float32 and in bf16 with
autocast (`benchmarks/plan_accuracy.py`). Two CPU kernels differ from the GPU's (dropout keeps a float mask, trl's
LM head falls back to torch ops), which `Settings(device="cpu")` models; the GPU-only terms (CUDA allowance,
DeepSpeed buffers and sharding, the Triton LM head) follow the libraries' code and are not measured here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UserError
from .settings import DTYPE_BYTES, Settings, int8_bytes, nf4_bytes
from .shapes import GiB, Shape

CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context + cuBLAS workspaces + NCCL buffers, per GPU
FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the allocated peak
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # trl's chunked LM head tiles (trl/kernels/chunked_logprob.py)
# trl's torch fallback (no Triton: CPU only) keeps this many fp32 (tokens x vocabulary) temporaries alive at its
# forward and backward peaks, measured with the profiler (benchmarks/plan_accuracy.py --head)
CPU_TILE_TEMPS = (3.25, 7.25)


@dataclass
class Estimate:
    components: dict[str, int]  # bytes per GPU at the peak, in table order
    peak_phase: str
    total: int
    activations_checkpointed: int  # saved activations with checkpointing (the layers' inputs) ...
    activations_full: int  # ... and without it, for the same batch
    trainable: int
    dtypes: dict[str, str]
    phases: dict[str, int]  # allocated bytes at each candidate peak (without the CUDA allowance)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Sizes:
    """Element sizes (bytes) of the tensors the formulas count, which differ by mode, precision and device."""

    w: int  # frozen weights' dtype
    e: int  # compute dtype of matmuls (autocast) / activations
    stream: int  # residual stream (fp32 in QLoRA: its fp32 norms' outputs promote it)
    attn: int  # q, k, v, attention output as saved by the attention kernel
    mlp: int  # gate / up outputs (bitsandbytes casts its output back to the input's dtype)
    adapter: int  # LoRA A/B and their inputs' dtype
    autocast: bool


def _sizes(s: Settings) -> _Sizes:
    w = DTYPE_BYTES[s.dtype]
    deepspeed = s.zero_stage > 0
    if deepspeed:
        w = 2 if s.mixed_precision or w == 2 else 4  # DeepSpeed casts the whole model to bf16, and no autocast
    autocast = s.mixed_precision and not deepspeed
    e = 2 if autocast else w
    stream = 4 if (s.mode == "qlora" and not deepspeed) else w
    attn = e if autocast else (stream if s.bits else w)
    mlp = stream if s.bits else e
    adapter = w if deepspeed else 4
    return _Sizes(w=w, e=e, stream=stream, attn=attn, mlp=mlp, adapter=adapter, autocast=autocast)


def layer_activation_bytes(shape: Shape, s: Settings, tokens: int) -> dict[str, int]:
    """Bytes one decoder layer saves for backward, by tensor group (flash / memory-efficient attention).

    frozen weights (align, LoRA base): RMSNorm inputs in fp32 (x2), q/k/v after RoPE and the attention output
    (kept by the attention kernel), SiLU input, SiLU output and up (kept by the product);
    trained weights (full) add what their weight gradients need: the normalised inputs and the outputs of both
    norms and the down projection's input;
    LoRA adds per adapter the dropout mask and the adapter's input (as cast for lora_A), and lora_A's output.
    """
    z = _sizes(s)
    T, h, i = tokens, shape.hidden, shape.intermediate
    rows = {
        "norm inputs (fp32)": 2 * 4 * T * h,
        "attention q, k, v, out": z.attn * T * (2 * shape.query_dim + 2 * shape.kv_dim),
        "SwiGLU gate, act, up": 3 * z.mlp * T * i,
        "small (rsqrt, log-sum-exp)": 2 * 4 * T + 4 * T * shape.heads,
    }
    if s.mode == "full":
        rows["trained: norm outputs, down input"] = 2 * 2 * z.stream * T * h + z.mlp * T * i
        if s.planned_attention == "eager":
            rows["trained: o_proj input"] = z.attn * T * h
    if s.mode in ("lora", "qlora"):
        mask = 0 if s.lora_dropout == 0 else (1 if s.device == "cuda" else z.adapter)
        copy = z.e if z.autocast else z.adapter
        per_layer_in = sum(inp for _, inp, _, _ in shape.linears) // shape.layers
        per_layer_r = len(shape.linears) // shape.layers * s.lora_r
        rows["LoRA dropout masks + adapter inputs"] = (mask + copy) * T * per_layer_in
        rows["LoRA A outputs"] = copy * T * per_layer_r
    if s.planned_attention == "eager":
        b_heads_s2 = T * shape.heads * s.max_length
        rows["eager attention scores"] = (4 + (z.attn if z.attn != 4 else 0)) * b_heads_s2
    return rows


def estimate(shape: Shape, s: Settings) -> Estimate:
    """Bytes per GPU at the step's peak for `shape` trained as `s` says."""
    z = _sizes(s)
    notes: list[str] = []
    b, seq = s.per_device_batch, s.max_length
    if seq <= s.images * shape.image_tokens:
        raise UserError(f"max length {seq} leaves no room for text after {s.images} x {shape.image_tokens} image "
                        "tokens")
    T = b * seq
    h, L = shape.hidden, shape.layers
    N = s.gpus
    ds = s.zero_stage
    lora = shape.lora_params(s.lora_r) if s.mode in ("lora", "qlora") else 0

    # ---- weights
    other_w = z.w  # unquantized frozen weights keep the load dtype, in QLoRA too ...
    norm_w = 4 if (s.mode == "qlora" and not ds) else other_w  # ... but its norms are fp32 (stages.norms_to_fp32)
    if s.bits == 4:
        lin = sum(nf4_bytes(i * o) + (o * other_w if bias else 0) for _, i, o, bias in shape.quantized)
        lin += (shape.decoder_linear - sum(i * o + (o if bias else 0) for _, i, o, bias in shape.quantized)) * other_w
        lin_fmt = "NF4 + double quant"
    elif s.bits == 8:
        lin = sum(int8_bytes(i, o) + (o * other_w if bias else 0) for _, i, o, bias in shape.quantized)
        lin += (shape.decoder_linear - sum(i * o + (o if bias else 0) for _, i, o, bias in shape.quantized)) * other_w
        lin_fmt = "int8"
    else:
        lin, lin_fmt = shape.decoder_linear * z.w, _name(z.w, s)
    # train/stage.py keeps every trained weight in fp32 outside DeepSpeed (AdamW on bf16 weights loses small updates)
    proj_w = 4 if not ds else z.w
    full_w = 4 if (s.mode == "full" and not ds) else None  # the whole LLM is trained: fp32 too
    proj_copy = s.mode in ("lora", "qlora")  # peft modules_to_save: a trained copy beside the frozen original
    llm_other = ((shape.decoder_other + shape.final_norm) * (full_w or norm_w)
                 + (shape.embeddings + shape.lm_head) * (full_w or other_w))
    if full_w:
        lin, lin_fmt = shape.decoder_linear * full_w, "fp32 (trained)"
    weights = {
        "weights: vision tower": shape.vision * other_w,
        "weights: projector": shape.projector * ((other_w + proj_w) if proj_copy else proj_w),
        "weights: LLM decoder linear": lin,
        "weights: LLM embeddings, lm_head, norms": llm_other,
        "weights: LoRA adapters": lora * z.adapter,
    }
    if s.reference_copy:  # prefer / reinforce --full: the starting weights once more, frozen, in the load dtype
        weights["weights: reference model (frozen copy)"] = (shape.vision + shape.projector + shape.llm) * z.w
    if ds == 3:
        sharded = {k: v for k, v in weights.items() if not (s.bits and k == "weights: LLM decoder linear")}
        weights.update({k: math.ceil(v / N) for k, v in sharded.items()})
        if s.bits:
            notes.append("ZeRO-3 cannot shard these bitsandbytes weights (no bnb_4bit_quant_storage): counted whole")

    # ---- trainable parameters, gradients, optimizer states
    if s.mode == "align":
        trained = [(shape.projector, proj_w)]
    elif s.mode in ("lora", "qlora"):
        trained = [(lora, z.adapter), (shape.projector, proj_w)]
    else:
        trained = [(shape.llm, full_w or z.w), (shape.projector, proj_w)]
    P = sum(n for n, _ in trained)
    comp: dict[str, int] = dict(weights)
    if ds:
        master = 4 * P
        opt = 8 * P
        grads = 2 * P if z.w == 2 else 4 * P
        comp["fp32 master weights (DeepSpeed)"] = math.ceil(master / N)
        comp["optimizer: AdamW m, v"] = math.ceil(opt / N)  # fp32
        grads_persist = math.ceil(grads / N) if ds >= 2 else grads  # contiguous gradient partition
        bucket = (s.reduce_bucket or h * h) * z.w * 2  # overlap_comm: two reduce buckets in flight
        zero_buf = {"ZeRO reduce buckets": bucket}
        if ds == 3:
            zero_buf["ZeRO-3 gathered weights (2 layers)"] = min(2 * shape.layer_params, int(1e9)) * z.w
        step_transient = math.ceil(4 * P / N)  # the gradient partition upcast to fp32 for the step
        grads_all = grads_persist
        accum_grads = grads_persist
    else:
        opt = sum(2 * n * d for n, d in trained)
        grads_all = sum(n * d for n, d in trained)
        comp["optimizer: AdamW m, v"] = opt
        zero_buf = {}
        step_transient = 0  # fused AdamW: in place
        grads_persist = 0
        accum_grads = grads_all if s.accumulation > 1 else 0  # accumulated over micro-batches

    # ---- activations
    act_full, act_ckpt, recompute, layer_peak, head_bwd, head_rows, other_rows = _activations(shape, s, z, T)
    acts = act_ckpt if s.gradient_checkpointing else act_full  # with checkpointing: the layers' inputs only
    # gradients present when the first decoder layer's backward starts: all but the embeddings', the projector's
    # and that layer's own
    if s.mode == "full":
        not_yet = (shape.embeddings + shape.projector + shape.layer_params) * z.w
    else:
        not_yet = shape.projector * proj_w + (lora // L) * z.adapter
    grads_layers = max(grads_all - not_yet, 0)
    ckpt_one = T * h * z.stream  # one checkpointed layer's input
    head_grad_live = grads_all and s.mode == "full" and not ds and not accum_grads  # lm_head grad, then layers'
    head_w_grad = (shape.lm_head or shape.embeddings) * z.w if s.mode == "full" else 0
    phases = {
        "start of backward": {"activations (saved for backward)": acts, "LM head backward buffers": head_bwd,
                              "gradients": accum_grads},
        "top layer's backward": {
            "activations (saved for backward)": acts - head_rows,
            "layer backward working set": layer_peak + (recompute if s.gradient_checkpointing else 0),
            "gradients": accum_grads or (head_w_grad if head_grad_live else 0)},
        # the bottom decoder layer: every layer above has its gradients by now (embeddings and projector not yet)
        "bottom layer's backward": {
            "activations (saved for backward)": other_rows + recompute + (ckpt_one if s.gradient_checkpointing else 0),
            "layer backward working set": layer_peak,
            "gradients": accum_grads or grads_layers},
        "end of backward": {"activations (saved for backward)": other_rows, "gradients": grads_all},
        "optimizer step": {"gradients": grads_all, "optimizer step buffers": step_transient},
        "vision forward": {"vision forward working set": _vision_forward(shape, s, z, T)},
    }
    if ds:
        for ph in phases.values():
            ph["gradients"] = max(ph.get("gradients", 0), grads_persist)
            ph.update(zero_buf)
    static = sum(comp.values())
    phase_totals = {name: static + sum(rows.values()) for name, rows in phases.items()}
    phase, rows = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    comp.update(rows)
    allocated = sum(comp.values())
    if s.device == "cuda":
        comp["CUDA context + allocator slack"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)
    total = sum(comp.values())

    if ds:
        what = {1: "optimizer states", 2: "optimizer states and gradients",
                3: "weights, gradients and optimizer states"}[ds]
        if s.fsdp:
            notes.append(f"FSDP ({'full_shard' if ds == 3 else 'shard_grad_op'}) planned as ZeRO-{ds}: {what} are "
                         f"1/{N} per GPU; the FSDP figures have not been measured on GPUs")
        else:
            notes.append(f"ZeRO-{ds}: {what} are 1/{N} per GPU; DeepSpeed keeps fp32 master weights")
    if s.planned_attention == "sdpa" and s.padding:
        notes.append("attention planned as sdpa (memory-efficient kernel: no s x s scores) with padding, so every "
                     "layer keeps a b x s x s mask bias; --set model.attn=flash_attention_2 drops it")
    notes.append("loss: trl's chunked LM head, no b x s x vocab logits" if s.fused_lm_head
                 else "loss: b x s x vocab logits in fp32, as transformers' own loss")
    dtypes = {"weights": _name(z.w, s), "decoder linear": lin_fmt, "frozen non-linear": _name(other_w, s),
              "trained": ", ".join(sorted({_name(d, s) for _, d in trained})), "compute": _name(z.e, s),
              "residual stream": _name(z.stream, s)}
    return Estimate(components=comp, peak_phase=phase, total=total, activations_checkpointed=act_ckpt,
                    activations_full=act_full, trainable=P, dtypes=dtypes, phases=phase_totals, notes=notes)


def _activations(shape: Shape, s: Settings, z: _Sizes, T: int):
    """(all saved without checkpointing, with checkpointing, layer backward peak, LM head backward, head's saved,
    what is left at the end of backward)."""
    b, seq, h, V = s.per_device_batch, s.max_length, shape.hidden, shape.vocab
    layer = sum(layer_activation_bytes(shape, s, T).values())
    masked = s.planned_attention == "sdpa" and s.padding
    mask_per_layer = z.attn * b * seq * seq if masked else 0  # the kernel's float bias, saved by every layer
    mask_once = b * seq * seq if masked else 0  # the boolean mask transformers builds
    # outside the layers: the image path (tower output kept by the projector, projector activations), RoPE tables,
    # the final norm, and the LM head's saved input
    n_img = b * s.images * shape.image_tokens
    proj_e = z.e if z.autocast else (4 if s.bits and s.mode in ("align", "qlora") else z.w)
    vis_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    image = vis_dtype * b * s.images * shape.vision_tokens * shape.vision_hidden
    if z.autocast and vis_dtype != z.e:
        image += z.e * n_img * shape.vision_hidden
    image += proj_e * n_img * h * (1 if shape.linear_projector else 2)
    rope = 2 * b * seq * shape.head_dim * z.stream
    final_norm = 4 * T * h + (z.stream * T * h if s.mode == "full" else 0)
    inputs = 3 * 8 * T
    supervised = b * (seq - s.images * shape.image_tokens) if s.device == "cuda" else b * (seq - 1)
    lm_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    ce = z.e if z.autocast else z.stream  # the head's compute dtype
    if s.fused_lm_head:
        head_saved = supervised * h * z.stream
        n_t, v_t = min(supervised, TOKEN_TILE), min(V, VOCAB_TILE)
        # the product buffer is allocated at the full tile width whatever the vocabulary
        tile = n_t * VOCAB_TILE * ce + (n_t * h * ce if z.stream != ce else 0) + (v_t * h * ce if lm_dtype != ce else 0)
        cpu_fwd, cpu_bwd = CPU_TILE_TEMPS if s.device == "cpu" else (0, 0)
        grad_w = 4 * V * h if s.mode == "full" else 0
        convert = supervised * h * z.stream if z.stream != 4 else 0
        convert += V * h * lm_dtype if (grad_w and lm_dtype != 4) else 0
        head_bwd = 4 * supervised * h + grad_w + tile + int(cpu_bwd * n_t * v_t * 4) + convert
        head_fwd = tile + int(cpu_fwd * n_t * v_t * 4)
    else:
        head_saved = z.stream * T * h if s.mode == "full" else 0
        head_fwd = T * V * (ce + (4 if ce != 4 else 0) + 4)
        head_bwd = 12 * T * V + (T * V * ce if ce != 4 else 0)
    head_bwd = max(head_bwd, head_fwd)
    outside = image + rope + final_norm + inputs + head_saved + mask_once
    act_full = shape.layers * (layer + mask_per_layer) + outside
    ckpt_inputs = shape.layers * T * h * z.stream
    recompute = layer + mask_per_layer  # one layer's activations, recomputed during its backward
    act_ckpt = ckpt_inputs + outside
    # a layer's backward: the incoming gradient and the one being accumulated (hidden), and the MLP's
    # input-gradient chain (down input, act and up gradients) while the layer's saved tensors are still alive
    layer_peak = T * (2 * h * z.stream + 3 * shape.intermediate * z.mlp)
    if s.bits:
        _, i_, o_, _ = max(shape.quantized, key=lambda t: t[1] * t[2])
        layer_peak += i_ * o_ * (z.e if z.autocast else z.stream)  # the dequantized weight of one linear layer
    other = image + inputs
    return act_full, act_ckpt, recompute, layer_peak, head_bwd, head_saved, other


def _vision_forward(shape: Shape, s: Settings, z: _Sizes, T: int) -> int:
    """Frozen tower, no graph: one CLIP layer's temporaries beside the LLM's input embeddings."""
    vis_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    tok = s.per_device_batch * s.images * shape.vision_tokens
    return T * shape.hidden * z.stream + tok * (3 * shape.vision_hidden + 3 * shape.vision_intermediate) * vis_dtype


def _name(nbytes: int, s: Settings) -> str:
    return {4: "fp32", 2: "fp16" if s.dtype == "float16" else "bf16"}[nbytes]
