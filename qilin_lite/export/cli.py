"""`qilin-lite export gguf RUN_DIR OUT_DIR`: the steps in order (merge if needed, write, quantize, templates);
`qilin-lite export vllm RUN_DIR OUT_DIR`: registered here, written in vllm.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import gguf_gemma3, gguf_qwen_vl
from .gguf import Exported, Weights, check_exportable, write_llm, write_mmproj
from .quantize import QUANTS, find_quantizer, quantize
from .templates import export_readme, ollama_modelfile
from .vllm import export_vllm

log = logging.getLogger(__name__)


def model_name(run_dir: Path) -> str:
    import re

    name = re.sub(r"[^\w.-]+", "-", run_dir.resolve().name, flags=re.UNICODE).strip("-")
    return name or "model"


REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def cannot_write(out_dir: Path, e: OSError) -> UserError:
    return UserError(f"{out_dir}: cannot write the export here ({e.strerror}); choose an OUT_DIR you can write to")


def writable(out_dir: Path) -> bool:
    """Create OUT_DIR if needed and make sure files can be made in it, before any work (a 13B merge takes
    minutes); whether it was created here (then a failed export removes it)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    except OSError as e:
        if created and out_dir.is_dir():
            shutil.rmtree(out_dir, ignore_errors=True)
        if e.errno in REFUSED:
            raise cannot_write(out_dir, e) from None
        raise
    return created


def export_gguf(run_dir: str | Path, out_dir: str | Path, *, quant: str = "f16", name: str | None = None) -> Exported:
    """Write OUT_DIR's GGUF files, Modelfile and README for the model in RUN_DIR; return their paths."""
    import time

    from ..families import get_template
    from ..merge import STANDALONE, check_out_dir, merge_run
    from ..model import RunInfo, load_tokenizer_and_processor, resolve_base

    t0 = time.time()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if name is not None and (not name.strip(". ") or model_name(Path(name)) != name):  # a file name, never a path
        raise UserError(f"--name {name!r}: a name goes into the files' names and may hold letters, digits, '.', '_' "
                        f"and '-' only (e.g. --name {model_name(Path(name)) or 'model'})")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("export gguf writes with the `gguf` package: pip install 'qilin-lite[gguf]'") from None
    info = RunInfo.load(run_dir) if run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{run_dir}: not a qilin-lite model directory (no qilin.json); pass what align, tune, "
                        "merge or convert wrote")
    check_out_dir(out_dir, run_dir)
    quantizer = find_quantizer() if quant != "f16" else None
    if quant != "f16" and quantizer is None:  # before any work: a 13B merge takes minutes
        raise UserError(f"--quant {quant} uses llama.cpp's quantizer, which is not installed: "
                        "`pip install llama-cpp-python` (builds llama.cpp) or put llama-quantize on PATH; "
                        "or export --quant f16")
    name = name or model_name(run_dir)
    template = get_template(info.template)
    if not template.dialog:  # GGUF chat templates exist for dialog templates
        raise UserError(f"{run_dir}: trained with the '{info.template}' template (an align run captions images); "
                        "export a tune run, or a merged / converted model, which chat in a dialog template")
    standalone = info.kind in STANDALONE + ("converted",)
    # everything that can refuse is checked on the run's own files, before a merge that takes minutes at 13B
    config_dir = run_dir if standalone else Path(resolve_base(run_dir, info))
    if not (config_dir / "config.json").is_file():
        raise UserError(f"{config_dir}: no config.json; export needs the model's (or, for a run, its base's) "
                        "directory on this machine")
    # Qwen2.5-VL / Qwen3-VL and Gemma 3 have llama.cpp architectures of their own; every other exportable model is
    # LLaVA-1.5-shaped
    base_cfg = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    qwen, gemma = gguf_qwen_vl.is_qwen_vl(base_cfg), gguf_gemma3.is_gemma3(base_cfg)
    if gemma:
        gguf_gemma3.check_exportable(base_cfg, run_dir, (run_dir, config_dir))
    else:
        (gguf_qwen_vl.check_exportable if qwen else check_exportable)(base_cfg, run_dir)
    created = writable(out_dir)
    try:
        # everything is written inside OUT_DIR/.export-*/ and moved out only when whole: a full disk or a kill
        # leaves no GGUF under its final name (llama.cpp would load half of one)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            model_dir = run_dir
            if not standalone:
                log.info("merging %s (%s) before export", run_dir, info.kind)
                model_dir = merge_run(run_dir, Path(tmp) / "merged")
            cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            tok, ip = load_tokenizer_and_processor(str(model_dir))
            weights = Weights(model_dir, gguf_qwen_vl.PREFIXES if qwen else gguf_gemma3.PREFIXES if gemma else None)
            staged = Path(tmp) / "out"
            staged.mkdir()
            llm_f16 = staged / f"{name}-f16.gguf"
            if gemma:
                spm = gguf_gemma3.sentencepiece_file((model_dir, run_dir, config_dir))
                gguf_gemma3.write_llm(llm_f16, model_dir, cfg, weights, tok, template, name, spm)
            else:
                (gguf_qwen_vl.write_llm_qwen_vl if qwen else write_llm)(llm_f16, model_dir, cfg, weights, tok,
                                                                         template, name)
            model = staged / f"{name}-{quant}.gguf"
            if quant != "f16":
                quantize(llm_f16, model, quant, quantizer)
                llm_f16.unlink()
            mmproj = staged / f"mmproj-{name}-f16.gguf"
            files = [model, mmproj, staged / "README.md"]
            if gemma:
                gguf_gemma3.write_mmproj(mmproj, model_dir, cfg, weights, ip, name)
                text = gguf_gemma3.readme(model.name, mmproj.name, name, int(cfg["vision_config"]["image_size"]))
            elif qwen:
                gguf_qwen_vl.write_mmproj_qwen_vl(mmproj, model_dir, cfg, weights, ip, name)
                text = gguf_qwen_vl.readme(model.name, mmproj.name, name, gguf_qwen_vl.image_token_limits(ip), cfg)
            else:
                write_mmproj(mmproj, model_dir, cfg, weights, ip, info.image_mode, name)
                text = export_readme(model.name, mmproj.name, name, info.image_mode)
            (staged / "README.md").write_text(text, encoding="utf-8")
            if template.exports_ollama:
                (staged / "Modelfile").write_text(ollama_modelfile(model.name, mmproj.name, template),
                                                  encoding="utf-8")
                files.append(staged / "Modelfile")
            for f in files:
                os.replace(f, out_dir / f.name)  # a rename: needs no space
    except BaseException as e:
        if created:  # nothing half-written is left to look like an export
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in REFUSED:  # the directory turned read-only (a remount) mid-export
            raise cannot_write(out_dir, e) from None
        raise
    model_path, mmproj = out_dir / model.name, out_dir / mmproj.name
    modelfile = out_dir / "Modelfile" if template.exports_ollama else None
    limits = gguf_qwen_vl.image_token_limits(ip) if qwen else None
    return Exported(model_path, mmproj, modelfile, out_dir / "README.md", round(time.time() - t0, 1), limits)


