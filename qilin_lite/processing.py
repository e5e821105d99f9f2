"""Records -> model inputs: input_ids, labels, pixel_values, and the collator that batches them.

In:  `Record`s (records.py), a tokenizer, an image processor, a `Template` (conversation.py).
Out: per sample `{"input_ids", "labels", "pixel_values"}`; per batch the same, padded, plus `attention_mask`.

The one rule that matters: only the assistant replies and the end token that closes each are supervised (label !=
-100). Everything else, the system prompt, user text, the image placeholder tokens, BOS and padding, gets -100.

Two encodings, one result shape:
- the authors' (their templates on a LLaMA SentencePiece tokenizer, as Qilin-Med-VL trained): text tokenized piece
  by piece between images with transformers 4.31's slow-tokenizer rules (tokens.py), labels from their round-by-round
  token counts (`preprocess_plain` / `preprocess_v1`). Equal, id for id, to their code (tests/test_paper_fidelity.py);
- any other tokenizer: the whole prompt tokenized at once, a token supervised when it starts inside a reply span
  that `conversation.render` marked.
Cut (`cut`): by default the authors' rule, `max_length` text ids with each image counting as one (so a 2048 cut
holds up to 2048 + 575 positions); `length_mode: total` caps every position instead. Image tokens are never cut in
part; a sample with no supervised token left is rejected before training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .conversation import IMAGE_TOKEN, Template, check_plain, place_image, render
from .data.records import BadRecord, Record
from .images.pixel_values import ImageLoader, pad_fill  # noqa: F401 - re-exported: the loader training and chat share
from .tokens import image_split_ids, slow_llama

IGNORE = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLayout:
    """What the tokenizer and the model agree on about images, and where sequences are cut."""

    image_token_id: int
    num_image_tokens: int  # tokens one image expands to (patches; CLS dropped)
    max_length: int
    # "text": max_length counts text ids with each image as one (the authors' cut: 2048 + 575 positions at most);
    # "total": every position counts, image tokens included (a hard cap for memory-bound runs)
    length_mode: str = "text"

    def __post_init__(self):
        if self.length_mode not in ("text", "total"):
            raise ValueError(f"length_mode must be text or total, not {self.length_mode!r}")


@dataclass
class Encoded:
    """One conversation as the model receives it, and what truncation did to it (for `data inspect`)."""

    input_ids: np.ndarray  # image tokens expanded
    labels: np.ndarray  # IGNORE where not supervised
    cut: str | None = None  # why and where the sequence was cut, or None


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans) -> np.ndarray:
    ids_arr = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = off[:, 0], off[:, 1]
    sup = np.zeros(len(ids_arr), dtype=bool)
    for s, e in spans:
        sup |= (starts >= s) & (starts < e) & (ends > starts)  # zero-width tokens (BOS) are never supervised
    return np.where(sup, ids_arr, IGNORE)


def expand_images(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
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


def uses_authors_encoding(tokenizer, template: Template) -> bool:
    """The authors' piecewise tokenization applies to their templates on a LLaMA SentencePiece tokenizer."""
    return template.llava and slow_llama(tokenizer) is not None


def text_ids(text: str, tokenizer, template: Template, image_token_id: int, breaks=()) -> list[int]:
    """A rendered prompt -> ids with one image id per `<image>` (not yet expanded); `breaks` from `Rendered`."""
    if breaks:
        return piece_ids(text, breaks, tokenizer, image_token_id)[0]
    sp = slow_llama(tokenizer) if template.llava else None
    if sp is None:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    return image_split_ids(text, sp, image_token_id, sp.bos_id)


def piece_ids(text: str, breaks, tokenizer, image_token_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of a text whose template tokenizes pieces on their own (`Rendered.breaks`), each
    piece split at `<image>` as LLaVA's `tokenizer_image_token` does, no special tokens added (HuatuoGPT-Vision's
    cli.py)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = list(breaks) + [len(text)]
    if bounds[0] != 0:
        bounds = [0] + bounds
    for lo, hi in zip(bounds, bounds[1:]):
        pos = lo
        for k, chunk in enumerate(text[lo:hi].split(IMAGE_TOKEN)):
            if k:
                ids.append(image_token_id)
                offsets.append((pos, pos + len(IMAGE_TOKEN)))
                pos += len(IMAGE_TOKEN)
            if chunk:
                enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(enc["input_ids"])
                offsets.extend((pos + a, pos + b) for a, b in enc["offset_mapping"])
            pos += len(chunk)
    return ids, offsets


