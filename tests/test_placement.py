"""Every device decision, made on this CPU machine as it would be on a GPU.

`fake_gpu` makes qilin-lite believe a bf16 CUDA GPU with flash-attn is present and records what each command asks
`from_pretrained` for (device map, dtype, attention, quantization); the load itself then runs on this CPU. Every
command that loads a model is checked: chat, web, eval, the demo's scoring, merge, export, align/tune's load, and
the planner's assumption. A loader that materialises the model on the CPU (no device map) or picks another dtype or
attention fails here.
"""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_recipe
from transformers import LlavaForConditionalGeneration

GPU = {"": 0}  # the weights load straight onto GPU 0


@pytest.fixture
def fake_gpu(monkeypatch):
    import peft.peft_model
    import peft.utils.save_and_load

    rec = SimpleNamespace(loads=[])
    real_available, real_find = torch.cuda.is_available, importlib.util.find_spec
    real_load = LlavaForConditionalGeneration.from_pretrained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real_find(n, *a))
    for module in (peft.peft_model, peft.utils.save_and_load):  # peft reads adapters onto the base's device: here
        monkeypatch.setattr(module, "infer_device", lambda: "cpu")

    def recording(path, *args, **kwargs):
        quant = kwargs.get("quantization_config")
        rec.loads.append({"device_map": kwargs.get("device_map"), "dtype": kwargs.get("dtype"),
                          "attn": kwargs.get("attn_implementation"),
                          "bits": None if quant is None else (4 if quant.load_in_4bit else 8)})
        kwargs.pop("device_map", None)
        kwargs["attn_implementation"] = "sdpa"  # what this CPU can run
        monkeypatch.setattr(torch.cuda, "is_available", real_available)  # the load itself happens here
        try:
            return real_load(path, *args, **kwargs)
        finally:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", recording)
    return rec


def on_gpu(dtype=torch.bfloat16, attn="flash_attention_2", bits=None):
    return {"device_map": GPU, "dtype": dtype, "attn": attn, "bits": bits}


def test_chat_loads_onto_the_gpu_in_bf16_with_flash_attention(fake_gpu, lora_run):
    from qilin_lite.serve.chat_session import ChatSession

    ChatSession.load(str(lora_run))
    assert fake_gpu.loads == [on_gpu()]


def test_chat_4bit_is_placed_by_its_loader_on_the_gpu(fake_gpu, qlora_run):
    from qilin_lite.serve.chat_session import ChatSession

    ChatSession.load(str(qlora_run), bits=4)
    assert fake_gpu.loads == [on_gpu(bits=4)]


def test_chat_flags_are_honoured(fake_gpu, full_run):
    from qilin_lite.serve.chat_session import ChatSession

    ChatSession.load(str(full_run), dtype="float16", attn="sdpa")
    assert fake_gpu.loads == [on_gpu(torch.float16, "sdpa")]


def test_web_loads_as_chat_does(fake_gpu, lora_run, monkeypatch):
    import uvicorn
    from conftest import free_port

    from qilin_lite.serve.web import serve

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))
    serve(str(lora_run), port=free_port())
    assert fake_gpu.loads == [on_gpu()] and served and served[0]["host"] == "127.0.0.1"


def test_eval_loads_onto_the_gpu(fake_gpu, lora_run):
    """Before the one loader, eval loaded in bf16 because CUDA was present and never left the CPU."""
    from qilin_lite.eval import model_generate

    model_generate(str(lora_run))
    assert fake_gpu.loads == [on_gpu()]


def test_demo_scoring_loads_onto_the_gpu_in_float32(fake_gpu, align_run, tmp_path):
    """The demo scores in float32 (as its CPU runs), on the GPU when there is one."""
    import json

    from PIL import Image

    from qilin_lite.eval import score_demo_heldout

    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    (tmp_path / "held.json").write_text(json.dumps([{"id": "1", "image": "a.png", "task": "side", "choices": ["左", "右"],
                                                     "answer": "左", "conversations": [
        {"from": "human", "value": "<image>\n哪侧？"}, {"from": "gpt", "value": "左"}]}], ensure_ascii=False))
    score_demo_heldout(align_run, tmp_path / "held.json", tmp_path, template="vicuna_v1")
    assert fake_gpu.loads == [on_gpu(torch.float32)]


