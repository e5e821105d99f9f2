"""`qilin-lite export vllm RUN_DIR OUT_DIR`: a trained model -> one directory vLLM serves as it is.

In:  any directory `chat` accepts that chats in a dialog template: a lora / qlora run (merged first, unquantized, as
     `merge` does), or a full, merged, converted or base directory. Families: the Llava-built ones (LLaVA-1.5,
     HuatuoGPT-Vision, Qwen2 chat LLMs behind a CLIP or SigLIP tower) and Qwen2.5-VL.
Out: OUT_DIR with safetensors weights under the names vLLM's loader reads, config.json, a generation_config.json
     whose end tokens are chat's, the tokenizer, the image processor (and Llava's LlavaProcessor), the run's chat
     template, README.md (the serve command, a request), and qilin.json (kind "merged"), so `qilin-lite chat
     --model OUT_DIR` and transformers still load it.

Why the merge output is not enough (checked with vLLM 0.32.0, CPU build, in its own venv):
- Llava: transformers 5 saves the vision tower as `vision_tower.embeddings...`; vLLM's LlavaForConditionalGeneration
  builds vLLM's own CLIPVisionModel / SiglipVisionModel, which keep the tower under `.vision_model`
  (`vision_tower.vision_model.embeddings...`, the layout transformers 4 wrote), and refuses the merge output with
  "There is no module or parameter named 'vision_tower.embeddings'". The weights are renamed (VLLM_LLAVA_KEYS).
- vLLM renders the chat template and tokenizes the text without special tokens; training's prompt starts with the
  BOS a LLaMA tokenizer adds itself. The export checks which template (the run's, or the run's after
  `{{ bos_token }}`) vLLM's tokenization turns into training's prompt (served_chat_template); where neither does,
  requests must send `"add_special_tokens": true` (said in the log and OUT_DIR/README.md).
- A LoRA run cannot be served as base + adapter: vLLM takes adapters with `modules_to_save` None only, and the
  trained projector is exactly that. The export is merged weights.
Qwen2.5-VL: `merge` writes the releases' own names (`model.*`, `visual.*`, `lm_head.*`), which vLLM's
Qwen2_5_VLForConditionalGeneration maps itself: the weights are copied unchanged. Other families (Gemma 3,
Qwen3-VL) are refused: not checked with vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

# Llava weight names as transformers saves them -> the names vLLM's Llava loader reads (vllm/model_executor/models/
# llava.py and clip.py / siglip.py, vLLM 0.32.0). The first prefix that matches renames the key. The tower row is the
# one that matters: transformers 5 drops CLIPVisionModel's `vision_model.` level (its conversion_mapping's
# PrefixChange), vLLM's tower module keeps it. The `model.*` rows are transformers >= 4.52's in-memory names, which
# vLLM would map itself; written out in one layout, the export reads the same whichever transformers saved it.
VLLM_LLAVA_KEYS = (
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
VLLM_TOWERS = ("clip_vision_model", "siglip_vision_model")  # towers vLLM's Llava builds with a `vision_model` level
AS_SAVED = ("Qwen2_5_VLForConditionalGeneration",)  # vLLM maps merge's names itself
WEIGHT_INDEX = "model.safetensors.index.json"


def vllm_key(name: str) -> str:
    """A Llava weight's name in vLLM's layout (VLLM_LLAVA_KEYS)."""
    for old, new in VLLM_LLAVA_KEYS:
        if name.startswith(old):
            return new + name[len(old):]
    raise UserError(f"weight {name}: not a Llava weight name this export knows (language_model., vision_tower., "
                    "multi_modal_projector.); export a model qilin-lite trained or converted")


def check_vllm_exportable(config: dict, run_dir: Path):
    """How the model's weight names become vLLM's (a function, or None: as saved); refuses, in one line, a model
    whose family vLLM was not checked to load from this export."""
    from ..families import LLAVA, family_of_config

    family = family_of_config(config)
    if family.model_class in AS_SAVED:
        return None
    if family.model_class != LLAVA.model_class:
        raise UserError(f"{run_dir}: export vllm writes Llava and Qwen2.5-VL models; vLLM serving of the "
                        f"{family.name} family is not checked here (use `qilin-lite merge` and try vLLM on it)")
    tower = (config.get("vision_config") or {}).get("model_type")
    if tower not in VLLM_TOWERS:
        raise UserError(f"{run_dir}: its vision tower is {tower!r}; export vllm writes Llava models with a CLIP or "
                        "SigLIP tower, the ones vLLM's Llava loader builds")
    return vllm_key


def _weight_files(model_dir: Path) -> list[str]:
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{model_dir}: no safetensors weights (model.safetensors or {WEIGHT_INDEX}); export vllm reads "
                    "what merge, tune --full or convert wrote")


def write_weights(model_dir: Path, out: Path, rename) -> None:
    """Copy the safetensors shards into `out`, each key through `rename` (None: unchanged); one shard in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for name in _weight_files(model_dir):
        if rename is None:
            shutil.copy2(model_dir / name, out / name)
            continue
        with safe_open(str(model_dir / name), framework="pt") as f:
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out / name, 0o666 & ~umask)  # as a copy would be, not the private mode safetensors writes
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        if rename is not None:
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        (out / WEIGHT_INDEX).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


