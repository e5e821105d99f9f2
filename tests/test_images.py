"""images.py: every supported file kind comes out 8-bit RGB with the right pixel values; bad files give one-line
UserErrors that name the file and never leak DICOM patient data; square padding and composites have the right shape."""

from __future__ import annotations

import logging
import traceback
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from qilin_lite.errors import UserError
from qilin_lite.images.decode import composite, expand_to_square, load_image, load_images

PATIENT_VALUES = ("DOE^JANE", "DOE", "JANE", "PID12345", "19700101", "General Hospital")


def px(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def aspect(image: Image.Image) -> float:
    return max(image.size) / min(image.size)


# ---------------------------------------------------------------- PIL formats


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "CMYK", "RGBA", "LA", "I", "F", "I;16"])
def test_every_mode_comes_out_rgb_8bit(tmp_path, mode):
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1))
    if mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 100)
    else:
        image = Image.fromarray(ramp, mode="L").convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I', 'F') else 'png'}"
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (32, 16)
    assert px(out).dtype == np.uint8
    assert out.info == {}


def test_16bit_png_stretches_its_own_range_to_full_span(tmp_path):
    # 12-bit data in a 16-bit PNG: clipping would make it nearly all white, truncating to 8 bits nearly all black.
    values = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "ct.png")
    out = px(load_image(tmp_path / "ct.png"))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert 100 < np.median(out) < 155  # linear, not saturated
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotonic ramp preserved