def test_merge_folds_on_the_gpu_in_the_runs_dtype(fake_gpu, lora_run, tmp_path):
    from qilin_lite.merge import merge_run

    merge_run(lora_run, tmp_path / "merged")
    assert fake_gpu.loads == [on_gpu(torch.float32, "sdpa")]  # the tiny run trained in float32; merging needs no flash


def test_export_merges_through_the_same_placement(fake_gpu, demo_run, tmp_path):
    pytest.importorskip("gguf")
    from qilin_lite.export import export_gguf

    export_gguf(demo_run[0] / "tune", tmp_path / "gguf")
    assert fake_gpu.loads == [on_gpu(torch.float32, "sdpa")]


@pytest.mark.parametrize("mode, extra, expected", [
    ("lora", {}, on_gpu(torch.float32)),
    ("qlora", {}, on_gpu(torch.float32, bits=4)),
    ("full", {"model.dtype": "bfloat16"}, on_gpu(torch.bfloat16)),
    # DeepSpeed places (and ZeRO-3 shards) the weights itself: nothing goes to a GPU at load time
    ("full", {"train.deepspeed": "recipes/deepspeed/zero3.json"}, {**on_gpu(torch.float32), "device_map": None}),
    # ... but a 4-bit model is quantized while it loads, onto this process's GPU
    ("qlora", {"train.deepspeed": "recipes/deepspeed/zero2.json"}, on_gpu(torch.float32, bits=4)),
])
def test_training_loads_where_its_trainer_expects(fake_gpu, align_run, tiny_data, tmp_path, mode, extra, expected):
    from qilin_lite.train.stage import load_model

    recipe = tiny_recipe("tune", mode, tmp_path / "out", tiny_data["tune"], tiny_data["images"],
                         **{"model.from_run": str(align_run), "model.attn": "auto", **extra})
    load_model(recipe, tmp_path / "out")
    assert fake_gpu.loads == [expected]


def test_training_uses_its_local_rank(fake_gpu, tiny_base, tiny_data, tmp_path, monkeypatch):
    from qilin_lite.train.stage import load_model

    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's: the fourth process of this node trains on GPU 3
    recipe = tiny_recipe("align", "align", tmp_path / "out", tiny_data["align"], tiny_data["images"],
                         **{"model.base": str(tiny_base), "model.attn": "auto"})
    load_model(recipe, tmp_path / "out")
    assert fake_gpu.loads == [{**on_gpu(torch.float32), "device_map": {"": 3}}]


def test_the_planner_assumes_what_training_will_pick(fake_gpu):
    from qilin_lite.device import pick_attention
    from qilin_lite.plan import Settings

    s = Settings()
    assert (s.device, s.dtype) == ("cuda", "bfloat16")
    assert s.planned_attention == pick_attention("auto") == "flash_attention_2"


def test_inputs_follow_the_weights():
    """Generator sends the prompt and the pixels to the device (and dtype) its weights are on."""
    from qilin_lite.families import get_template
    from qilin_lite.serve.generate import Generator

    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(2, device="meta", dtype=torch.bfloat16))

        def generate(self, **kwargs):
            seen.update({k: (v.device.type, v.dtype) for k, v in kwargs.items() if torch.is_tensor(v)})
            return torch.ones(1, kwargs["input_ids"].shape[1] + 1, dtype=torch.long)

    class Tok:
        pad_token_id, eos_token_id = 0, 2

        def decode(self, ids, **kw):
            return "ok"

    class Images:  # images/pixel_values.ImageLoader's face to the generator
        def open(self, ref):
            return ref

        def counts(self, pil):
            return None

        def inputs(self, pil):
            return {"pixel_values": torch.zeros(len(pil), 3, 4, 4)}

    layout = SimpleNamespace(image_token_id=5, image_tokens=1, marks=None)
    gen = Generator(Model(), Tok(), Images(), get_template("vicuna_v1"), layout)
    gen.prompt_ids = lambda messages, counts=None: torch.tensor([1, 5, 7]).numpy()
    assert gen.generate([[{"role": "user", "content": "<image>\nQ"}]], [["x.png"]]) == ["ok"]
    assert seen["input_ids"][0] == seen["attention_mask"][0] == "meta"
    assert seen["pixel_values"] == ("meta", torch.bfloat16)
