"""`qilin-lite image`: 1-4 image files -> one PNG of what the model saw in training, for servers to read.

Servers hand images to the HF processor, which only resizes and centre-crops, and they read no DICOM: this writes
the composite, the DICOM / 16-bit windowing and, for runs trained with `pad`, the square padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..options import Frame, ImageFiles, Window
from .chat_session import load_chat_image, parse_window

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the fill when no model is named (CLIP's processors)


def prepare_image(paths, out: str | Path, *, model: str | None = None, window: tuple[float, float] | None = None,
                  frame: int | None = None) -> Path:
    """1-4 images -> one PNG holding what the model saw in training: the composite, DICOM / 16-bit windowing and,
    for runs trained with `pad`, the square padding in the processor's mean colour; for native-resolution runs
    (Qwen-VL) and squashing ones (Gemma 3), the size the processor resizes it to.

    For servers: they hand images to the HF processor, which only resizes and centre-crops, and they read no DICOM.
    Pixels only: the PNG carries no metadata, so no DICOM header value leaves the input file this way."""
    from ..images.decode import expand_to_square
    from ..model import RunInfo, load_tokenizer_and_processor
    from ..images.pixel_values import image_loader, pad_fill

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the output must be a .png (lossless); JPEG would change the pixels again")
    several = not isinstance(paths, (str, Path)) and len(paths) > 1
    if several and model is not None:
        from ..families import get_template
        from ..model import template_of

        name = template_of(str(model))
        if get_template(name).separate_images:
            raise UserError(f"{model} shows each image to the model on its own (template '{name}'); write one PNG "
                            "per image: qilin-lite image FILE --out ...")
    image = load_chat_image(paths, window=window, frame=frame)
    mode, fill = "pad", pad_fill(CLIP_MEAN)
    if model is not None:
        info = RunInfo.load(Path(model)) if Path(model).is_dir() else None
        loader = image_loader(load_tokenizer_and_processor(str(model))[1], info.image_mode if info else "pad")
        mode, fill = loader.mode, loader.fill
    if mode == "pad":
        image = expand_to_square(image, fill)
    elif model is not None:  # at the processor's own size or grid, so that llama.cpp's resizing (aspect kept,
        image = loader.at_grid(image)  # padded) has nothing to do: Qwen's native grid, Gemma 3's squash
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def register(app: typer.Typer) -> None:
    @app.command("image")
    def image_command(
        images: ImageFiles,
        out: Annotated[Path, typer.Option("--out", help="the PNG to write")],
        model: Annotated[Optional[str], typer.Option("--model", help="the run whose image mode and fill colour to use (default: pad, CLIP mean)")] = None,
        window: Window = None,
        frame: Frame = None,
    ):
        """Write the image as the model saw it in training (square, windowed, composite) for servers to read."""
        typer.echo(prepare_image(images, out, model=model, window=parse_window(window), frame=frame))