def _authors_labels(text: str, template: Template, tokenizer, image_token_id: int, max_length: int):
    """(ids, labels) as the authors' `preprocess_plain` / `preprocess_v1` compute them: ids tokenized between images,
    labels masked by the token counts of each round tokenized on its own. Raises BadRecord where their count does
    not match the whole (their code then masks the whole record and trains on nothing)."""
    sp = slow_llama(tokenizer)
    enc = lambda t: image_split_ids(t, sp, image_token_id, sp.bos_id)  # noqa: E731
    ids = np.asarray(enc(text), dtype=np.int64)
    labels = ids.copy()
    if template.plain:  # the prompt is the image alone; the caption and its newline are the target
        labels[: len(enc(IMAGE_TOKEN))] = IGNORE
        return ids, labels
    sep = template.user_end + template.assistant + ": "
    cur = 1  # BOS
    labels[:cur] = IGNORE
    for rnd in text.split(template.reply_end):
        parts = rnd.split(sep)
        if rnd == "" or len(parts) != 2:
            break
        # the instruction's own trailing space token and BOS are not in the whole: hence -2
        instruction = len(enc(parts[0] + sep)) - 2
        labels[cur : cur + instruction] = IGNORE
        cur += len(enc(rnd))  # BOS of the round stands for the `</s>` that ends it in the whole
    labels[cur:] = IGNORE
    unk = sp.unk_id  # the authors pad with <unk> and count the non-pad ids
    total = int((ids != unk).sum())
    if cur < max_length and cur != total:
        raise BadRecord(
            f"its turns tokenize to {cur} ids one by one but {total} as a whole (the authors' code masks such a "
            "record and trains nothing on it); usually text that runs into '</s>', a reply containing "
            f"'{sep.strip()}', or characters outside the tokenizer; fix the text or drop the record"
        )
    return ids, labels


