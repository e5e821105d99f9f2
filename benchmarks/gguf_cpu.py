"""GGUF export on the CPU: file sizes, llama.cpp's tokens/s, and its answers against `qilin-lite chat`'s.

    python benchmarks/gguf_cpu.py DEMO_OUT [--quants f16 q8_0 q4_k_m]

DEMO_OUT is a finished `qilin-lite demo` directory. Each quant is exported from DEMO_OUT/tune, loaded in llama.cpp
(llama-cpp-python's binding of libllama + libmtmd), and asked the demo's held-out questions greedily on the images
the run's ImageLoader makes (padded to the tower's size). Prints one table: size, prompt and generation tokens/s,
agreement with qilin-lite chat's greedy answers, and accuracy. `LlamaCppLlava` is also what tests/test_gguf.py runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np

_KEEP = []  # the C callbacks must outlive every call that may log


def _quiet(llama_cpp, mtmd) -> None:
    """llama.cpp and mtmd log each image and load to stderr; keep the table readable."""
    if _KEEP:
        return
    noop_llama = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(noop_llama, ctypes.c_void_p(0))
    _KEEP.append(noop_llama)
    if hasattr(mtmd, "mtmd_helper_log_set"):
        noop_mtmd = llama_cpp.llama_log_callback(lambda level, text, data: None)
        mtmd.mtmd_helper_log_set(noop_mtmd, ctypes.c_void_p(0))
        _KEEP.append(noop_mtmd)


class LlamaCppLlava:
    """A GGUF language model + mmproj in llama.cpp: the prompt from the GGUF's own chat template (jinja2, as
    llama-cpp-python renders it), the image through mtmd, greedy decoding on the logits."""

    def __init__(self, model: str | Path, mmproj: str | Path, n_ctx: int = 1024, threads: int = 2):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.lc, self.mtmd = llama_cpp, mtmd
        _quiet(llama_cpp, mtmd)
        self.llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_ctx, verbose=False)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {mmproj}")
        self.marker = mtmd.mtmd_default_marker().decode()
        self.template = self.llm.metadata["tokenizer.chat_template"]
        self.eos = self.llm.token_eos()

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def prompt(self, question: str, images: int = 1) -> str:
        """llama-mtmd-cli's way: a marker per image after the question; the template moves them where training had
        them."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        content = question + self.marker * images
        return ImmutableSandboxedEnvironment().from_string(self.template).render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def answer(self, image: str | Path | list, question: str, max_new_tokens: int = 32) -> dict:
        """{'text', 'prompt_ids' (text ids; None where an image's positions are), 'first_logits' (the next-token
        logits after the prompt), 'new_tokens', timings}. `image`: one file, or a list of 0 or more."""
        mtmd, lc = self.mtmd, self.lc
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        files = image if isinstance(image, list) else [image]
        loaded = []
        chunks = mtmd.mtmd_input_chunks_init()
        prompt_ids: list[int | None] = []
        t0 = time.perf_counter()
        try:
            for f in files:
                loaded.append(mtmd.mtmd_helper_bitmap_init_from_file(self.ctx, str(f).encode(), False))
                if not loaded[-1]:
                    raise RuntimeError(f"llama.cpp could not read {f}")
            text = mtmd.mtmd_input_text()
            raw = self.prompt(question, len(files)).encode()
            text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * len(files))(*loaded)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, len(files)) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids = [ptr[j] for j in range(n.value)]
                    prompt_ids += ids
                    self.llm.eval(ids)
                else:
                    n_img = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    new_past = lc.llama_pos(0)
                    rc = mtmd.mtmd_helper_eval_chunk_single(self.ctx, self.llm._ctx.ctx, chunk,
                                                            lc.llama_pos(self.llm.n_tokens), lc.llama_seq_id(0),
                                                            self.llm.n_batch, True, ctypes.byref(new_past))
                    if rc != 0:
                        raise RuntimeError(f"image evaluation failed ({rc})")
                    prompt_ids += [None] * n_img
                    self.llm.n_tokens = new_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for b in loaded:
                mtmd.mtmd_bitmap_free(b)
        t1 = time.perf_counter()
        out: list[int] = []
        n_vocab, first = self.llm.n_vocab(), None
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(n_vocab,))
            first = logits.copy() if first is None else first
            tok = int(np.argmax(logits))
            if tok == self.eos:
                break
            out.append(tok)
            self.llm.eval([tok])
        t2 = time.perf_counter()
        text_out = self.llm.detokenize(out).decode("utf-8", errors="replace").strip()
        return {"text": text_out, "prompt_ids": prompt_ids, "first_logits": first, "new_tokens": len(out),
                "prompt_seconds": t1 - t0, "gen_seconds": t2 - t1}


def padded_images(run_dir: Path, heldout: list[dict], image_folder: Path, dest: Path) -> dict[str, Path]:
    """Each held-out image as `qilin-lite image --model RUN` writes it (the run's squaring rule), by name."""
    from qilin_lite.serve.image_file import prepare_image

    out = {}
    for r in heldout:
        if r["image"] not in out:
            out[r["image"]] = prepare_image([image_folder / r["image"]], dest / f"{len(out):05d}.png",
                                            model=str(run_dir))
    return out


