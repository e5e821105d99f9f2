"""GGUF export on the CPU: file sizes, llama.cpp's tokens/s, and its answers against `qilin-lite chat`'s.

    python benchmarks/gguf_vs_chat.py DEMO_OUT [--quants f16 q8_0 q4_k_m]

DEMO_OUT is a finished `qilin-lite demo` directory. Each quant is exported from DEMO_OUT/tune, loaded in llama.cpp
(llama-cpp-python's binding of libllama + libmtmd), and asked the demo's held-out questions greedily on the images
the run's ImageLoader makes (padded to the tower's size). Prints one table: size, prompt and generation tokens/s,
agreement with qilin-lite chat's greedy answers, and accuracy. llama.cpp is driven by harness/llama_cpp.py's
`LlamaCppLlava`, which tests/test_gguf.py runs too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/gguf_vs_chat.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.llama_cpp import LlamaCppLlava  # noqa: E402


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
