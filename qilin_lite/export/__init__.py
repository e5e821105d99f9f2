"""`qilin-lite export gguf RUN_DIR OUT_DIR`: a trained model -> two GGUF files llama.cpp and Ollama run on a CPU.
(`qilin-lite export vllm RUN_DIR OUT_DIR`, a directory vLLM serves, is described in vllm.py.)

In:  any directory `chat` accepts: a lora / qlora / align run (merged first, unquantized, as `merge` does) or a full,
     merged, converted or base Llava directory. The LLM must be LLaMA-shaped with LLaMA's SentencePiece
     `tokenizer.model` (Qilin-Med-VL's is), the vision tower CLIP, the projector mlp2x_gelu (LLaVA-1.5's shape).
Out: OUT_DIR/<name>-<quant>.gguf     the language model, its tokenizer (pieces, scores, types from tokenizer.model)
                                     and a chat template that places the image as training did;
     OUT_DIR/mmproj-<name>-f16.gguf  the CLIP tower up to the feature layer the run used (layer -2, CLS dropped) +
                                     the projector, with the run's image mean/std and image rule;
     OUT_DIR/Modelfile               for `ollama create` (vicuna_v1 template, system prompt, `</s>` stop, notice);
     OUT_DIR/README.md               the llama.cpp command line and what differs from `qilin-lite chat`.

Writing uses `gguf` (the format's own Python writer); the tensors go out one at a time, so the memory needed is one
tensor, not the model. q8_0 / q4_k_m are made from the f16 file by llama.cpp's own quantizer (llama-cpp-python's
binding, or a `llama-quantize` binary on PATH). Nothing is downloaded.

What llama.cpp does differently (said in OUT_DIR/README.md):
- Images: llama.cpp's LLaVA-1.5 path resizes the longer side to the tower's size and pads with CLIP's mean colour;
  training padded to a square first, then resized. An image already padded to the tower's size (what
  `qilin-lite image` writes) passes through llama.cpp unchanged, so the pixels equal training's.
- The projector's GELU is ggml's tanh approximation; training used the exact (erf) one.
"""

from .cli import export_gguf, model_name, register
from .vllm import VLLM_LLAVA_KEYS, export_vllm, vllm_key
from .gguf import check_exportable, vision_layers_used, write_llm, write_mmproj
from .quantize import QUANTS, find_quantizer, quantize
from .templates import NOTICE, export_readme, ollama_modelfile

__all__ = ["NOTICE", "QUANTS", "check_exportable", "export_gguf", "export_readme",
           "find_quantizer", "model_name", "ollama_modelfile", "quantize", "register",
           "VLLM_LLAVA_KEYS", "export_vllm", "vision_layers_used", "vllm_key", "write_llm", "write_mmproj"]
