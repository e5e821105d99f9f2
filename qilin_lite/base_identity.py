"""What a base model is, read from its files without loading it: so a run can record the base its adapter or
projector was trained on, and `merge` can tell that base from another one at the same path or of the same shape.

In:  a Llava directory (or a hub id already in the local cache): config.json and the safetensors headers, plus one
     short row of a few dozen tensors (a few KB read, whatever the model's size).
Out: {"config": digest, "shapes": digest, "tensors": count, "sample": {name: "SHAPE: values"}}, or None when
     the weights cannot be read that way (pickled .bin weights, a hub id not downloaded); `differs(recorded, now)`
     says what differs, or None for the same base.

The sampled values are compared with a tolerance, not hashed: the same base saved again in bfloat16 or float16 is
the same base (rounding moves a weight by under 0.4%); another base's weights differ by their whole size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .weights import open_safetensors

SAMPLED = 24  # tensors sampled, spread over the sorted names: both towers, the projector, the LLM's layers
VALUES = 8  # values read from each: the start of its middle row
RTOL = 1e-2  # bfloat16 rounds a weight by at most 2**-9 of it
# config.json keys that change with how a base was saved, not with what it computes
VOLATILE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"}


def identify(source: str | Path) -> dict | None:
    folder = _local_folder(str(source))
    if folder is None or not (folder / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.safetensors"))
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):  # the loader says what is wrong with it, in one line
        return None
    if not files or not isinstance(config, dict):
        return None
    shapes: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        with open_safetensors(f, "base weights") as st:
            for name in st.keys():
                shapes[name] = (f, list(st.get_slice(name).get_shape()))
    names = sorted(shapes)
    matrices = [n for n in names if len(shapes[n][1]) >= 2]  # norms and biases start as ones and zeros
    picked = sorted({matrices[round(i * (len(matrices) - 1) / max(SAMPLED - 1, 1))]
                     for i in range(min(SAMPLED, len(matrices)))}) if matrices else []
    sample = {}
    for f in files:
        with open_safetensors(f, "base weights") as st:
            for name in (n for n in picked if shapes[n][0] == f):
                shape = shapes[name][1]
                index = (slice(shape[0] // 2, shape[0] // 2 + 1),) + (slice(0, 1),) * (len(shape) - 2) + \
                    (slice(0, VALUES),)
                row = st.get_slice(name)[index].float().flatten().tolist()
                # one line a tensor in qilin.json: "374x64: -0.02688 0.0006637 ..."
                sample[name] = "x".join(map(str, shape)) + ": " + " ".join(f"{v:.6g}" for v in row)
    sample = dict(sorted(sample.items()))
    return {"config": _digest(_stable(config)), "shapes": _digest([[n, shapes[n][1]] for n in names]),
            "tensors": len(names), "sample": sample}


def differs(recorded: dict, now: dict) -> str | None:
    """What sets `now` apart from the base `recorded`, in a few words; None when it is the same base."""
    was, now_sample = _parsed(recorded), _parsed(now)
    if recorded.get("shapes") != now.get("shapes"):
        for name, (shape, _) in was.items():
            if name not in now_sample:
                return f"its tensor shapes differ: no {name} here"
            if now_sample[name][0] != shape:
                return f"its tensor shapes differ: {name} is {now_sample[name][0]} here, {shape} in training"
        return f"its tensor shapes differ ({now.get('tensors')} tensors here, {recorded.get('tensors')} in training)"
    for name, (_, values) in was.items():
        got = now_sample.get(name, ("", []))[1]
        if len(got) != len(values) or any(abs(a - b) > RTOL * max(abs(a), abs(b)) + 1e-6 for a, b in zip(got, values)):
            return f"same shapes, other weights: {name} for one"
    if recorded.get("config") != now.get("config"):
        return "same weights, another config.json"
    return None


def _parsed(identity: dict) -> dict[str, tuple[str, list[float]]]:
    out = {}
    sample = identity.get("sample")
    for name, line in (sample.items() if isinstance(sample, dict) else ()):
        shape, _, values = str(line).partition(": ")
        try:
            out[name] = (shape, [float(v) for v in values.split()])
        except ValueError:  # an entry edited by hand: it tells nothing, the others still do
            continue
    return out


def _local_folder(source: str) -> Path | None:
    p = Path(source)
    if p.is_dir():
        return p
    if p.exists() or source.count("/") != 1:
        return None
    try:  # a hub id: its cached snapshot, never a download (the run loaded it, so it is there)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors"], local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no such repository: the base cannot be identified here
        return None


def _stable(config):
    if isinstance(config, dict):
        return {k: _stable(v) for k, v in sorted(config.items()) if k not in VOLATILE}
    if isinstance(config, list):
        return [_stable(v) for v in config]
    return config


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]
