"""Synthetic "medical-style" images and LLaVA-format JSON for the demo, deterministic from a seed.

In: a `DemoDataSpec` (split sizes, image size, seed, which question tasks). Out, under `out_dir`:
- `images/*.png`: 8-bit grayscale images, one bright round lesion (or 1-3 with the count task) in the left or right
  half, over a global look that tells the modality: CT (grey disc on black), 磁共振 (dark body on bright texture),
  X光 (dark-top / bright-bottom gradient with rib stripes). Every 50th file has a Chinese name (`胸部_00050.png`).
- `align.json`: stage 1 captions, human turn just `<image>` (LLaVA "plain" template).
- `tune.json`: stage 2 questions, answers exactly the canonical strings in `CHOICES`; ~20% are 2-turn dialogs.
- `heldout.json`: single-turn questions on unseen images, plus `answer`, `task` and `choices` for scoring.
- `spec.json`: the spec that made them.
The look is chosen so that a random frozen ViT with 8x8 patches separates it from patch means: the labels are
visible in coarse intensity layout, not in fine texture.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

SIDES = ("左侧", "右侧")
MODALITIES = ("CT", "磁共振", "X光")
COUNTS = ("一个", "两个", "三个")
PRESENCE = ("可见病灶", "未见病灶")
CHOICES: dict[str, tuple[str, ...]] = {"side": SIDES, "modality": MODALITIES, "count": COUNTS, "presence": PRESENCE}
TASKS = tuple(CHOICES)

QUESTIONS: dict[str, tuple[str, ...]] = {
    "side": (
        "病灶位于哪一侧？",
        "请判断病灶在左侧还是右侧。",
        "病变在图像的哪一侧？",
        "病灶出现在左侧还是右侧？",
        "请指出病灶所在的一侧。",
    ),
    "modality": (
        "这是什么类型的影像？",
        "该图像的成像方式是什么？",
        "请判断这是CT、磁共振还是X光图像。",
        "这张图像是用哪种检查方式获得的？",
        "图像属于哪种影像模态？",
    ),
    "presence": (
        "图像中是否可见病灶？",
        "请判断图中有没有病灶。",
        "这张图像上能看到病灶吗？",
        "图像里是否存在病灶？",
        "有没有发现病灶？",
    ),
    "count": (
        "图中有几个病灶？",
        "病灶的数量是多少？",
        "请数一数图像中的病灶个数。",
        "图像里可以看到几个病灶？",
        "共有几个病灶？",
    ),
}

# {lesion} is "病灶" when every image has one lesion, else "两个病灶" etc., so captions name every attribute in play.
CAPTIONS = (
    "{modality}图像，{lesion}位于{side}。",
    "该{modality}片显示{side}有{lesion}。",
    "这是一张{modality}图像，{side}可见{lesion}。",
    "{modality}检查：{side}见{lesion}。",
    "图像类型为{modality}，{lesion}位于{side}。",
    "{side}发现{lesion}，成像方式为{modality}。",
)

# images without a lesion (task "presence") are described without one
NO_LESION_CAPTIONS = (
    "{modality}图像，未见病灶。",
    "该{modality}片未见明显病灶。",
    "这是一张{modality}图像，未见病灶。",
    "{modality}检查：未见病灶。",
    "图像类型为{modality}，未见病灶。",
    "未发现病灶，成像方式为{modality}。",
)

IMAGE_TOKEN = "<image>"
TWO_TURN_FRACTION = 0.2  # multi-turn records exercise supervision of a second assistant turn
CHINESE_NAME_EVERY = 50  # every 50th image gets a Chinese file name: such names must work everywhere
LESION_RADIUS = (0.11, 0.14)  # fraction of the image size: 7-9 px at 64 px, so a lesion dominates its 16 px patch
COUNT_LESION_RADIUS = (0.06, 0.075)  # smaller, so three fit in one half; one size for all counts: area grows with count
_STREAMS = {"align": 1, "tune": 2, "heldout": 3, "questions": 4}  # separate seed streams: held-out never shares draws with training


@dataclass
class DemoDataSpec:
    n_align: int = 600  # stage 1 caption records, one image each
    n_tune: int = 600  # stage 2 question records, one image each
    n_heldout: int = 120  # scored after stage 2; images never used in training
    n_questions: int = 0  # closed questions with answers and choices for `reinforce` (its demo); images of their own
    image_size: int = 64  # pixels per side; 32 or 64 with patch 8 keeps the tiny ViT fast
    seed: int = 0
    tasks: tuple[str, ...] = ("side", "modality")  # add "count" for 1-3 lesions and count questions

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)  # YAML gives lists
        unknown = [t for t in self.tasks if t not in CHOICES]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise UserError(f"demo tasks {list(self.tasks)}: use distinct names from {list(TASKS)}")
        for name in ("n_align", "n_tune", "n_heldout"):
            if getattr(self, name) < 1:
                raise UserError(f"demo {name}={getattr(self, name)}: must be at least 1")
        if self.image_size < 32:
            raise UserError(f"demo image_size={self.image_size}: use 32 or more so lesions stay visible")


@dataclass(frozen=True)
class Finding:
    """What one image shows; `answer(task)` is the canonical string the model must produce."""

    side: str
    modality: str
    count: str = "一个"
    presence: str = "可见病灶"

    def answer(self, task: str) -> str:
        return getattr(self, task)


# ---------------------------------------------------------------- images


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Soft-edged filled ellipse mask in [0, 1] (about one pixel of anti-aliasing)."""
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0)


