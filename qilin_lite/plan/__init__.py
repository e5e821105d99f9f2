"""Memory planner: a recipe -> per-GPU memory estimate, whether it fits, and the smallest change that makes it fit.

One step a module: shapes.py (parameter counts and shapes from configs, on the meta device), native.py (the same
for models in their own class, Qwen2.5-VL and Gemma 3, and the image tokens an image's size becomes), source.py (the
model a recipe trains, as a config, nothing downloaded), settings.py (what the
estimate depends on besides the shape; bytes per stored parameter), estimate.py (bytes per component at the step's
peak, and what is modelled), verdict.py (fits? the smallest change that fits), cli.py (`qilin-lite plan`: from a
recipe, out as a table or JSON).
"""

from .cli import format_plan, parse_memory, plan_recipe, plan_to_dict, register
from .estimate import Estimate, estimate, layer_activation_bytes
from .settings import DTYPE_BYTES, Settings, int8_bytes, nf4_bytes, settings_from_recipe
from .shapes import CLIP_VIT_L14_336, KNOWN_LLM, KNOWN_VISION, LLAMA2_13B, GiB, Shape, count_parameters, llava_config
from .verdict import Plan, Suggestion, fits, make_plan, suggest

__all__ = ["CLIP_VIT_L14_336", "DTYPE_BYTES", "Estimate", "GiB", "KNOWN_LLM", "KNOWN_VISION", "LLAMA2_13B", "Plan",
           "Settings", "Shape", "Suggestion", "count_parameters", "estimate", "fits", "format_plan", "int8_bytes",
           "layer_activation_bytes", "llava_config", "make_plan", "nf4_bytes", "parse_memory", "plan_recipe",
           "plan_to_dict", "register", "settings_from_recipe", "suggest"]
