"""`qilin-lite merge RUN_DIR OUT_DIR`: a trained run -> one standalone transformers Llava directory.

In:  a lora or qlora run (a base + a peft adapter that also holds the trained projector) or an align run (a base +
     projector.safetensors), as `qilin-lite align` / `tune` wrote it.
Out: OUT_DIR with safetensors shards, config, generation config, tokenizer, image processor and a LlavaProcessor
     carrying the run's chat template, plus qilin.json (kind "merged", the run's template and image mode).
     Plain `LlavaForConditionalGeneration.from_pretrained(OUT_DIR)` + `AutoProcessor` load it, as do `transformers
     serve` and `qilin-lite chat --model OUT_DIR`; vLLM reads the tower under other names (`export vllm` writes
     those, export/vllm.py).

QLoRA: the adapter was trained against NF4 weights, but the merge folds it into the base reloaded unquantized, in the
run's dtype. Dequantizing the 4-bit weights instead would bake their rounding error into every merged weight.
(peft computes each LoRA delta in float32 on the CPU and casts once when adding it.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError
from .weights import check_safetensors

log = logging.getLogger(__name__)

STANDALONE = ("base", "full", "merged")
PROVENANCE = ("recipe.yaml", "train_summary.json")  # copied beside the weights so the result still describes itself


def run_dtype(run_dir: Path, base: str | None) -> str:
    """The dtype the run trained in: its recipe's model.dtype, else the base's saved dtype, else bfloat16."""
    import yaml

    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        dtype = ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}).get("dtype")
        if dtype:
            return str(dtype)
    if base and (Path(base) / "config.json").is_file():
        cfg = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        if dtype in ("bfloat16", "float16", "float32"):
            return dtype
    return "bfloat16"


def check_out_dir(out_dir: Path, *sources: Path) -> None:
    out = out_dir.resolve()
    for src in sources:
        if out == src.resolve():
            raise UserError(f"{out_dir}: the output directory must differ from the input {src}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; choose a new directory or remove it")


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
              max_shard_size: str = "5GB", base: str | Path | None = None, trust_base: bool = False) -> Path:
    """Fold the run's adapter (lora/qlora) or projector (align) into its base; write OUT_DIR; return it.

    `base`: the base to fold into when it no longer lies where qilin.json says; either way it must be the one the
    run recorded training on, unless `trust_base`."""
    from .device import placement
    from .model import (
        PROJECTOR_FILE,
        RunInfo,
        load_vlm,
        load_projector,
        load_tokenizer_and_processor,
        resolve_base,
        save_processor,
    )

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = RunInfo.load(run_dir) if run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{run_dir}: not a qilin-lite run directory (no qilin.json); pass the output of align or tune")
    if info.kind in STANDALONE:
        raise UserError(f"{run_dir}: a {info.kind} directory is already a standalone Llava model; use it as it is")
    if info.kind not in ("align", "lora", "qlora"):
        raise UserError(f"{run_dir}: cannot merge a run of kind '{info.kind}' (expected align, lora or qlora)")
    check_out_dir(out_dir, run_dir)
    base = str(base) if base else resolve_base(run_dir, info)
    checked = check_base(run_dir, info, base, trust_base)  # before the load: a wrong base costs no time
    dtype = dtype or run_dtype(run_dir, base)

    check_safetensors(run_dir, "run weights")  # a truncated adapter or projector: one line, before a long load
    log.info("loading %s unquantized (%s) and folding in %s", base, dtype, run_dir)
    where = placement(dtype=dtype, attn="sdpa")  # on a GPU when there is one: no CPU copy of the base first
    model = load_vlm(base, bits=None, dtype=where.dtype, attn=where.attn, device_map=where.device_map)
    if not checked and not check_base(run_dir, info, base, trust_base):  # a hub id is in the cache now
        log.warning("%s: no safetensors weights to check against the base %s was trained on; merged unchecked",
                    base, run_dir)
    if info.kind != "align" and not (run_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: adapter_config.json missing; was the {info.kind} run interrupted "
                        "before saving?")
    try:
        if info.kind == "align":
            load_projector(model, run_dir / PROJECTOR_FILE)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload()
    except RuntimeError as e:  # torch's "size mismatch for NAME: ..." list: a base of other sizes
        found = re.search(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                          r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", str(e))
        if found is None:
            raise
        name, trained, here = found.groups()
        raise UserError(f"{base}: its shapes do not fit {run_dir} ({name} is {here} here, {trained} in the run); "
                        f"pass --base with the model the run was trained on (qilin.json names {info.base})") from None
    leftovers = [n for n in model.state_dict() if "lora_" in n or "modules_to_save" in n or "base_layer" in n]
    if leftovers:  # a peft change in how it unloads would otherwise ship adapter tensors silently
        raise RuntimeError(f"merge left peft tensors in the model, e.g. {leftovers[:3]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tok, ip = load_tokenizer_and_processor(str(run_dir))
    save_processor(out_dir, tok, ip, model.config, info.template)
    RunInfo(kind="merged", base=None, template=info.template, image_mode=info.image_mode).save(out_dir)
    for name in PROVENANCE:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    return out_dir


def check_base(run_dir: Path, info, base: str, trust: bool) -> bool:
    """Refuse a base other than the one the run recorded training on (base_identity.py); False when the base's
    weights cannot be read to tell (a hub id not downloaded yet), True when checked or there is nothing to check."""
    from .base_identity import differs, identify
    from .model import resolve_base

    if trust:
        log.warning("--trust-base: merging onto %s without checking it is the base %s was trained on", base, run_dir)
        return True
    if not isinstance(info.base_identity, dict):
        log.warning("%s records no identity of the base it was trained on (written before qilin-lite recorded it); "
                    "merging onto %s unchecked", run_dir, base)
        return True
    now = identify(base)
    if now is None:
        return False
    reason = differs(info.base_identity, now)
    if reason is None:
        return True
    # sizes that differ cannot merge at all; other differences could be a base saved again under new names
    override = "" if re.search(r" is \S+ here", reason) else ", or --trust-base to merge anyway"
    where = f"qilin.json names {info.base}" if base != resolve_base(run_dir, info) else "it changed since training"
    raise UserError(f"{base}: not the base {run_dir} was trained on ({reason}; {where}); pass --base with the model "
                    f"it was trained on{override}")


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_command(
        run_dir: Annotated[Path, typer.Argument(help="align, lora or qlora output directory")],
        out_dir: Annotated[Path, typer.Argument(help="new directory for the standalone Llava model")],
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16 | float16 | float32 (default: the run's)")] = None,
        max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="largest safetensors shard")] = "5GB",
        base: Annotated[Optional[str], typer.Option("--base", help="the base the run was trained on, when it no "
                                                    "longer lies where the run's qilin.json says")] = None,
        trust_base: Annotated[bool, typer.Option("--trust-base", help="merge onto the base even if it is not the "
                                                 "one the run recorded training on")] = False,
    ):
        """Fold a run's LoRA adapter and trained projector into the base: one standalone transformers directory."""
        done = merge_run(run_dir, out_dir, dtype=dtype, max_shard_size=max_shard_size, base=base,
                         trust_base=trust_base)
        typer.echo(f"merged: {done}  (next: qilin-lite chat IMAGE --model {done})")
