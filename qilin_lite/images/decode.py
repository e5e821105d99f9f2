"""Image files -> one RGB PIL image for the vision tower.

In:  a path to a JPEG, PNG, TIFF, BMP, GIF or WebP file (8-bit, 16-bit, float, palette, CMYK, with or without
     alpha), or a DICOM file (`.dcm`/`.dicom` suffix or the `DICM` magic at byte 128); or 2 to 4 such paths.
Out: an 8-bit `PIL.Image.Image` in mode "RGB" with an empty `info` dict (nothing from the file's header rides along).

- `load_image`      one file -> RGB. High-bit-depth grey is stretched by its own min/max (or by `window`),
                    DICOM goes through modality LUT -> VOI LUT / window -> MONOCHROME1 inversion.
- `expand_to_square` LLaVA's "pad" mode: centre on a square canvas of the processor's mean colour.
- `composite`       ChiMed-VL style: 2-4 images -> one image, side by side or stacked, whichever is squarer.
- `load_images`     what the data pipeline and chat call: load each path, composite when there are several.

Every problem a user can fix (missing, unsupported, truncated, huge, wrong frame) raises `UserError` with one line
naming the file and the fix. DICOM headers carry patient data, so DICOM errors name only the path and never repeat
a header value or pydicom's own message.
"""

from __future__ import annotations

import contextvars
import logging
import statistics
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as dicom_pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import UserError
from .window import data_bounds, to_uint8, window_bounds

PathType = str | PathLike

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
_KNOWN_PHOTOMETRIC = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYZ",
)  # fmt: skip

# pydicom logs and warns with header values in the text (e.g. "Invalid value for VR PN: 'DOE^JANE'"). While we
# read a DICOM file those records are dropped; a context variable keeps this per thread, unlike a global switch.
# A logger's filters do not see its children's records, so every pydicom logger gets one (all exist once
# pydicom.pixels is imported, as it is above).
_READING_DICOM = contextvars.ContextVar("qilin_lite_reading_dicom", default=False)


class _DropWhileReadingDicom(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _READING_DICOM.get()


_DROP_WHILE_READING_DICOM = _DropWhileReadingDicom()
for _name in ["pydicom", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("pydicom."))]:
    logging.getLogger(_name).addFilter(_DROP_WHILE_READING_DICOM)


def load_image(
    path: PathType,
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
) -> Image.Image:
    """Read one image file as 8-bit RGB.

    frame: which frame of a multi-frame file (DICOM default: the middle one; other formats: the first).
    window: (center, width) in stored units (Hounsfield for CT after rescale) for DICOM and 16-bit/float grey;
        overrides the DICOM header's window. 8-bit images are already rendered for display and ignore it.
    max_pixels: refuse anything larger (width x height, read from the header before decoding).
    max_bytes: refuse a decoded size above this (width x height x frames x bytes per sample, from the header):
        what a server that decodes uploads uses to bound its memory; None: no such bound.
    """
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as e:  # e.g. a name longer than the file system allows: this image's problem, not a crash
        raise UserError(f"{str(path)[:200]}: cannot look the image up ({e.strerror or type(e).__name__}); "
                        "fix the path or drop the record") from None
    if not found:
        raise UserError(f"{path}: image file not found; fix the path or drop the record")
    if window is not None and not window[1] >= 1:
        raise UserError(f"{path}: window width must be >= 1, got {window[1]}; pass window=(center, width)")
    if frame is not None and frame < 0:
        raise UserError(f"{path}: frame must be >= 0, got {frame}")
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    if _is_dicom(path):
        return _load_dicom(path, frame=frame, window=window, **limits)
    return _load_pil(path, frame=frame, window=window, **limits)


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