def encode_detail(messages: list[dict], template: Template, tokenizer, layout: TokenLayout) -> Encoded:
    """One conversation -> `Encoded`: ids and labels as training builds them (images expanded), cut to max_length.

    Raises BadRecord when the template cannot express the record, an image does not fit, or no supervised token is
    left after the cut."""
    check_image_count(messages, template)
    messages = place_image(messages, template)
    if template.plain:
        try:
            check_plain(messages)
        except ValueError as e:
            raise BadRecord(str(e)) from None
    r = render(messages, template, eos=tokenizer.eos_token or "")
    if uses_authors_encoding(tokenizer, template):
        ids, labels = _authors_labels(r.text, template, tokenizer, layout.image_token_id, layout.max_length)
    elif r.breaks:
        piece, offsets = piece_ids(r.text, r.breaks, tokenizer, layout.image_token_id)
        ids = np.asarray(piece, dtype=np.int64)
        labels = _labels_from_offsets(piece, offsets, r.supervised)
    else:
        enc = tokenizer(r.text, add_special_tokens=True, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        labels = _labels_from_offsets(enc["input_ids"], enc["offset_mapping"], r.supervised)
    return cut(ids, labels, layout)


def check_image_count(messages: list[dict], template: Template) -> None:
    n = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n > template.max_images:
        how = "joined into one composite" if template.multi_image == "composite" else "each its own image tokens"
        raise BadRecord(f"{n} images; the {template.name} template takes at most {template.max_images} ({how}); "
                        "split the record or drop images")


def encode(messages: list[dict], template: Template, tokenizer, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (input_ids, labels), image tokens expanded, cut to max_length (see `encode_detail`)."""
    e = encode_detail(messages, template, tokenizer, layout)
    return e.input_ids, e.labels


def cut(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout) -> Encoded:
    """Cut where the length mode says and expand images; an image is never cut in part."""
    n = layout.max_length
    img = np.flatnonzero(ids == layout.image_token_id)
    if layout.length_mode == "text":  # the authors' collator: the first max_length text ids, an image counting one
        if len(img) and img[-1] >= n:
            raise BadRecord(
                f"an image sits at text position {img[-1] + 1}, past max_length {n}; raise data.max_length or "
                "shorten the text before the image"
            )
        why = f"cut at {n} text ids (images count one each) from {len(ids)}" if len(ids) > n else None
        ids, labels = expand_images(ids[:n], labels[:n], layout)
    else:
        ids, labels = expand_images(ids, labels, layout)
        img = np.flatnonzero(ids == layout.image_token_id)
        if len(img) and img[-1] >= n:
            raise BadRecord(
                f"the image tokens end at position {img[-1] + 1} but max_length is {n} (counting image tokens); "
                "raise data.max_length or shorten the text before the image"
            )
        why = f"cut at {n} positions (image tokens included) from {len(ids)}" if len(ids) > n else None
        ids, labels = ids[:n], labels[:n]
    if not (labels != IGNORE).any():
        raise BadRecord(
            f"no reply token is left to learn from{' after the ' + why if why else ''}; raise data.max_length, "
            "shorten the question, or drop the record"
        )
    return Encoded(ids, labels, why)


def sample_lengths(records: list[Record], template: Template, tokenizer, layout: TokenLayout, batch: int = 512):
    """Token length of every record (for length grouping and packing) and the reason each bad one fails.

    Tokenizes in batches where transformers' tokenizer is used; cheap enough to run over 500k records up front.
    """
    lengths = np.zeros(len(records), dtype=np.int64)
    bad: dict[int, str] = {}
    if uses_authors_encoding(tokenizer, template) or template.style == "huatuo":  # tokenized piece by piece anyway
        for i, rec in enumerate(records):
            try:
                lengths[i] = len(encode(rec.messages, template, tokenizer, layout)[0])
            except BadRecord as e:
                bad[i] = str(e)
        return lengths, bad
    for lo in range(0, len(records), batch):
        chunk = records[lo : lo + batch]
        rendered = []
        for j, rec in enumerate(chunk):
            msgs = place_image(rec.messages, template)
            try:
                check_image_count(rec.messages, template)
                if template.plain:
                    check_plain(msgs)
            except ValueError as e:  # BadRecord is one
                bad[lo + j] = str(e)
                rendered.append(None)
                continue
            rendered.append(render(msgs, template, eos=tokenizer.eos_token or ""))
        texts = [x.text if x is not None else "" for x in rendered]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        for j, (ids, off, x) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], rendered)):
            if x is None:
                continue
            labels = _labels_from_offsets(ids, off, x.supervised)
            try:
                lengths[lo + j] = len(cut(np.asarray(ids, dtype=np.int64), labels, layout).input_ids)
            except BadRecord as e:
                bad[lo + j] = str(e)
    return lengths, bad


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
        return self._first_loadable(i, self._item)

    def _first_loadable(self, i: int, load):
        """`load(record i)`, or of the next record that loads. A file that decoded during the up-front check can
        still fail here (disk, network mount). One bad sample must not end a run hours in: record it and serve the
        next sample instead."""
        for attempt in range(len(self.records)):
            rec = self.records[(i + attempt) % len(self.records)]
            try:
                return load(rec)
            except Exception as e:  # noqa: BLE001 - any per-sample failure is recorded, not fatal
                self._reject(rec, e)
        raise RuntimeError("every sample failed to load")

    def _item(self, rec: Record) -> dict:
        item, opened = self._unprocessed(rec)
        if opened:
            item["pixel_values"] = self.images.process(opened)
        return item

    def _unprocessed(self, rec: Record) -> tuple[dict, list]:
        """Tokens and labels, and the record's images decoded and squared (what can fail per record)."""
        ids, labels = encode(rec.messages, self.template, self.tokenizer, self.layout)
        return ({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)},
                self.images.open_record(list(rec.images or ()), self.template))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch, as the DataLoader asks for it: each record tokenized and its images opened as in `__getitem__`
        (a failing record is recorded and replaced by the next), then one image-processor call for every image of
        the batch. Per call the processor validates its arguments and sets up, which at training's image sizes
        costs more than resizing one image; the pixels are the same as per item."""
        items, opened = [], []
        for i in indices:
            item, imgs = self._first_loadable(i, self._unprocessed)
            items.append(item)
            opened.append(imgs)
        flat = [img for imgs in opened for img in imgs]
        if flat:
            pixels, k = self.images.process(flat), 0
            for item, imgs in zip(items, opened):
                if imgs:
                    item["pixel_values"] = pixels[k:k + len(imgs)]
                    k += len(imgs)
        return items

    def _reject(self, rec: Record, err: Exception) -> None:
        msg = f"{rec.where}: skipped during training: {err}"
        log.warning(msg)
        if self.rejects_path is not None:
            with open(self.rejects_path, "a", encoding="utf-8") as f:
                row = {"source": rec.source, "line": rec.line, "id": rec.id, "reason": str(err), "during": "training"}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def as_hf_dataset(ds):
    """Wrap for trl, which accepts only `datasets.Dataset`: a table of (index, length) whose transform calls
    `ds[index]` on access, so items are still tokenized and images loaded lazily, per batch."""
    import datasets

    hf = datasets.Dataset.from_dict({"index": list(range(len(ds))), "length": [int(x) for x in ds.lengths]})

    def transform(batch: dict) -> dict:
        items = ds.__getitems__(batch["index"]) if hasattr(ds, "__getitems__") else [ds[i] for i in batch["index"]]
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
            # mask is passed: with no cache (training) transformers then builds the per-sample mask for sdpa and
            # flex_attention from the positions (with a cache it does not); flash-attention 2 reads them itself
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