def test_16bit_tiff_with_window(tmp_path):
    values = np.array([[1000, 1100, 1200, 2000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "w.tif")
    out = px(load_image(tmp_path / "w.tif", window=(1100.5, 201)))[0, :, 0]
    # window 1100.5/201 -> [1000, 1200]: ends at black/white, middle mid-grey, above the window saturates
    assert out[0] == 0 and out[2] == 255 and out[3] == 255
    assert abs(int(out[1]) - 128) <= 1


def test_8bit_grey_is_left_alone(tmp_path):
    values = np.array([[10, 20, 30]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert px(load_image(tmp_path / "g.png", window=(0, 10)))[0, :, 0].tolist() == [10, 20, 30]


def test_palette_with_transparency_goes_over_black(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, 1 green
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # red is transparent
    image.save(tmp_path / "p.png", transparency=0)
    out = px(load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[1, 1].tolist() == [0, 0, 0]


def test_rgba_half_transparent_composited_over_black(tmp_path):
    Image.new("RGBA", (2, 2), (200, 100, 50, 128)).save(tmp_path / "a.png")
    assert np.allclose(px(load_image(tmp_path / "a.png"))[0, 0], [100, 50, 25], atol=2)


def test_cmyk_colours(tmp_path):
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # cyan
    image.putpixel((1, 0), (0, 0, 0, 128))  # 50% black
    image.save(tmp_path / "c.jpg", quality=100)
    out = px(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.allclose(out[0, 0], [0, 255, 255], atol=30)
    assert np.allclose(out[0, 1], [127, 127, 127], atol=30)


def test_exif_rotation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways, "rotate 90 CW to display"
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_multipage_tiff_frame(tmp_path):
    pages = [Image.new("L", (4, 4), v) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert px(load_image(tmp_path / "stack.tif"))[0, 0, 0] == 10  # non-DICOM default: first page
    assert px(load_image(tmp_path / "stack.tif", frame=2))[0, 0, 0] == 30
    with pytest.raises(UserError, match=r"stack\.tif.*frame 3 out of range"):
        load_image(tmp_path / "stack.tif", frame=3)


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file_is_user_error_naming_it(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full.{suffix}")
    data = (tmp_path / f"full.{suffix}").read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"cut\.{suffix}: cannot decode image \(truncated or corrupt") as info:
        load_image(tmp_path / f"cut.{suffix}")
    assert "\n" not in str(info.value)


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(tmp_path / "ok.png")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("name,data", [("notes.txt", b"not an image\n"), ("blob.png", bytes(range(256)) * 4)])
def test_unsupported_format(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=rf"{name.replace('.', '[.]')}: unsupported or unrecognised image format"):
        load_image(tmp_path / name)


def test_bomb_refused_from_header(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(UserError, match=r"big\.png: image is 100x100 = 10000 pixels, above max_pixels=5000"):
        load_image(tmp_path / "big.png", max_pixels=5000)


def test_pil_bomb_error_and_warning_become_user_errors(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    for limit in (4000, 9000):  # 2x below (PIL raises) and just below (PIL only warns)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(UserError, match=r"big\.png: .*decompression bomb"):
            load_image(tmp_path / "big.png")


# ---------------------------------------------------------------- DICOM


def write_dicom(
    path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    syntax=ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
    preamble: bool = True,
):
    """A CT-like DICOM with patient data in the header; `stored` is (rows, cols), (frames, rows, cols) or RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "PID12345", "19700101"
    ds.InstitutionName = "General Hospital"
    ds.Modality = "CT"
    color = photometric in ("RGB", "YBR_FULL")
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric
    if color:
        ds.PlanarConfiguration = 0
    frames = stored.shape[0] if stored.ndim == (4 if color else 3) else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = stored.shape[-3:-1] if color else stored.shape[-2:]
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixel_bytes if pixel_bytes is not None else stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        data = path.read_bytes()
        path.write_bytes(data[132:])  # a bare dataset with no preamble, as old exports are
    return path


def assert_no_patient_data(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    for value in PATIENT_VALUES:
        assert value not in text


HU = np.array([[-1000, -160, 40, 240, 1000, 3000]], dtype=np.int64)  # air, window edges, mid, bone, metal


def ct_file(tmp_path, name="ct.dcm", **kw):
    stored = ((HU + 1024) // 2).astype(np.uint16)  # slope 2, intercept -1024
    return write_dicom(tmp_path / name, stored, slope=2, intercept=-1024, **kw)


def test_dicom_rescale_then_header_window(tmp_path):
    # soft-tissue window 40/400 covers HU [-160, 239.5]
    out = px(load_image(ct_file(tmp_path, window=(40, 400))))
    grey = out[0, :, 0]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert grey[0] == 0 and grey[1] == 0  # at or below the window's low edge
    assert abs(int(grey[2]) - round((40 + 160) / 399.5 * 255)) <= 1  # centre -> mid-grey
    assert grey[3] == 255 and grey[4] == 255 and grey[5] == 255  # above it


def test_dicom_window_argument_overrides_header(tmp_path):
    path = ct_file(tmp_path, window=(40, 400))
    grey = px(load_image(path, window=(500, 3001)))[0, :, 0]  # HU [-1000.5, 2000.5]
    assert grey[0] == 0 and grey[5] == 255
    assert abs(int(grey[4]) - round((1000 + 1000.5) / 3001 * 255)) <= 1


def test_dicom_without_window_uses_min_max(tmp_path):
    grey = px(load_image(ct_file(tmp_path)))[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255 and 0 < grey[2] < grey[4] < 255


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom import dcmread

    path = write_dicom(tmp_path / "lut.dcm", np.array([[0, 1, 2, 3, 9]], dtype=np.uint16))
    ds = dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]  # 4 entries, first maps stored value 0
    item.add_new("LUTData", "US", [0, 1000, 3000, 4000])
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    grey = px(load_image(path))[0, :, 0]
    # scaled by the LUT's output range 0..4000, not the image's; values past the LUT take its last entry
    assert grey.tolist() == [0, round(1000 / 4000 * 255), round(3000 / 4000 * 255), 255, 255]


def test_dicom_monochrome1_inverted(tmp_path):
    mono2 = px(load_image(ct_file(tmp_path, "m2.dcm", window=(40, 400))))[0, :, 0]
    mono1 = px(load_image(ct_file(tmp_path, "m1.dcm", window=(40, 400), photometric="MONOCHROME1")))[0, :, 0]
    assert mono1.tolist() == (255 - mono2).tolist()


def test_dicom_multiframe_picks_frame(tmp_path):
    stack = np.zeros((3, 4, 4), dtype=np.uint16)
    for k in range(3):
        stack[k, 0, k] = 1000  # frame k has its bright pixel in column k
    path = write_dicom(tmp_path / "cine.dcm", stack)
    bright = lambda image: int(np.argmax(px(image)[0, :, 0]))  # noqa: E731
    assert bright(load_image(path)) == 1  # default: middle frame
    assert bright(load_image(path, frame=0)) == 0
    assert bright(load_image(path, frame=2)) == 2
    with pytest.raises(UserError, match=r"cine\.dcm: frame 3 out of range, the file has 3 frame") as info:
        load_image(path, frame=3)
    assert_no_patient_data(info.value)


def test_dicom_rgb_and_ybr(tmp_path):
    from pydicom.pixels.processing import convert_color_space

    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[1, 0], rgb[1, 1] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 150, 100)
    out = px(load_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")))
    assert out.tolist() == rgb.tolist()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = px(load_image(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))).astype(int)
    assert np.abs(out - rgb).max() <= 3


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    path = ct_file(tmp_path, "IM0001", window=(40, 400))
    assert px(load_image(path))[0, 2, 0] == px(load_image(ct_file(tmp_path, window=(40, 400))))[0, 2, 0]


def test_dicom_output_carries_no_header(tmp_path):
    image = load_image(ct_file(tmp_path))
    assert image.info == {}
    assert not any(v in repr(image.__dict__) for v in PATIENT_VALUES)


@pytest.mark.parametrize("keep", [0.95, 0.5, 0.2])  # cut in pixel data, in the header
def test_truncated_dicom_is_user_error_without_patient_data(tmp_path, keep, caplog):
    path = ct_file(tmp_path, window=(40, 400))
    stored = np.zeros((64, 64), dtype=np.uint16)
    path = write_dicom(tmp_path / "big.dcm", stored)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep > 0.3 else 300])
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"big\.dcm: ") as info:
            load_image(path)
    assert_no_patient_data(info.value)
    assert "\n" not in str(info.value)
    for value in PATIENT_VALUES:
        assert value not in caplog.text
        assert not any(value in str(w.message) for w in caught)


def test_pydicom_logs_and_warnings_are_silenced_only_while_reading(tmp_path, monkeypatch, caplog):
    # pydicom quotes header values in some warnings; simulate one from a child logger in the middle of a read.
    import qilin_lite.images.dicom as images

    real = images.apply_modality_lut

    def chatty(arr, ds):
        logging.getLogger("pydicom.pixels.utils").warning("Invalid value for VR PN: 'DOE^JANE'")
        warnings.warn("Invalid value for VR LO: 'PID12345'", UserWarning)
        return real(arr, ds)

    monkeypatch.setattr(images, "apply_modality_lut", chatty)
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(ct_file(tmp_path))
        logging.getLogger("pydicom.pixels.utils").warning("outside a read")
    assert "DOE^JANE" not in caplog.text and not any("PID12345" in str(w.message) for w in caught)
    assert "outside a read" in caplog.text  # pydicom's logging still works elsewhere


def test_dicom_without_pixel_data(tmp_path):
    path = ct_file(tmp_path)
    from pydicom import dcmread

    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "sr.dcm")
    with pytest.raises(UserError, match=r"sr\.dcm: DICOM file has no pixel data") as info:
        load_image(tmp_path / "sr.dcm")
    assert_no_patient_data(info.value)


def test_compressed_dicom_without_decoder_says_what_to_install(tmp_path):
    path = write_dicom(
        tmp_path / "jpegls.dcm",
        np.zeros((4, 4), dtype=np.uint16),
        syntax=JPEGLosslessSV1,
        pixel_bytes=encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"]),
    )
    expected = r"jpegls\.dcm: .*(no decoder for it is installed.*pip install|cannot decode)"  # decoder may be installed
    with pytest.raises(UserError, match=expected) as info:
        load_image(path)
    assert_no_patient_data(info.value)


def test_dicom_bomb_checked_from_header(tmp_path):
    with pytest.raises(UserError, match=r"ct\.dcm: image is 6x1 = 6 pixels, above max_pixels=5"):
        load_image(ct_file(tmp_path), max_pixels=5)


def test_dicom_without_preamble_by_suffix(tmp_path):
    grey = px(load_image(ct_file(tmp_path, "old.dcm", window=(40, 400), preamble=False)))[0, :, 0]
    assert grey[0] == 0 and grey[4] == 255


def test_garbage_with_dcm_suffix(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(UserError, match=r"junk\.dcm: "):
        load_image(tmp_path / "junk.dcm")


# ---------------------------------------------------------------- square and composite


@pytest.mark.parametrize("size,offset", [((40, 20), (0, 10)), ((20, 40), (10, 0))])
def test_expand_to_square(size, offset):
    image = Image.new("RGB", size, (255, 255, 255))
    out = expand_to_square(image, (122, 116, 104))
    assert out.size == (40, 40)
    a = px(out)
    x, y = offset
    assert a[y, x].tolist() == [255, 255, 255] and a[y + size[1] - 1, x + size[0] - 1].tolist() == [255, 255, 255]
    assert a[0, 0].tolist() == [122, 116, 104] and a[-1, -1].tolist() == [122, 116, 104]
    assert (a == 255).all(axis=-1).sum() == size[0] * size[1]


def test_expand_to_square_keeps_square():
    image = Image.new("RGB", (8, 8))
    assert expand_to_square(image, (0, 0, 0)) is image


def test_composite_picks_the_squarer_layout():
    wide = [Image.new("RGB", (100, 50), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = composite(wide)
    assert out.size == (100, 100)  # stacked
    assert px(out)[10, 50].tolist() == [255, 0, 0] and px(out)[90, 50].tolist() == [0, 255, 0]
    tall = [Image.new("RGB", (50, 100), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = composite(tall)
    assert out.size == (100, 100)  # side by side
    assert px(out)[50, 10].tolist() == [255, 0, 0] and px(out)[50, 90].tolist() == [0, 255, 0]


def test_composite_three_and_mixed_sizes():
    three = composite([Image.new("RGB", (60, 60)) for _ in range(3)])
    assert three.size == (180, 60)  # equal aspects: ties go side by side
    mixed = [Image.new("RGB", s) for s in ((100, 50), (60, 120), (80, 80), (300, 200))]
    out = composite(mixed)
    # common side = lower median (80): side by side would be 400x80 (aspect 5), stacked is 80x333 (aspect ~4.2)
    assert out.mode == "RGB" and out.size == (80, 333)
    assert aspect(out) <= len(mixed) + 0.5  # a row of n near-square images cannot do better than ~n
    assert composite(mixed).tobytes() == out.tobytes()  # deterministic


def test_composite_single_and_bounds():
    image = Image.new("RGB", (7, 3))
    assert composite([image]) is image
    with pytest.raises(ValueError):
        composite([])
    with pytest.raises(ValueError):
        composite([image] * 5)


def test_load_images_composites_files(tmp_path):
    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (100, 50), 128).save(tmp_path / "b.png")
    assert load_images(tmp_path / "a.png").size == (100, 50)
    out = load_images([tmp_path / "a.png", str(tmp_path / "b.png")])
    assert out.mode == "RGB" and out.size == (100, 100)
    assert px(out)[75, 50].tolist() == [128, 128, 128]
    with pytest.raises(UserError, match=r"c\.png: image file not found"):
        load_images([tmp_path / "a.png", tmp_path / "c.png"])
