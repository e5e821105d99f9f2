"""Records -> model inputs: input_ids, labels, pixel_values, and the collator that batches them.

In:  `Record`s (records.py), a tokenizer, an image processor, a `Template` (conversation.py).
Out: per sample `{"input_ids", "labels", "pixel_values"}`; per batch the same, padded, plus `attention_mask`.

The one rule that matters: a token is supervised (label != -100) only when it starts inside a span that
`conversation.render` marked (assistant replies and their end token). Everything else, the system prompt, user
text, the image placeholder tokens, BOS and padding, gets -100. Image tokens are never truncated: text after the
last image is cut to `max_length`; a sample whose image tokens alone do not fit is rejected before training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .conversation import Template, render
from .records import BadRecord, LazyImage, Record

IGNORE = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLayout:
    """What the tokenizer and the model agree on about images."""

    image_token_id: int
    num_image_tokens: int  # tokens one image expands to (patches; CLS dropped)
    max_length: int


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans) -> np.ndarray:
    ids_arr = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = off[:, 0], off[:, 1]
    sup = np.zeros(len(ids_arr), dtype=bool)
    for s, e in spans:
        sup |= (starts >= s) & (starts < e) & (ends > starts)  # zero-width tokens (BOS) are never supervised
    return np.where(sup, ids_arr, IGNORE)


def _expand_images(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """Replace each `<image>` token by `num_image_tokens` copies (labels -100)."""
    where_img = np.flatnonzero(ids == layout.image_token_id)
    if len(where_img) == 0:
        return ids, labels
    reps = np.ones(len(ids), dtype=np.int64)
    reps[where_img] = layout.num_image_tokens
    ids = np.repeat(ids, reps)
    labels = np.repeat(labels, reps)
    labels[ids == layout.image_token_id] = IGNORE
    return ids, labels


def encode(messages: list[dict], template: Template, tokenizer, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (input_ids, labels), image tokens expanded, truncated after the last image.

    Raises BadRecord when the image tokens do not fit or no supervised token is left after truncation.
    """
    r = render(messages, template)
    enc = tokenizer(r.text, add_special_tokens=True, return_offsets_mapping=True)
    labels = _labels_from_offsets(enc["input_ids"], enc["offset_mapping"], r.supervised)
    ids, labels = _expand_images(np.asarray(enc["input_ids"], dtype=np.int64), labels, layout)
    return truncate(ids, labels, layout)


def truncate(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    img = np.flatnonzero(ids == layout.image_token_id)
    if len(img) and img[-1] >= layout.max_length:
        raise BadRecord(
            f"the image tokens end at position {img[-1] + 1} but max_length is {layout.max_length}; "
            "raise max_length or shorten the text before the image"
        )
    ids, labels = ids[: layout.max_length], labels[: layout.max_length]
    if not (labels != IGNORE).any():
        raise BadRecord(
            f"no reply token fits in max_length {layout.max_length}; raise max_length or shorten the question"
        )
    return ids, labels


def sample_lengths(records: list[Record], template: Template, tokenizer, layout: TokenLayout, batch: int = 512):
    """Token length of every record (for length grouping and packing) and the reason each bad one fails.

    Tokenizes in batches without expanding images, so it is cheap enough to run over 500k records up front.
    """
    lengths = np.zeros(len(records), dtype=np.int64)
    bad: dict[int, str] = {}
    for lo in range(0, len(records), batch):
        chunk = records[lo : lo + batch]
        rendered = [render(r.messages, template) for r in chunk]
        enc = tokenizer([x.text for x in rendered], add_special_tokens=True, return_offsets_mapping=True)
        for j, (ids, off, x) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], rendered)):
            labels = _labels_from_offsets(ids, off, x.supervised)
            full_ids, full_labels = _expand_images(np.asarray(ids, dtype=np.int64), labels, layout)
            try:
                cut, _ = truncate(full_ids, full_labels, layout)
                lengths[lo + j] = len(cut)
            except BadRecord as e:
                bad[lo + j] = str(e)
    return lengths, bad


def pad_fill(image_mean) -> tuple[int, int, int]:
    """The padding colour for a processor's mean, truncated as LLaVA's expand2square: the authors' exact pixels."""
    return tuple(int(x * 255) for x in image_mean)


class ImageLoader:
    """Record images -> one processed `pixel_values` tensor per image, with the stage's squaring rule.

    `mode="pad"` pads to a square with the processor's mean colour (LLaVA's `pad`, stage 2);
    `mode="crop"` leaves it to the processor's resize + centre crop (LLaVA's default, stage 1).
    """

    def __init__(self, image_processor, mode: str = "pad"):
        if mode not in ("pad", "crop"):
            raise ValueError(f"image mode must be 'pad' or 'crop', not {mode!r}")
        self.processor = image_processor
        self.mode = mode
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = pad_fill(mean)

    def __call__(self, images) -> torch.Tensor:
        from PIL import Image

        from .images import expand_to_square, load_image

        pil = []
        for ref in images:
            if isinstance(ref, Image.Image):
                img = ref
            elif isinstance(ref, LazyImage):
                img = ref.open()
            else:
                img = load_image(ref)
            if img.mode != "RGB":
                img = img.convert("RGB")
            if self.mode == "pad":
                img = expand_to_square(img, self.fill)
            pil.append(img)
        return self.processor(images=pil, return_tensors="pt")["pixel_values"]