def question(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def names_only(answer: str, record: dict) -> bool:
    """The demo's scoring rule: the answer names the reference option and no other."""
    return record["answer"] in answer and not any(c in answer for c in record["choices"] if c != record["answer"])


def chat_answers(run_dir: Path, heldout: list[dict], images: dict[str, Path], max_new_tokens: int = 32) -> list[str]:
    """`qilin-lite chat --temperature 0` on the same PNGs (its Generator, float32)."""
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(run_dir), dtype="float32", max_new_tokens=max_new_tokens, temperature=0.0, attn="sdpa")
    # chat puts the image at the front of the first turn: `<image>\n` + question
    return [gen.answer([str(images[r["image"]])], "<image>\n" + question(r)) for r in heldout]


# bytes per block and weights per block of the GGML types the exports use (ggml's own table, gguf.GGML_QUANT_SIZES)
def _bytes(n: int, qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return n // block * size


def llm_tensor_types(n_layer: int, quant: str) -> dict[str, str]:
    """llama.cpp's choice per LLaMA tensor for a file type (llama-quant.cpp's rules for these three types)."""
    def more_bits(i: int) -> bool:  # llama.cpp's use_more_bits: first and last eighth, and every third between
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    base = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K"}[quant]
    types = {"token_embd": base, "output": "Q6_K" if quant == "q4_k_m" else base}
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{t}"] = base
        for t in ("attn_v", "ffn_down"):
            types[f"blk.{i}.{t}"] = "Q6_K" if quant == "q4_k_m" and more_bits(i) else base
    return types


def expected_bytes(vocab: int, hidden: int, ff: int, n_layer: int, quant: str) -> int:
    """Tensor bytes of a LLaMA GGUF (metadata adds about a megabyte of vocabulary on top)."""
    shapes = {"token_embd": vocab * hidden, "output": vocab * hidden}
    for i in range(n_layer):
        shapes.update({f"blk.{i}.{t}": hidden * hidden for t in ("attn_q", "attn_k", "attn_v", "attn_output")})
        shapes.update({f"blk.{i}.{t}": hidden * ff for t in ("ffn_gate", "ffn_up", "ffn_down")})
    types = llm_tensor_types(n_layer, quant)
    norms = (2 * n_layer + 1) * hidden * 4  # f32
    return sum(_bytes(n, types[k]) for k, n in shapes.items()) + norms


def expected_mmproj_bytes(hidden: int = 1024, ff: int = 4096, layers_used: int = 23, patch: int = 14,
                          positions: int = 577, llm_hidden: int = 5120) -> int:
    """CLIP ViT-L/14-336 up to layer -2 (23 of 24 blocks) + the mlp2x_gelu projector, f16 matrices, f32 vectors."""
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * ff) + 4 * (4 * hidden + ff + hidden + 4 * hidden)
    embeddings = 2 * hidden * 3 * patch * patch + 4 * (positions * hidden + hidden + 2 * hidden)
    projector = 2 * (hidden * llm_hidden + llm_hidden * llm_hidden) + 4 * 2 * llm_hidden
    return layers_used * per_layer + embeddings + projector


def qilin_13b_sizes() -> dict[str, float]:
    """Qilin-Med-VL's LLaMA-2 13B (vocabulary 32,000 + <image>) and CLIP ViT-L/14-336, in GB (1e9 bytes)."""
    out = {q: expected_bytes(32001, 5120, 13824, 40, q) / 1e9 for q in ("f16", "q8_0", "q4_k_m")}
    out["mmproj_f16"] = expected_mmproj_bytes() / 1e9
    return {k: round(v, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--limit", type=int, default=0, help="first N held-out questions (0: all)")
    args = ap.parse_args(argv)
    result = run(args.demo_out, args.quants, args.limit)
    result["qilin_13b_expected_gb"] = qilin_13b_sizes()
    print(json.dumps(result, indent=2, ensure_ascii=False))


def run(demo_out: Path, quants: list[str], limit: int = 0) -> dict:
    import tempfile

    from qilin_lite.export import export_gguf

    run_dir = demo_out / "tune"
    heldout = json.loads((demo_out / "data" / "heldout.json").read_text(encoding="utf-8"))
    heldout = heldout[:limit] if limit else heldout
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = padded_images(run_dir, heldout, demo_out / "data" / "images", Path(tmp) / "images")
        reference = chat_answers(run_dir, heldout, images)
        for q in quants:
            ex = export_gguf(run_dir, Path(tmp) / q, quant=q)
            m = LlamaCppLlava(ex.model, ex.mmproj)
            answers, gen_tok, gen_s, prompt_tok, prompt_s = [], 0, 0.0, 0, 0.0
            for r in heldout:
                a = m.answer(images[r["image"]], question(r))
                answers.append(a["text"])
                gen_tok, gen_s = gen_tok + a["new_tokens"], gen_s + a["gen_seconds"]
                prompt_tok, prompt_s = prompt_tok + len(a["prompt_ids"]), prompt_s + a["prompt_seconds"]
            m.close()
            rows[q] = {
                "llm_bytes": ex.model.stat().st_size, "mmproj_bytes": ex.mmproj.stat().st_size,
                "agree_with_chat": float(np.mean([a == b for a, b in zip(answers, reference)])),
                "accuracy": float(np.mean([names_only(a, r) for a, r in zip(answers, heldout)])),
                "prompt_tokens_per_s": round(prompt_tok / max(prompt_s, 1e-9), 1),
                "gen_tokens_per_s": round(gen_tok / max(gen_s, 1e-9), 1),
            }
    chat_accuracy = float(np.mean([names_only(a, r) for a, r in zip(reference, heldout)]))
    return {"questions": len(heldout), "chat_accuracy": chat_accuracy, "exports": rows}


if __name__ == "__main__":
    main()
