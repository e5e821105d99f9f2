"""What decoding images may cost, judged from their headers before any pixel is decoded.

- `check_pixels` / `check_bytes` / `check_frame`: one image's bounds (width x height, decoded bytes, frame index).
- `joined_layout` / `joined_size`: the geometry of a composite (decode.composite draws it; the estimate reads it).
- `pipeline_bytes`: what 1-N images cost on their way to the model: each one's decoded samples and RGB copy, the
  composite and its resized parts, the padded square, the preview, and the processor's copies when a question is
  asked. The web server bounds a request by it (serve/web_app.py), so four images that each pass the per-image bound
  cannot join into one that takes gigabytes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MB = 2**20


@dataclass(frozen=True)
class Header:
    """One image as its header describes it: the frame decoded is width x height; `decoded` the bytes its decode
    holds at once (samples of every frame read, the file's own pixel bytes for DICOM)."""

    width: int
    height: int
    decoded: int


def check_bytes(path: Path, nbytes: int, max_bytes: int | None) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise UserError(f"{path}: decoding it would take {nbytes / MB:.0f} MB (width x height x frames x bytes "
                        f"per sample), above this server's {max_bytes / MB:.0f} MB per image; downscale it, or "
                        "send one frame")


def check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise UserError(
            f"{path}: image is {width}x{height} = {width * height} pixels, above max_pixels={max_pixels} "
            "(possible decompression bomb); downscale it, or raise max_pixels if it is genuine"
        )


def check_frame(path: Path, frame: int, n_frames: int) -> None:
    if not 0 <= frame < n_frames:
        raise UserError(
            f"{path}: frame {frame} out of range, the file has {n_frames} frame(s) (0..{n_frames - 1}); "
            "fix the frame index"
        )


def joined_layout(sizes: list[tuple[int, int]], *, horizontal: bool):
    """(canvas size, each image's size on it): images scaled (aspect kept) to the median height (side by side) or
    width (stacked); with two, the lower median, i.e. the smaller (downscaling loses less than upscaling invents)."""
    common = int(statistics.median_low([h if horizontal else w for w, h in sizes]))
    placed = []
    for w, h in sizes:
        side, other = (h, w) if horizontal else (w, h)
        scaled = max(1, round(other * common / side))
        placed.append((scaled, common) if horizontal else (common, scaled))
    total = sum(w if horizontal else h for w, h in placed)
    return ((total, common) if horizontal else (common, total)), placed


def joined_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The composite's size: side by side or stacked, whichever is closer to square (ties: side by side)."""
    if len(sizes) == 1:
        return sizes[0]
    options = [joined_layout(sizes, horizontal=h)[0] for h in (True, False)]
    return min(options, key=lambda s: max(s) / min(s))


def pipeline_bytes(headers: list[Header], *, joined: bool, pad: bool) -> int:
    """Bytes that decoding `headers` and showing them to the model may hold, summed over the steps (a bound, not a
    peak: some steps free what the one before held). `joined`: several become one composite; `pad`: each image the
    model sees is padded to a square."""
    rgb = 3
    total = sum(h.decoded + rgb * h.width * h.height for h in headers)  # every decode's result is held until joined
    shown = [(h.width, h.height) for h in headers]
    if joined and len(shown) > 1:
        w, h = joined_size(shown)
        total += 2 * rgb * w * h  # the canvas and the resized parts pasted on it
        shown = [(w, h)]
    squares = [(max(w, h),) * 2 if pad else (w, h) for w, h in shown]
    squared = sum(rgb * w * h for (w, h), s in zip(shown, squares) if s != (w, h))  # expand_to_square's copy
    seen = sum(rgb * w * h for w, h in squares)
    row = seen if len(squares) > 1 else 0  # separate images: the preview is a row of the squares, a new canvas
    # a question squares the kept image(s) again, and the processor's arrays and resized copies peak at about 3.2
    # times the image (measured: CLIP's, a 10240x10240 view, benchmarks/web_memory.py)
    return total + squared + row + squared + 4 * seen