class VisionTextDataset(torch.utils.data.Dataset):
    """Lazy dataset: tokenizes and loads images per item (in DataLoader workers), never all at once."""

    def __init__(
        self,
        records: list[Record],
        tokenizer,
        image_loader: ImageLoader,
        template: Template,
        layout: TokenLayout,
        lengths: np.ndarray,
        rejects_path: Path | None = None,
    ):
        self.records, self.tokenizer, self.images = records, tokenizer, image_loader
        self.template, self.layout, self.lengths = template, layout, lengths
        self.rejects_path = rejects_path

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        # A file that decoded during the up-front check can still fail here (disk, network mount). One bad sample
        # must not end a run hours in: record it and serve the next sample instead.
        for attempt in range(len(self.records)):
            rec = self.records[(i + attempt) % len(self.records)]
            try:
                return self._item(rec)
            except Exception as e:  # noqa: BLE001 - any per-sample failure is recorded, not fatal
                self._reject(rec, e)
        raise RuntimeError("every sample failed to load")

    def _item(self, rec: Record) -> dict:
        ids, labels = encode(rec.messages, self.template, self.tokenizer, self.layout)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if rec.images:
            item["pixel_values"] = self.images(rec.images)
        return item

    def _reject(self, rec: Record, err: Exception) -> None:
        msg = f"{rec.where}: skipped during training: {err}"
        log.warning(msg)
        if self.rejects_path is not None:
            with open(self.rejects_path, "a", encoding="utf-8") as f:
                row = {"source": rec.source, "line": rec.line, "id": rec.id, "reason": str(err), "during": "training"}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pack(lengths, max_length: int) -> list[list[int]]:
    """Group sample indices into rows of at most `max_length` tokens (best-fit decreasing; deterministic).

    Each sample keeps its own image tokens whole: samples are never split across rows.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) kept sorted: best fit is one bisect away
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):  # nothing fits: open a row
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Rows of several samples laid end to end, `position_ids` restarting at each sample and no attention mask.

    transformers then builds a block-diagonal causal mask from the positions (sdpa/eager) and flash-attn uses
    the same positions for its variable-length kernels, so no sample attends to another. The model must run
    without a KV cache, or the packed-sequence detection is skipped. Each sample's first label is -100 (BOS or
    image), so no token is trained to predict across a sample boundary.
    """

    def __init__(self, ds: VisionTextDataset, max_length: int):
        self.ds, self.max_length = ds, max_length
        self.rows = pack(ds.lengths, max_length)
        self.lengths = np.array([sum(int(ds.lengths[i]) for i in r) for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict:
        items, used = [], 0
        for i in self.rows[r]:
            it = self.ds[i]
            # a sample that failed to load is replaced by another, maybe longer, one: never overflow the row
            if used + len(it["input_ids"]) > self.max_length:
                log.warning("packed row %d: a substituted sample does not fit; it is left out of this row", r)
                continue
            items.append(it)
            used += len(it["input_ids"])
        out = {
            "input_ids": torch.cat([it["input_ids"] for it in items]),
            "labels": torch.cat([it["labels"] for it in items]),
            "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
        }
        pix = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        out["pixel_values"] = torch.cat(pix) if pix else None
        return out


def as_hf_dataset(ds: VisionTextDataset | PackedDataset):
    """Wrap for trl, which accepts only `datasets.Dataset`: a table of (index, length) whose transform calls
    `ds[index]` on access, so items are still tokenized and images loaded lazily, per batch."""
    import datasets

    hf = datasets.Dataset.from_dict({"index": list(range(len(ds))), "length": [int(x) for x in ds.lengths]})

    def transform(batch: dict) -> dict:
        items = [ds[i] for i in batch["index"]]
        keys = ("input_ids", "labels", "pixel_values", "position_ids")
        # any item, not the first: a text-only first item must not drop the images of the rest
        return {k: [it.get(k) for it in items] for k in keys if any(k in it for it in items)}

    hf.set_transform(transform)
    return hf


@dataclass
class Collator:
    """Pads a list of samples on the right; labels pad with -100 so padding is never supervised."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(samples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for k, s in enumerate(samples):
            L = len(s["input_ids"])
            input_ids[k, :L] = s["input_ids"]
            labels[k, :L] = s["labels"]
            attention[k, :L] = 1
        if "position_ids" in samples[0]:
            # packed rows: positions restart per sample; padding forms its own run starting at 0, and no attention
            # mask is passed, which is what makes transformers build the block-diagonal mask
            pos = torch.zeros((n, longest), dtype=torch.long)
            for k, s in enumerate(samples):
                L = len(s["position_ids"])
                pos[k, :L] = s["position_ids"]
                pos[k, L:] = torch.arange(longest - L)
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": pos}
        else:
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # images in row order, as the model consumes them
        return batch