def _lesion_centres(f: Finding, body: tuple[float, float, float, float], r: float, s: int, rng) -> list:
    """Centres inside one half of the body, clear of the centre line and of each other."""
    cx, cy, ax, ay = body
    sign = -1.0 if f.side == "左侧" else 1.0
    pts: list[tuple[float, float]] = []
    for _ in range(10_000):
        x = cx + sign * rng.uniform(0.15, 0.34) * s
        y = rng.uniform(0.22, 0.78) * s
        inside = ((x - cx) / (ax - r)) ** 2 + ((y - cy) / (ay - r)) ** 2 <= 1.0
        apart = all((x - px) ** 2 + (y - py) ** 2 >= (2 * r + 0.03 * s) ** 2 for px, py in pts)
        if inside and apart:
            pts.append((x, y))
            if len(pts) == COUNTS.index(f.count) + 1:
                return pts
    raise RuntimeError(f"could not place {f.count} lesions in a {s}px image")  # a bug in the ranges, not user error


def render_image(
    f: Finding, size: int, rng: np.random.Generator, lesion_radius: tuple[float, float] = LESION_RADIUS
) -> np.ndarray:
    """One (size, size) uint8 image showing `f`; all geometry, `lesion_radius` too, is in fractions of `size`."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    body = (
        s * (0.5 + rng.uniform(-0.02, 0.02)),
        s * (0.5 + rng.uniform(-0.02, 0.02)),
        s * rng.uniform(0.41, 0.45),
        s * rng.uniform(0.37, 0.41),
    )
    cx, cy, ax, ay = body
    inside = _ellipse(yy, xx, *body)
    if f.modality == "CT":  # grey disc with a faint bone rim on a black background
        rim = inside - _ellipse(yy, xx, cx, cy, ax - 0.04 * s, ay - 0.04 * s)
        img = 8 + rng.uniform(95, 115) * inside + 45 * rim + 6 * _smooth_noise(rng, s, 5) * inside
    elif f.modality == "磁共振":  # dark body on a bright textured background
        bg = rng.uniform(160, 180) + 14 * _smooth_noise(rng, s, 6)
        tissue = rng.uniform(60, 80) + 10 * _smooth_noise(rng, s, 4)
        img = bg * (1 - inside) + tissue * inside
    else:  # X光: dark top to bright bottom, dark lung fields, horizontal rib stripes, a central spine
        top, bottom = rng.uniform(40, 60), rng.uniform(150, 170)
        img = top + (bottom - top) * yy / s
        period, phase = s * rng.uniform(0.17, 0.21), rng.uniform(0, 2 * np.pi)
        ribs = 16 * np.sin(2 * np.pi * yy / period + phase) * inside
        lungs = sum(_ellipse(yy, xx, cx + dx * s, cy, 0.16 * s, 0.3 * s) for dx in (-0.2, 0.2))
        spine = np.clip(1 - np.abs(xx - cx) / (0.05 * s), 0, 1) * inside
        img = img + ribs - 30 * lungs + 20 * spine

    img = img * rng.uniform(0.94, 1.04)  # exposure jitter; the background stays below about 215

    r = s * rng.uniform(*lesion_radius)
    centres = _lesion_centres(f, body, r, s, rng) if f.presence == "可见病灶" else []
    for x, y in centres:  # the brightest thing in every modality
        blob = _ellipse(yy, xx, x, y, r, r)
        img = img * (1 - blob) + rng.uniform(235, 250) * blob

    img = img + rng.normal(0, 4, (s, s))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def image_name(index: int) -> str:
    return f"胸部_{index:05d}.png" if index % CHINESE_NAME_EVERY == 0 else f"img_{index:05d}.png"


# ---------------------------------------------------------------- records


def _findings(spec: DemoDataSpec) -> list[Finding]:
    counts = COUNTS if "count" in spec.tasks else COUNTS[:1]
    presence = PRESENCE if "presence" in spec.tasks else PRESENCE[:1]
    return [Finding(*c) for c in itertools.product(SIDES, MODALITIES, counts, presence)]


def _balanced(options: list, n: int, rng: np.random.Generator) -> list:
    """n draws with every option equally often (the remainder a random subset), in random order."""
    picked = options * (n // len(options))
    picked += [options[i] for i in rng.permutation(len(options))[: n % len(options)]]
    return [picked[i] for i in rng.permutation(n)]


def _caption(f: Finding, spec: DemoDataSpec, template: str) -> str:
    if f.presence != "可见病灶":
        return NO_LESION_CAPTIONS[CAPTIONS.index(template)].format(modality=f.modality)
    lesion = f"{f.count}病灶" if "count" in spec.tasks else "病灶"
    return template.format(modality=f.modality, side=f.side, lesion=lesion)


def _askable(f: Finding, task: str) -> bool:
    """Where or how many lesions makes no sense for an image without one."""
    return f.presence == "可见病灶" or task not in ("side", "count")


def _qa(task: str, f: Finding, rng: np.random.Generator, first: bool) -> list[dict]:
    q = QUESTIONS[task][rng.integers(len(QUESTIONS[task]))]
    return [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if first else q},
        {"from": "gpt", "value": f.answer(task)},
    ]


def _split(split: str, start: int, n: int, spec: DemoDataSpec, images: Path) -> list[dict]:
    """Records of one split; image `start + i` has its own generator (seed, split, index)."""
    rng = np.random.default_rng([spec.seed, _STREAMS[split]])
    tasks = list(spec.tasks)
    if split == "align":
        plan = [(f, None) for f in _balanced(_findings(spec), n, rng)]
    else:  # balance (task, finding) jointly so each task's answers are balanced too
        pairs = [(f, t) for f, t in itertools.product(_findings(spec), tasks) if _askable(f, t)]
        plan = _balanced(pairs, n, rng)
    radius = COUNT_LESION_RADIUS if "count" in spec.tasks else LESION_RADIUS
    two_turn = set(rng.permutation(n)[: round(TWO_TURN_FRACTION * n)].tolist()) if split == "tune" else set()

    records = []
    for i, (f, task) in enumerate(plan):
        index = start + i
        name = image_name(index)
        pixel_rng = np.random.default_rng([spec.seed, _STREAMS[split], index])
        Image.fromarray(render_image(f, spec.image_size, pixel_rng, radius)).save(images / name, format="PNG")
        rec = {"id": f"{split}_{index:05d}", "image": name}
        if split == "align":
            caption = _caption(f, spec, CAPTIONS[rng.integers(len(CAPTIONS))])
            rec["conversations"] = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}]
        else:
            rec["conversations"] = _qa(task, f, rng, first=True)
            if i in two_turn:
                others = [t for t in tasks if t != task and _askable(f, t)] or [task]  # else ask it again
                rec["conversations"] += _qa(others[rng.integers(len(others))], f, rng, first=False)
        if split in ("heldout", "questions"):
            rec.update(answer=f.answer(task), task=task, choices=list(CHOICES[task]))
        records.append(rec)
    return records


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def make_demo_data(out_dir: Path, spec: DemoDataSpec = DemoDataSpec()) -> dict[str, Path]:
    """Write images and align/tune/heldout JSON under `out_dir` (existing files of the same names are replaced)."""
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = {"images": images}
    start = 0
    for split, n in (("align", spec.n_align), ("tune", spec.n_tune), ("heldout", spec.n_heldout),
                     ("questions", spec.n_questions)):
        if n == 0:  # only questions may be left out
            continue
        paths[split] = out_dir / f"{split}.json"
        _write_json(paths[split], _split(split, start, n, spec, images))
        start += n
    _write_json(out_dir / "spec.json", asdict(spec))
    return paths


def make_demo_pairs(split_file: Path, out_file: Path, seed: int = 0) -> Path:
    """Preference pairs from a split's dialogs (for `prefer`): the prompt up to the last question, its answer
    chosen and another option of the same question rejected."""
    rng = np.random.default_rng(seed)
    rows = []
    for rec in json.loads(Path(split_file).read_text(encoding="utf-8")):
        turns, answer = rec["conversations"][:-1], rec["conversations"][-1]["value"]
        options = next(c for c in CHOICES.values() if answer in c)
        wrong = [o for o in options if o != answer]
        rows.append({"id": rec["id"], "images": [rec["image"]], "conversations": turns,
                     "chosen": {"from": "gpt", "value": answer},
                     "rejected": {"from": "gpt", "value": wrong[int(rng.integers(len(wrong)))]}})
    Path(out_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(out_file)


def demo_texts(spec: DemoDataSpec = DemoDataSpec()) -> list[str]:
    """Every caption, question and answer the demo can produce: text for the tiny tokenizer and LM warm-up."""
    texts = {_caption(f, spec, t) for f in _findings(spec) for t in CAPTIONS}
    for task in spec.tasks:
        texts.update(QUESTIONS[task])
        texts.update(CHOICES[task])
    return sorted(texts)


def chance_level(heldout_records: list[dict]) -> float:
    """Accuracy of uniform guessing among each item's `choices`, averaged over items."""
    if not heldout_records:
        raise ValueError("chance_level needs at least one held-out record")
    return float(np.mean([1.0 / len(r["choices"]) for r in heldout_records]))
