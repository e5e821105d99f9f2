"""Image files -> one RGB PIL image for the vision tower.

In:  a path (or `InMemory` bytes, for uploads) to a JPEG, PNG, TIFF, BMP, GIF or WebP file (8-bit, 16-bit, float, palette, CMYK, with or without
     alpha), or a DICOM file (`.dcm`/`.dicom` suffix or the `DICM` magic at byte 128); or 2 to 4 such paths.
Out: an 8-bit `PIL.Image.Image` in mode "RGB" with an empty `info` dict (nothing from the file's header rides along).

- `load_image`      one file -> RGB. High-bit-depth grey is stretched by its own min/max (or by `window`),
                    DICOM goes through modality LUT -> VOI LUT / window -> MONOCHROME1 inversion.
- `expand_to_square` LLaVA's "pad" mode: centre on a square canvas of the processor's mean colour.
- `composite`       ChiMed-VL style: 2-4 images -> one image, side by side or stacked, whichever is squarer.
- `load_images`     what the data pipeline and chat call: load each path, composite when there are several.
- `image_header`    what `load_image` would decode (size, bytes), from the header alone: a server's budget.

DICOM itself is dicom.py; the bounds every decode checks are limits.py.

Every problem a user can fix (missing, unsupported, truncated, huge, wrong frame) raises `UserError` with one line
naming the file and the fix. DICOM headers carry patient data, so DICOM errors name only the path and never repeat
a header value or pydicom's own message.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .dicom import decode_dicom, dicom_header, is_dicom
from .limits import Header, check_bytes, check_frame, check_pixels, joined_layout
from .window import data_bounds, to_uint8, window_bounds

PathType = str | PathLike


@dataclass(frozen=True)
class InMemory:
    """An image file's bytes and the name to call it by (in messages, and its suffix for the DICOM rule): an upload
    decoded from memory, so it never has a name on disk, not even while it is decoded."""

    name: str
    data: bytes


Source = PathType | InMemory

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (about 9459 x 9459)

# Formats PIL may open. A closed list keeps untrusted data away from Ghostscript-backed EPS/PDF and other exotic
# parsers ("JPEG" also opens the multi-picture JPEGs that phone cameras write).
PIL_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000")

# What PIL and its codecs raise on a damaged file (UnidentifiedImageError is an OSError, handled before these).
# PIL's plugins raise whatever their parser hits on a damaged file (a bit-flipped TIFF: TypeError, KeyError), so every
# exception while decoding is the file's problem; found by tests/test_fuzz.py
_DECODE_ERRORS = (Exception,)

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_image(
    path: Source,
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
) -> Image.Image:
    """Read one image file (or `InMemory` bytes) as 8-bit RGB.

    frame: which frame of a multi-frame file (DICOM default: the middle one; other formats: the first).
    window: (center, width) in stored units (Hounsfield for CT after rescale) for DICOM and 16-bit/float grey;
        overrides the DICOM header's window. 8-bit images are already rendered for display and ignore it.
    max_pixels: refuse anything larger (width x height, read from the header before decoding).
    max_bytes: refuse a decoded size above this (width x height x frames x bytes per sample, from the header):
        what a server that decodes uploads uses to bound its memory; None: no such bound.
    """
    source, path = path, _checked(path, frame, window)
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    if is_dicom(path, _read(source, 132)):
        return decode_dicom(_read(source), path, frame=frame, window=window, **limits)
    return _load_pil(path, _opened(source), frame=frame, window=window, **limits)


def image_header(path: Source, *, frame: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = None) -> Header:
    """What `load_image` would decode (the frame's width and height, the bytes its decode holds), read from the
    header alone, with the same bounds checked: a server adds these up before it decodes anything."""
    source, path = path, _checked(path, frame, None)
    if is_dicom(path, _read(source, 132)):
        return dicom_header(_read(source), path, frame=frame, max_pixels=max_pixels, max_bytes=max_bytes)
    return _pil_open(path, _opened(source), lambda im, decoded: Header(im.width, im.height, decoded), frame=frame,
                     max_pixels=max_pixels, max_bytes=max_bytes)


def _checked(source: Source, frame: int | None, window) -> Path:
    """The name to call `source` by, once the arguments are checked and a path is found."""
    path = Path(source.name[:200]) if isinstance(source, InMemory) else Path(source)
    try:
        found = isinstance(source, InMemory) or path.is_file()
    except OSError as e:  # e.g. a name longer than the file system allows: this image's problem, not a crash
        raise UserError(f"{str(path)[:200]}: cannot look the image up ({e.strerror or type(e).__name__}); "
                        "fix the path or drop the record") from None
    if not found:
        raise UserError(f"{path}: image file not found; fix the path or drop the record")
    if window is not None and not window[1] >= 1:
        raise UserError(f"{path}: window width must be >= 1, got {window[1]}; pass window=(center, width)")
    if frame is not None and frame < 0:
        raise UserError(f"{path}: frame must be >= 0, got {frame}")
    return path


def _read(source: Source, size: int = -1) -> bytes:
    if isinstance(source, InMemory):
        return source.data if size < 0 else source.data[:size]
    try:
        with open(source, "rb") as f:
            return f.read(size)
    except OSError:
        raise UserError(f"{source}: cannot read file; check its permissions") from None


def _opened(source: Source):
    """What PIL opens: the path, or a view of the bytes (BytesIO shares them, no copy)."""
    return io.BytesIO(source.data) if isinstance(source, InMemory) else source


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side so the image is square and centred (LLaVA's `expand2square`).

    `fill` is usually the processor's mean colour, `tuple(int(x * 255) for x in image_mean)`, so the padding
    normalises to ~0 and the vision tower sees it as "nothing". A square image is returned as is.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def composite(images: list[Image.Image]) -> Image.Image:
    """Join 2-4 images into one, side by side or stacked, whichever result is closer to square.

    ChiMed-VL feeds multi-image records to a single-image model this way. Images are first resized (aspect kept)
    to a common height (side by side) or width (stacked): the median one, so a single thumbnail does not shrink
    the others and a single huge scan does not blow the others up; with two images the lower median is used,
    i.e. the smaller, because downscaling loses less than upscaling invents. Ties go to side by side.
    """
    if not images or len(images) > 4:
        raise ValueError(f"composite takes 1 to 4 images, got {len(images)}")
    if len(images) == 1:
        return images[0]
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    candidates = [_concatenate(images, horizontal=True), _concatenate(images, horizontal=False)]
    return min(candidates, key=lambda im: max(im.size) / min(im.size))  # min() keeps the first on ties


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """Images in one row at a common height: how the web page previews separate images (not what a model sees)."""
    return _concatenate([im if im.mode == "RGB" else im.convert("RGB") for im in images], horizontal=True)


def load_images(paths: Source | Sequence[Source], **kwargs) -> Image.Image:
    """Load one image, or 2-4 images composited into one; keyword arguments go to `load_image`."""
    if isinstance(paths, (str, PathLike, InMemory)):
        paths = [paths]
    if not paths:
        raise ValueError("load_images needs at least one path")
    return composite([load_image(p, **kwargs) for p in paths])


# ---------------------------------------------------------------- PIL formats


def _load_pil(path: Path, source, *, frame: int | None, window: tuple[float, float] | None, max_pixels: int,
              max_bytes: int | None = None) -> Image.Image:
    def decode(im, decoded):
        im.load()  # decode everything now, so a truncated file fails here, not in a DataLoader worker
        if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            # Phone photos (skin, wounds, endoscopy screens) are stored sideways with a rotate flag;
            # the model should see what the clinician saw.
            im = ImageOps.exif_transpose(im)
        return _pil_to_rgb(im, window)

    return _pil_open(path, source, decode, frame=frame, max_pixels=max_pixels, max_bytes=max_bytes)


def _pil_open(path: Path, source, then, *, frame: int | None, max_pixels: int, max_bytes: int | None):
    """Open `source` (named `path` in messages) with PIL, check its bounds from the header, and return `then(image, decoded bytes)`; every
    failure is one UserError naming the file."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some library set this process-wide; half-grey images would then train silently. Say so instead of
        # flipping a global that someone else relies on.
        raise UserError(
            f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process, so truncated images would load "
            "silently; set it back to False before loading training images"
        )
    try:
        # PIL's own bomb check only warns between 1x and 2x its limit; make that a hard stop too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=PIL_FORMATS) as im:
                check_pixels(path, im.width, im.height, max_pixels)
                n_frames = getattr(im, "n_frames", 1)
                if frame is not None:
                    check_frame(path, frame, n_frames)
                    im.seek(frame)
                    check_pixels(path, im.width, im.height, max_pixels)  # TIFF pages may differ in size
                sample = {"I": 4, "F": 4}.get(im.mode, 2 if im.mode.startswith("I;16") else 1)
                decoded = im.width * im.height * len(im.getbands()) * sample
                check_bytes(path, decoded, max_bytes)
                return then(im, decoded)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{path}: image is larger than PIL.Image.MAX_IMAGE_PIXELS (possible decompression bomb); "
            "downscale it, or raise that limit and max_pixels if it is genuine"
        ) from None
    except UnidentifiedImageError:
        raise UserError(
            f"{path}: unsupported or unrecognised image format; convert it to PNG or JPEG "
            "(DICOM needs the DICM header or a .dcm suffix)"
        ) from None
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path}: cannot decode image (truncated or corrupt file: {reason}); re-export it or drop the record"
        ) from exc