def load_images(paths: PathType | Sequence[PathType], **kwargs) -> Image.Image:
    """Load one image, or 2-4 images composited into one; keyword arguments go to `load_image`."""
    if isinstance(paths, (str, PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("load_images needs at least one path")
    return composite([load_image(p, **kwargs) for p in paths])


# ---------------------------------------------------------------- PIL formats


def _load_pil(path: Path, *, frame: int | None, window: tuple[float, float] | None, max_pixels: int,
              max_bytes: int | None = None) -> Image.Image:
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
            with Image.open(path, formats=PIL_FORMATS) as im:
                _check_pixels(path, im.width, im.height, max_pixels)
                n_frames = getattr(im, "n_frames", 1)
                if frame is not None:
                    _check_frame(path, frame, n_frames)
                    im.seek(frame)
                    _check_pixels(path, im.width, im.height, max_pixels)  # TIFF pages may differ in size
                sample = {"I": 4, "F": 4}.get(im.mode, 2 if im.mode.startswith("I;16") else 1)
                _check_bytes(path, im.width * im.height * len(im.getbands()) * sample, max_bytes)
                im.load()  # decode everything now, so a truncated file fails here, not in a DataLoader worker
                if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                    # Phone photos (skin, wounds, endoscopy screens) are stored sideways with a rotate flag;
                    # the model should see what the clinician saw.
                    im = ImageOps.exif_transpose(im)
                return _pil_to_rgb(im, window)
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


# ---------------------------------------------------------------- DICOM


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        raise UserError(f"{path}: cannot read file; check its permissions") from None
    return head[128:132] == b"DICM"


def _load_dicom(path: Path, *, frame: int | None, window: tuple[float, float] | None, max_pixels: int,
                max_bytes: int | None = None) -> Image.Image:
    token = _READING_DICOM.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings can quote header values (patient data)
            return _decode_dicom(path, frame=frame, window=window, max_pixels=max_pixels, max_bytes=max_bytes)
    finally:
        _READING_DICOM.reset(token)


def _dicom_error(path: Path, problem: str, fix: str, exc: BaseException | None = None) -> UserError:
    # Only the exception's type: pydicom's messages may quote header values.
    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return UserError(f"{path}: {problem}{detail}; {fix}")


def _decode_dicom(path: Path, *, frame: int | None, window: tuple[float, float] | None, max_pixels: int,
                  max_bytes: int | None = None) -> Image.Image:
    reexport = "re-export it from the PACS/viewer or drop the record"
    try:
        # Old ACR-NEMA style .dcm files have no preamble; `force` reads them, and the checks below catch garbage.
        ds = pydicom.dcmread(path, force=not _has_dicm_magic(path))
    except Exception as exc:  # any parser failure on this untrusted file is the file's fault
        raise _dicom_error(path, "cannot read DICOM file (truncated or corrupt)", reexport, exc) from None

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _dicom_error(path, "DICOM file has no pixel data (a report, or truncated?)", "drop the record")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise _dicom_error(path, "DICOM file has no valid Rows/Columns", reexport)
    _check_pixels(path, cols, rows, max_pixels)
    # every frame is decoded at once (pydicom's pixel_array), so all of them count
    frames, samples = _int(ds.get("NumberOfFrames"), 1), _int(ds.get("SamplesPerPixel"), 1)
    _check_bytes(path, rows * cols * frames * samples * -(-_int(ds.get("BitsAllocated"), 8) // 8), max_bytes)

    meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise _dicom_error(path, "DICOM file has no transfer syntax", reexport)
        explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit
        ds.file_meta = meta
    syntax = meta.TransferSyntaxUID
    # Only names from pydicom's UID table reach the message, never free text from the file.
    syntax_name = syntax.name if syntax.is_transfer_syntax else "an unknown transfer syntax"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        problem = f"unsupported DICOM transfer syntax ({syntax_name})"
        raise _dicom_error(path, problem, "convert it to uncompressed DICOM (`gdcmconv --raw`)") from None
    if not decoder.is_available:
        raise _dicom_error(
            path,
            f"DICOM pixel data is compressed as {syntax_name}, and no decoder for it is installed",
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle (or python-gdcm), "
            "or decompress the file first (e.g. `gdcmconv --raw`)",
        )

    try:
        n_frames = max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        raise _dicom_error(path, "DICOM NumberOfFrames is not a number", reexport) from None
    if frame is None:
        frame = n_frames // 2  # the middle slice of a series is the most representative single view
    _check_frame(path, frame, n_frames)

    try:
        # index= decodes only the one frame, not the whole cine/volume.
        pixels = dicom_pixel_array(ds, index=frame if n_frames > 1 else None)
    except Exception as exc:
        raise _dicom_error(path, "cannot decode DICOM pixel data (truncated or corrupt)", reexport, exc) from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            rgb = _scale_color(apply_color_lut(pixels, ds), bits=int(ds.RedPaletteColorLookupTableDescriptor[2]))
        elif pixels.ndim == 3:
            # pydicom has already turned YBR_* into RGB (pixel_array's default as_rgb).
            rgb = _scale_color(pixels, bits=int(ds.get("BitsStored", 8)))
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            grey = _dicom_greyto_uint8(pixels, ds, window, path)
            if photometric == "MONOCHROME1":
                grey = 255 - grey  # MONOCHROME1 stores "bright = low value" (some CR/DX); invert for display
            rgb = np.stack([grey] * 3, axis=-1)
        else:
            shown = photometric if photometric in _KNOWN_PHOTOMETRIC else "unknown"  # no free text from the file
            problem = f"unsupported DICOM photometric interpretation ({shown})"
            raise _dicom_error(path, problem, "convert it to MONOCHROME2 or RGB")
    except UserError:
        raise
    except Exception as exc:
        raise _dicom_error(path, "cannot apply the DICOM colour/VOI tables (corrupt header)", reexport, exc) from None
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _has_dicm_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _dicom_greyto_uint8(pixels: np.ndarray, ds, window: tuple[float, float] | None, path: Path) -> np.ndarray:
    values = apply_modality_lut(pixels, ds)  # stored values -> real units (HU for CT) via slope/intercept or LUT
    if window is not None:
        return to_uint8(values, *window_bounds(window))
    if _has_voi_lut(ds) or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            if _has_voi_lut(ds):
                values = np.rint(values).astype(np.int64)  # LUTs index by integer value
            shown = apply_voi_lut(values, ds)
            lo, hi = _voi_output_range(ds)
            return to_uint8(np.asarray(shown, dtype=np.float64), lo, hi)
        except (ValueError, NotImplementedError, TypeError, IndexError, AttributeError):
            # A nonsense window (width 0, unknown function) in one file should not drop the record.
            logging.getLogger(__name__).warning("%s: unusable DICOM VOI LUT/window; scaling by min/max instead", path)
    return to_uint8(values, *data_bounds(values))


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _voi_output_range(ds) -> tuple[float, float]:
    """The range apply_voi_lut maps onto for this header, found by pushing the extremes through it.

    pydicom's windowing maps onto the stored-value range (after rescale), a VOI LUT onto its own entries; the
    image's own min/max would undo the window, so scale by this instead.
    """
    if _has_voi_lut(ds):
        n_entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        probe = np.arange(first, first + (n_entries or 2**16))
    else:
        probe = np.array([-1e12, 1e12])
    with np.errstate(over="ignore"):
        out = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
    return float(out.min()), float(out.max())


def _scale_color(rgb: np.ndarray, bits: int) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    return to_uint8(rgb.astype(np.float64), 0.0, float(2**bits - 1))


# ---------------------------------------------------------------- shared helpers


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey, mode="L").convert("RGB")


def _int(value, default: int) -> int:
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        return default


def _check_bytes(path: Path, nbytes: int, max_bytes: int | None) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise UserError(f"{path}: decoding it would take {nbytes / 2**20:.0f} MB (width x height x frames x bytes "
                        f"per sample), above this server's {max_bytes / 2**20:.0f} MB per image; downscale it, or "
                        "send one frame")


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise UserError(
            f"{path}: image is {width}x{height} = {width * height} pixels, above max_pixels={max_pixels} "
            "(possible decompression bomb); downscale it, or raise max_pixels if it is genuine"
        )


def _check_frame(path: Path, frame: int, n_frames: int) -> None:
    if not 0 <= frame < n_frames:
        raise UserError(
            f"{path}: frame {frame} out of range, the file has {n_frames} frame(s) (0..{n_frames - 1}); "
            "fix the frame index"
        )


def _concatenate(images: list[Image.Image], *, horizontal: bool) -> Image.Image:
    sides = [im.height if horizontal else im.width for im in images]
    common = int(statistics.median_low(sides))
    resized = []
    for im in images:
        side = im.height if horizontal else im.width
        other = im.width if horizontal else im.height
        scaled = max(1, round(other * common / side))
        size = (scaled, common) if horizontal else (common, scaled)
        resized.append(im if im.size == size else im.resize(size, Image.Resampling.BICUBIC))
    total = sum(im.width if horizontal else im.height for im in resized)
    canvas = Image.new("RGB", (total, common) if horizontal else (common, total), (0, 0, 0))
    offset = 0
    for im in resized:
        canvas.paste(im, (offset, 0) if horizontal else (0, offset))
        offset += im.width if horizontal else im.height
    return canvas
