"""DICOM bytes -> an RGB image (modality LUT -> VOI LUT / window -> MONOCHROME1 inversion), or its header alone.

In:  a DICOM file's bytes (from a path, or an upload held in memory) and the name to call it by in messages.
Out: `decode_dicom` -> 8-bit RGB `PIL.Image`; `dicom_header` -> `limits.Header` (size, bytes a decode holds).

A hostile file is bounded before its pixels are decoded: a deflated dataset is inflated here, never past the limit
(pydicom would inflate all of it: a 2 MB file became 2 GB), and the pixel data a file really holds must match what
its Rows x Columns x frames x bits declare (an 8x8 image carrying 512 MB of pixel data is refused). DICOM headers
carry patient data, so every message names only the file and never repeats a header value or pydicom's own text.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as dicom_pixel_array
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from ..errors import UserError
from .limits import MB, Header, check_bytes, check_frame, check_pixels
from .window import data_bounds, to_uint8, window_bounds

HEADER_ROOM = 16 * MB  # what a dataset besides its pixels may take once inflated (overlays, icons, private tags)
UNBOUNDED_INFLATE = 2**31  # with no per-image bound (training): still never an unbounded inflation
PIXEL_SLACK = MB  # pixel data beyond the declared size: even-length padding, trailing elements
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
_KNOWN_PHOTOMETRIC = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYZ",
)  # fmt: skip
REEXPORT = "re-export it from the PACS/viewer or drop the record"

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


def is_dicom(name: Path, head: bytes) -> bool:
    """A `.dcm`/`.dicom` name or the DICM magic at byte 128 (`head`: the file's first 132 bytes)."""
    return name.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM"


def dicom_header(data: bytes, name: Path, *, frame: int | None = None, max_pixels: int,
                 max_bytes: int | None = None) -> Header:
    """The size of the frame a decode shows and the bytes it holds, from the header alone (pixels not decoded);
    every bound of `decode_dicom` checked. Raises UserError naming `name`."""
    with _silenced():
        ds, held = _read(data, name, stop_before_pixels=True, max_bytes=max_bytes)
        rows, cols, declared, _ = _checked_size(ds, held, name, frame, max_pixels, max_bytes)
    return Header(cols, rows, declared + held)


def decode_dicom(data: bytes, name: Path, *, frame: int | None, window: tuple[float, float] | None,
                 max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    with _silenced():
        return _decode(data, name, frame=frame, window=window, max_pixels=max_pixels, max_bytes=max_bytes)


@contextlib.contextmanager
def _silenced():
    token = _READING_DICOM.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings can quote header values (patient data)
            yield
    finally:
        _READING_DICOM.reset(token)


def dicom_error(path: Path, problem: str, fix: str, exc: BaseException | None = None) -> UserError:
    # Only the exception's type: pydicom's messages may quote header values.
    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return UserError(f"{path}: {problem}{detail}; {fix}")


def _meta_end(data: bytes) -> int:
    """Where the dataset starts after the file meta group (0002,xxxx: explicit VR little endian, after 'DICM')."""
    pos = 132
    while data[pos:pos + 2] == b"\x02\x00" and pos + 8 <= len(data):
        if data[pos + 4:pos + 6] in _LONG_VRS:
            pos += 12 + int.from_bytes(data[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6:pos + 8], "little")
    return pos


def _inflate(zipped: bytes, limit: int, name: Path) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(zipped, limit + 1)
        if len(out) <= limit:
            out += inflater.flush()
    except zlib.error as exc:
        raise dicom_error(name, "cannot inflate the deflated DICOM dataset (truncated or corrupt)", REEXPORT,
                          exc) from None
    if len(out) > limit:
        raise UserError(f"{name}: the deflated DICOM dataset inflates to more than {limit / MB:.0f} MB (a "
                        "decompression bomb, or far larger than this server takes); send it uncompressed and smaller")
    return out


def _read(data: bytes, name: Path, *, stop_before_pixels: bool, max_bytes: int | None):
    """-> (dataset, bytes of pixel data it holds). pydicom reads it, but a deflated dataset is inflated here first,
    never past the per-image bound plus HEADER_ROOM."""
    held: list[int] = []

    def at_pixels(tag, vr, length) -> bool:
        return tag in PIXEL_TAGS

    try:
        if data[128:132] == b"DICM":
            end = _meta_end(data)
            meta = pydicom.dcmread(io.BytesIO(data[:end])).file_meta
            if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                body = io.BytesIO(_inflate(data[end:], (max_bytes or UNBOUNDED_INFLATE) + HEADER_ROOM, name))
                ds = read_dataset(body, False, True, stop_when=at_pixels if stop_before_pixels else None)
                ds.file_meta = meta
                held.append(len(body.getbuffer()) - body.tell() if stop_before_pixels else 0)
        if not held:
            # Old ACR-NEMA style .dcm files have no preamble; `force` reads them, and the checks below catch garbage.
            fp = io.BytesIO(data)
            ds = pydicom.dcmread(fp, force=data[128:132] != b"DICM", stop_before_pixels=stop_before_pixels)
            held.append(len(data) - fp.tell() if stop_before_pixels else 0)
    except UserError:
        raise
    except Exception as exc:  # any parser failure on this untrusted file is the file's fault
        raise dicom_error(name, "cannot read DICOM file (truncated or corrupt)", REEXPORT, exc) from None
    if not stop_before_pixels:  # read whole: the pixel element's own length
        held[0] = next((len(ds[t].value or b"") for t in PIXEL_TAGS if t in ds), 0)
    return ds, held[0]


def _int(value, default: int) -> int:
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        return default


def _checked_size(ds, held: int, name: Path, frame: int | None, max_pixels: int, max_bytes: int | None):
    """(rows, cols, decoded bytes, frame to show), every bound checked before a pixel is decoded."""
    if not any(t in ds for t in PIXEL_TAGS) and not held:
        raise dicom_error(name, "DICOM file has no pixel data (a report, or truncated?)", "drop the record")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise dicom_error(name, "DICOM file has no valid Rows/Columns", REEXPORT)
    check_pixels(name, cols, rows, max_pixels)
    frames, samples, bits = _int(ds.get("NumberOfFrames"), 1), _int(ds.get("SamplesPerPixel"), 1), \
        _int(ds.get("BitsAllocated"), 8)
    # what the header declares: the pixel data really held must match it, so an 8x8 image cannot carry 512 MB
    declared = -(-rows * cols * frames * samples * bits // 8)
    syntax = (ds.get("file_meta") or {}).get("TransferSyntaxUID")
    allowed = declared + PIXEL_SLACK if syntax is None or syntax in _NATIVE else 2 * declared + PIXEL_SLACK
    if held > allowed:
        raise UserError(f"{name}: the DICOM file holds {held / MB:.1f} MB of pixel data, but its header declares "
                        f"{cols}x{rows} x {frames} frame(s) ({declared:,} bytes); {REEXPORT}")
    decoded = rows * cols * frames * samples * -(-bits // 8)  # every frame counts, as the buffer they sit in
    check_bytes(name, decoded, max_bytes)
    try:
        n_frames = max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        raise dicom_error(name, "DICOM NumberOfFrames is not a number", REEXPORT) from None
    frame = n_frames // 2 if frame is None else frame  # the middle slice of a series is the most representative
    check_frame(name, frame, n_frames)
    return rows, cols, decoded, frame


def _decode(data: bytes, path: Path, *, frame: int | None, window: tuple[float, float] | None, max_pixels: int,
            max_bytes: int | None = None) -> Image.Image:
    ds, held = _read(data, path, stop_before_pixels=False, max_bytes=max_bytes)
    del data  # the dataset holds what is needed
    *_, frame = _checked_size(ds, held, path, frame, max_pixels, max_bytes)
    n_frames = _int(ds.get("NumberOfFrames"), 1)

    meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise dicom_error(path, "DICOM file has no transfer syntax", REEXPORT)
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
        raise dicom_error(path, problem, "convert it to uncompressed DICOM (`gdcmconv --raw`)") from None
    if not decoder.is_available:
        raise dicom_error(
            path,
            f"DICOM pixel data is compressed as {syntax_name}, and no decoder for it is installed",
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle (or python-gdcm), "
            "or decompress the file first (e.g. `gdcmconv --raw`)",
        )

    try:
        # index= decodes only the one frame, not the whole cine/volume.
        pixels = dicom_pixel_array(ds, index=frame if n_frames > 1 else None)
    except Exception as exc:
        raise dicom_error(path, "cannot decode DICOM pixel data (truncated or corrupt)", REEXPORT, exc) from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            rgb = _scale_color(apply_color_lut(pixels, ds), bits=int(ds.RedPaletteColorLookupTableDescriptor[2]))
        elif pixels.ndim == 3:
            # pydicom has already turned YBR_* into RGB (pixel_array's default as_rgb).
            rgb = _scale_color(pixels, bits=int(ds.get("BitsStored", 8)))
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            grey = _grey_to_uint8(pixels, ds, window, path)
            if photometric == "MONOCHROME1":
                grey = 255 - grey  # MONOCHROME1 stores "bright = low value" (some CR/DX); invert for display
            rgb = np.stack([grey] * 3, axis=-1)
        else:
            shown = photometric if photometric in _KNOWN_PHOTOMETRIC else "unknown"  # no free text from the file
            problem = f"unsupported DICOM photometric interpretation ({shown})"
            raise dicom_error(path, problem, "convert it to MONOCHROME2 or RGB")
    except UserError:
        raise
    except Exception as exc:
        raise dicom_error(path, "cannot apply the DICOM colour/VOI tables (corrupt header)", REEXPORT, exc) from None
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _grey_to_uint8(pixels: np.ndarray, ds, window: tuple[float, float] | None, path: Path) -> np.ndarray:
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