def _pil_to_rgb(im: Image.Image, window: tuple[float, float] | None) -> Image.Image:
    if im.mode in _HIGH_DEPTH_MODES:
        # 16-bit/32-bit/float grey: convert("L") would clip to 255 (a 0..4095 scan comes out almost all white),
        # so stretch its own range, or the window, onto 0..255.
        values = np.asarray(im)
        lo, hi = window_bounds(window) if window is not None else data_bounds(values)
        rgb = _grey_to_rgb(to_uint8(values, lo, hi))
    elif im.mode in _ALPHA_MODES or "transparency" in im.info or (im.mode == "P" and im.palette.mode.endswith("A")):
        # Transparent areas go over black: medical images sit on black (film, CT/MR surround, endoscope vignette),
        # and the composite canvas is black too; white would read as over-exposed tissue.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB (48-bit RGB is already reduced to 8-bit by PIL)
    rgb.info = {}  # convert() always returns a new image, so this never touches the caller's
    return rgb


# ---------------------------------------------------------------- shared helpers


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey, mode="L").convert("RGB")


def _concatenate(images: list[Image.Image], *, horizontal: bool) -> Image.Image:
    size, placed = joined_layout([im.size for im in images], horizontal=horizontal)
    canvas = Image.new("RGB", size, (0, 0, 0))
    offset = 0
    for im, to in zip(images, placed):
        canvas.paste(im if im.size == to else im.resize(to, Image.Resampling.BICUBIC),
                     (offset, 0) if horizontal else (0, offset))
        offset += to[0] if horizontal else to[1]
    return canvas
