"""What a request to `qilin-lite web` may contain: the JSON body's fields and types, the sampling settings, a
DICOM window. Anything else is one message (HTTP 400), never a traceback; tests/test_web_security.py posts
random bodies to hold that."""

from __future__ import annotations

import math

from ..errors import UserError

WINDOWS = {  # DICOM window presets (centre, width) in Hounsfield units
    "lung": (-600.0, 1500.0),  # 肺窗
    "mediastinum": (40.0, 400.0),  # 纵隔窗 / soft tissue
    "bone": (400.0, 1800.0),  # 骨窗
    "brain": (40.0, 80.0),  # 脑窗
}


def sampling(settings: dict, defaults: dict) -> tuple[float, float | None, int]:
    if not isinstance(settings, dict):
        raise UserError("malformed request: settings must be an object; reload the page")
    try:
        temperature = float(settings.get("temperature", defaults["temperature"]))
        top_p = float(settings.get("top_p", defaults["top_p"]))
        max_new = int(settings.get("max_new_tokens", defaults["max_new_tokens"]))
    except (TypeError, ValueError, OverflowError):
        raise UserError("temperature, top-p and max new tokens must be numbers") from None
    if not 0 <= temperature <= 5 or not 0 < top_p <= 1 or not 1 <= max_new <= 4096:
        raise UserError("temperature 0-5 (0 = greedy), top-p in (0, 1], max new tokens 1-4096")
    return temperature, (top_p if top_p < 1 else None), max_new


def expect(body, **kinds) -> dict:
    """The JSON body an endpoint takes, its fields of the expected types (absent = None); anything else is one
    message (HTTP 400), never a traceback."""
    if not isinstance(body, dict):
        raise UserError("malformed request: the body must be a JSON object; reload the page")
    for key, kind in kinds.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise UserError(f"malformed request: '{key}' has the wrong type; reload the page")
    files = body.get("files")
    if "files" in kinds and isinstance(files, list) and not all(isinstance(f, dict) and isinstance(f.get("data", ""), str)
                                     and isinstance(f.get("name", ""), (str, type(None))) for f in files):
        raise UserError("malformed request: each file needs a name and base64 data; reload the page")
    return body


def window_setting(value) -> tuple[float, float]:
    if isinstance(value, str) and value in WINDOWS:
        return WINDOWS[value]
    try:
        c, w = (float(x) for x in (value if isinstance(value, (list, tuple)) else str(value).split(",")))
    except (TypeError, ValueError):
        raise UserError("window: a preset or CENTER,WIDTH (e.g. 40,400)") from None
    if not (math.isfinite(c) and math.isfinite(w) and w >= 1):
        raise UserError(f"window: a finite centre and a width >= 1, got {c:g},{w:g}")
    return c, w
