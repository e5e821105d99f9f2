"""A GGUF language model + mmproj answering in llama.cpp (llama-cpp-python's binding of libllama + libmtmd).

Used by gguf_vs_chat.py and by the GGUF tests (tests/test_gguf.py, test_qwen.py, test_convert_huatuo.py).
"""

from __future__ import annotations

import ctypes
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

    def __init__(self, model: str | Path, mmproj: str | Path, n_ctx: int = 1024, threads: int = 2,
                 image_tokens: tuple[int, int] | None = None):
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
        if image_tokens:  # llama-mtmd-cli's --image-min-tokens / --image-max-tokens (export's Qwen2.5-VL README)
            params.image_min_tokens, params.image_max_tokens = image_tokens
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
        """llama-mtmd-cli's way: a prompt without a marker gets one per image in front of it; the template puts
        them where training had them."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        content = self.marker * images + question
        return ImmutableSandboxedEnvironment().from_string(self.template).render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def image_embedding(self, image: str | Path) -> np.ndarray:
        """mtmd's embedding of one image (what the LLM receives for it): (image tokens, the LLM's input width) floats,
        the width being the LLM's times 1 + DeepStack's layers for Qwen3-VL (their features follow the main one)."""
        mtmd = self.mtmd
        per_token = self.lc.llama_model_n_embd_inp(self.llm.model)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(self.ctx, str(image).encode(), False)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            raw = self.marker.encode()
            text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise RuntimeError("mtmd_tokenize failed")
            parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            chunk = next(c for c in parts if mtmd.mtmd_input_chunk_get_type(c) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self.ctx, chunk):
                raise RuntimeError("mtmd_encode_chunk failed")
            return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * per_token,)).reshape(
                n, per_token).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

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
