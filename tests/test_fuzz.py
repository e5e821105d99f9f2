"""Property-based: random, truncated and bit-flipped bytes as JPEG / PNG / TIFF / DICOM, and random JSON as records,
through `data check` and the training loader. Every input ends as a clean problem (one line, no patient data) or a
good record; nothing crashes."""

from __future__ import annotations

import io
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qilin_lite.errors import UserError

PATIENT = ("DOE^JANE", "PID12345", "19700101", "General Hospital")
KINDS = ("jpg", "png", "tif", "dcm")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@lru_cache(maxsize=None)
def valid(kind: str) -> bytes:
    """A small valid file of each kind (the DICOM carries patient data in its header)."""
    from PIL import Image

    if kind == "dcm":
        from test_images import write_dicom

        d = Path(tempfile.mkdtemp())
        stored = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 7) % 4096
        return write_dicom(d / "x.dcm", stored, slope=1, intercept=-1024, window=(40, 400)).read_bytes()
    a = (np.indices((24, 20)).sum(0) * 9 % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([a, a[::-1], a.T[:24, :20] if a.T.shape[0] >= 24 else a], -1)).save(
        buf, format={"jpg": "JPEG", "png": "PNG", "tif": "TIFF"}[kind])
    return buf.getvalue()


@st.composite
def damaged(draw):
    kind = draw(st.sampled_from(KINDS))
    good = valid(kind)
    how = draw(st.sampled_from(["truncate", "flip", "random", "intact", "empty"]))
    if how == "truncate":
        data = good[: draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        b = bytearray(good)
        for pos in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[pos] ^= 1 << draw(st.integers(0, 7))
        data = bytes(b)
    elif how == "random":
        data = draw(st.binary(min_size=1, max_size=2048))
    elif how == "empty":
        data = b""
    else:
        data = good
    return kind, how, data


def _processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@SETTINGS
@given(files=st.lists(damaged(), min_size=1, max_size=6))
def test_damaged_images_are_clean_problems_in_check_and_loader(files):
    from qilin_lite.data.check import check_data
    from qilin_lite.data.records import read_records
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.data import verify_images

    d = Path(tempfile.mkdtemp())
    rows = []
    for i, (kind, _, data) in enumerate(files):
        (d / f"im{i}.{kind}").write_bytes(data)
        rows.append({"id": f"r{i}", "image": f"im{i}.{kind}",
                     "conversations": [{"from": "human", "value": "<image>\n问题"}, {"from": "gpt", "value": "答"}]})
    f = d / "d.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    result = check_data(f, d, decode=True, workers=1)
    text = result.format()
    assert result.records == len(files)
    for v in PATIENT:
        assert v not in text
    recs = read_records(f, d)
    rejects: list = []
    kept = verify_images(recs, rejects, skip_bad=True, workers=1)
    assert len(kept) + len(rejects) == len(files) == result.records
    assert len(rejects) == result.failed
    for r in rejects:
        assert "\n" not in r.reason and not any(v in r.reason for v in PATIENT)
    loader = ImageLoader(_processor(), "pad")
    for rec in kept:  # what passed the check loads in the training loader
        assert tuple(loader(rec.images).shape) == (1, 3, 16, 16)
    for i, (kind, how, _) in enumerate(files):
        if how == "intact":
            assert f"r{i}" in {r.id for r in kept}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20,
)
record_like = st.fixed_dictionaries({}, optional={
    "id": json_values, "image": st.one_of(json_values, st.sampled_from(["x.png", "", "../x.png", "长" * 300])),
    "images": json_values,
    "conversations": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {}, optional={"from": st.sampled_from(["human", "gpt", "system", "bot", 3]), "value": json_values,
                      "role": json_values, "content": json_values}), max_size=4)),
    "messages": json_values,
})


@SETTINGS
@given(lines=st.lists(st.one_of(record_like, json_values, st.text(max_size=30)), min_size=1, max_size=8))
def test_random_json_records_are_problems_or_records(lines):
    from PIL import Image

    from qilin_lite.data.check import check_data
    from qilin_lite.data.records import Reject, read_records

    d = Path(tempfile.mkdtemp())
    Image.new("RGB", (8, 8)).save(d / "x.png")
    f = d / "d.jsonl"
    f.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines), encoding="utf-8")
    rejects: list[Reject] = []
    try:
        recs = read_records(f, d, skip_bad=True, rejects=rejects)
    except UserError as e:  # a whole-file problem: still one clean line
        assert "\n" not in str(e) and str(f) in str(e)
        recs = []
    for r in rejects:
        assert r.reason and "\n" not in r.reason
    try:
        result = check_data(f, d, decode=True, workers=1)  # bad records are counted, not raised
        assert result.failed >= len(rejects)
    except UserError as e:  # only a file with nothing to check (not JSON, or no rows) stops it, with one line
        assert "\n" not in str(e) and str(f) in str(e)
    for rec in recs:
        assert [m["role"] for m in rec.messages if m["role"] != "system"][0] == "user"