def register(app: typer.Typer) -> None:
    export_app = typer.Typer(no_args_is_help=True, help="Write a trained model in another runtime's format.")
    app.add_typer(export_app, name="export")

    @export_app.command("gguf")
    def gguf_command(
        run_dir: Annotated[Path, typer.Argument(help="any directory chat accepts (a LoRA/QLoRA run is merged first)")],
        out_dir: Annotated[Path, typer.Argument(help="new directory for the GGUF files, Modelfile and README")],
        quant: Annotated[str, typer.Option("--quant", help="f16 | q8_0 | q4_k_m (the language model; mmproj stays f16)")] = "f16",
        name: Annotated[Optional[str], typer.Option("--name", help="file name stem (default: RUN_DIR's name)")] = None,
    ):
        """GGUF for llama.cpp / Ollama: the language model + an mmproj (CLIP + projector) to run on a CPU."""
        done = export_gguf(run_dir, out_dir, quant=quant, name=name)
        typer.echo("exported: " + "\n          ".join(str(f) for f in (done.model, done.mmproj, done.modelfile) if f))
        flags = (f" --image-min-tokens {done.image_tokens[0]} --image-max-tokens {done.image_tokens[1]}"
                 if done.image_tokens else "")
        typer.echo(f"next: llama-mtmd-cli -m {done.model} --mmproj {done.mmproj} --jinja{flags} --image IMAGE.png "
                   f"-p QUESTION --temp 0  (see {done.readme})")

    @export_app.command("vllm")
    def vllm_command(
        run_dir: Annotated[Path, typer.Argument(help="a tune run (a LoRA/QLoRA run is merged first), or a full, "
                                                "merged or converted model")],
        out_dir: Annotated[Path, typer.Argument(help="new directory for the weights, config, tokenizer and processor")],
    ):
        """A directory vLLM serves: merged weights in the names vLLM's loader reads, the run's chat template."""
        done = export_vllm(run_dir, out_dir)
        typer.echo(f"exported: {done}")
        typer.echo(f"next: python -m vllm.entrypoints.openai.api_server --model {done}  (vLLM's OpenAI-compatible "
                   "server; send each image as an image_url part)")