PROBE = ("图像中可见什么？", "请描述图像。", "正常。")  # a first question, and a second turn after an answer


def served_prompt_is_trained(tokenizer, template, layout, jinja: str, add_special_tokens: bool) -> bool:
    """Whether vLLM's prompt is training's: vLLM renders `jinja` over the OpenAI parts (an image part + text) and
    tokenizes the text (without special tokens, unless a request asks), then expands each image token itself; so
    the two agree with image tokens left out. Checked on a first turn and on a second one."""
    from ..encoding import prompt_ids

    first, earlier, answer = PROBE
    ours_turns = ([{"role": "user", "content": "<image>\n" + first}],
                  [{"role": "user", "content": "<image>\n" + earlier}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": first}])
    image = [{"type": "image"}]
    served_turns = ([{"role": "user", "content": image + [{"type": "text", "text": first}]}],
                    [{"role": "user", "content": image + [{"type": "text", "text": earlier}]},
                     {"role": "assistant", "content": answer}, {"role": "user", "content": first}])
    for ours, served in zip(ours_turns, served_turns):
        want = [t for t in prompt_ids(ours, template, tokenizer, layout).tolist() if t != layout.image_token_id]
        text = tokenizer.apply_chat_template(served, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        got = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if [t for t in got if t != layout.image_token_id] != want:
            return False
    return True


def served_chat_template(template, tokenizer, layout) -> tuple[str, bool]:
    """(the chat template to save, whether each request must send `"add_special_tokens": true`) so that vLLM
    prompts the model as training did. vLLM tokenizes the rendered template without special tokens; training's
    prompt starts with the BOS a LLaMA tokenizer adds itself. A SentencePiece LLaMA tokenizer reads a `<s>` written
    by the template as that BOS, and the template starts with `{{ bos_token }}`; a tokenizer that would then split
    the first word otherwise (a Metaspace BPE that adds its space only at the start of the text) keeps the run's
    template, and requests ask vLLM to add the BOS."""
    jinja = template.chat_template_jinja()
    tries = [(jinja, False)]
    if tokenizer.bos_token and not jinja.startswith("{{ bos_token }}"):
        tries.append(("{{ bos_token }}" + jinja, False))
    tries.append((jinja, True))
    for candidate, special in tries:
        if served_prompt_is_trained(tokenizer, template, layout, candidate, special):
            if special:
                log.warning("vLLM drops this tokenizer's BOS from chat prompts: send \"add_special_tokens\": true "
                            "with each chat request (OUT_DIR/README.md), or its prompts are not training's")
            return candidate, special
    log.warning("vLLM will tokenize this model's prompt otherwise than training did; compare an answer with "
                "`qilin-lite chat` before serving it")
    return jinja, False


def export_readme(out_dir: Path, add_special_tokens: bool, image_mode: str) -> str:
    extra = ',\n  "add_special_tokens": true' if add_special_tokens else ""
    why = ("\nSend `add_special_tokens: true` with each chat request: vLLM leaves the BOS out of chat prompts, and "
           "with this tokenizer the chat template cannot write it.\n" if add_special_tokens else "")
    images = ("Images: vLLM's image processor resizes the shorter side and crops the centre; training padded each "
              "image to a square first. A square image (what `qilin-lite image` writes) is the same either way.\n"
              if image_mode == "pad" else "")
    return (f"# {out_dir.name}: for vLLM\n\nWritten by `qilin-lite export vllm`: merged weights in the names "
            "vLLM's loader reads, the run's chat template.\n\n"
            f"    python -m vllm.entrypoints.openai.api_server --model {out_dir}\n\n"
            "Ask as an OpenAI chat completion, the image as an `image_url` part (a data URL or a URL):\n\n"
            '    {"model": "...", "temperature": 0, "messages": [{"role": "user", "content": [\n'
            '      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},\n'
            f'      {{"type": "text", "text": "..."}}]}}]{extra}}}\n{why}\n{images}')


def _generation_config(model_dir: Path, tokenizer, template) -> dict:
    """The saved generation config, its end tokens chat's (the tokenizer's + the template's stops) and the
    template's generation defaults (vLLM reads repetition_penalty & co. from it as request defaults)."""
    f = model_dir / "generation_config.json"
    cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    stops = [tokenizer.eos_token_id]
    for t in template.stop:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in stops:
            stops.append(tid)
    cfg["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    cfg.update(dict(template.generation))
    return cfg


def _writable(out_dir: Path) -> bool:
    """Create OUT_DIR, checking files can be made in it before any work; whether it was created here."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    except OSError as e:
        if created and out_dir.is_dir():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise UserError(f"{out_dir}: cannot write the export here ({e.strerror}); choose an OUT_DIR you can write "
                        "to") from None
    return created


def export_vllm(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write OUT_DIR, a directory `vllm serve OUT_DIR` loads, for the model in RUN_DIR; return OUT_DIR."""
    from transformers import AutoConfig

    from ..families import get_template
    from ..merge import PROVENANCE, STANDALONE, check_out_dir, merge_run
    from ..model import RunInfo, load_tokenizer_and_processor, resolve_base, save_processor, token_layout

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = RunInfo.load(run_dir) if run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{run_dir}: not a qilin-lite model directory (no qilin.json); pass what tune, merge or "
                        "convert wrote")
    check_out_dir(out_dir, run_dir)
    template = get_template(info.template)
    if not template.dialog:
        raise UserError(f"{run_dir}: trained with the '{info.template}' template (an align run captions images); "
                        "export a tune run, or a merged / converted model, which chat in a dialog template")
    standalone = info.kind in STANDALONE + ("converted",)
    config_dir = run_dir if standalone else Path(resolve_base(run_dir, info))
    if not (config_dir / "config.json").is_file():
        raise UserError(f"{config_dir}: no config.json; export needs the model's (or, for a run, its base's) "
                        "directory on this machine")
    config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    rename = check_vllm_exportable(config, run_dir)  # before a merge that takes minutes at 13B
    created = _writable(out_dir)
    try:
        # built inside OUT_DIR/.export-*/ and moved out only when whole: vLLM never finds half an export
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            model_dir = run_dir
            if not standalone:
                log.info("merging %s (%s) before export", run_dir, info.kind)
                model_dir = merge_run(run_dir, Path(tmp) / "merged")
            staged = Path(tmp) / "out"
            staged.mkdir()
            write_weights(model_dir, staged, rename)
            shutil.copy2(model_dir / "config.json", staged / "config.json")
            tok, ip = load_tokenizer_and_processor(str(model_dir))
            loaded = AutoConfig.from_pretrained(str(model_dir))
            save_processor(staged, tok, ip, loaded, info.template)
            layout = token_layout(loaded, max_length=10**9)
            jinja, special = served_chat_template(template, tok, layout)
            (staged / "chat_template.jinja").write_text(jinja, encoding="utf-8")
            (staged / "README.md").write_text(export_readme(out_dir, special, info.image_mode), encoding="utf-8")
            (staged / "generation_config.json").write_text(
                json.dumps(_generation_config(model_dir, tok, template), indent=2) + "\n", encoding="utf-8")
            RunInfo(kind="merged", base=None, template=info.template, image_mode=info.image_mode).save(staged)
            for name in PROVENANCE:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, staged / name)
            for f in sorted(staged.iterdir()):
                os.replace(f, out_dir / f.name)  # a rename: needs no space
    except BaseException:
        if created:  # nothing half-written is left to look like an export
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir
