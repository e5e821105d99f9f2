"""A conversation -> the ids and labels the model trains on; a prompt -> the ids it answers from.

In:  messages (records.py's `Record.messages`, or chat's history), a tokenizer, a `Template` (families/), the
     `TokenLayout` the tokenizer and model agree on.
Out: `Encoded(input_ids, labels, cut)`, image tokens expanded; `sample_lengths` gives every record's length by the
     same steps (`prepare`), so a length can never disagree with the ids training builds.

The one rule that matters: only the assistant replies and the end token that closes each are supervised (label !=
-100). Everything else, the system prompt, user text, the image placeholder tokens, BOS and padding, gets -100.
How text becomes ids is the template's (`Template.ids_and_labels`: the authors' piecewise encoding for the paper's
templates on a LLaMA SentencePiece tokenizer; otherwise the whole prompt at once, a token supervised when it starts
inside a reply span).
Cut (`cut`): by default the authors' rule, `max_length` text ids with each image counting as one (so a 2048 cut
holds up to 2048 + 575 positions); `length_mode: total` caps every position instead. Image tokens are never cut in
part; a sample with no supervised token left is rejected before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data.records import BadRecord, Record
from .families import IGNORE, Rendered, Template, image_count
from .families.base import TEXT_LT, labels_from_offsets, text_ids


@dataclass(frozen=True)
class TokenLayout:
    """What the tokenizer and the model agree on about images, and where sequences are cut."""

    image_token_id: int
    num_image_tokens: int  # tokens one image expands to (patches; CLS dropped)
    max_length: int
    # "text": max_length counts text ids with each image as one (the authors' cut: 2048 + 575 positions at most);
    # "total": every position counts, image tokens included (a hard cap for memory-bound runs)
    length_mode: str = "text"
    # the batch key marking image tokens for models that compute positions or attention from it (families.Family)
    marks: str | None = None

    def __post_init__(self):
        if self.length_mode not in ("text", "total"):
            raise ValueError(f"length_mode must be text or total, not {self.length_mode!r}")


@dataclass
class Encoded:
    """One conversation as the model receives it, and what truncation did to it (for `data inspect`)."""

    input_ids: np.ndarray  # image tokens expanded
    labels: np.ndarray  # IGNORE where not supervised
    cut: str | None = None  # why and where the sequence was cut, or None


def expand_images(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout,
                  counts=None) -> tuple[np.ndarray, np.ndarray]:
    """Replace each image token by `num_image_tokens` copies (labels -100), or by `counts[k]` copies for the k-th
    image where the count follows the image's size (native resolution: Qwen2.5-VL)."""
    where_img = np.flatnonzero(ids == layout.image_token_id)
    if len(where_img) == 0:
        return ids, labels
    reps = np.ones(len(ids), dtype=np.int64)
    if counts is None:
        reps[where_img] = layout.num_image_tokens
    else:
        if len(counts) < len(where_img):
            raise BadRecord(f"{len(where_img)} image slots in the text but {len(counts)} images")
        reps[where_img] = np.asarray(counts[: len(where_img)], dtype=np.int64)
    ids = np.repeat(ids, reps)
    labels = np.repeat(labels, reps)
    labels[ids == layout.image_token_id] = IGNORE
    return ids, labels


def prompt_ids(messages: list[dict], template: Template, tokenizer, layout: TokenLayout, counts=None) -> np.ndarray:
    """A history ending in a user turn -> the ids the model answers from (chat, web, eval, the demo): training's
    steps up to the assistant tag, with the template's tokenization and images expanded."""
    r = template.render(template.place_images(messages), add_generation_prompt=True)
    ids = np.asarray(template.prompt_ids(r, tokenizer, layout.image_token_id), dtype=np.int64)
    return expand_images(ids, np.zeros_like(ids), layout, counts)[0]


def prepare(messages: list[dict], template: Template, eos: str) -> Rendered:
    """The template's steps before tokenizing: the image count, placement, what the format can express, render.
    Raises BadRecord."""
    problem = template.image_count_problem(image_count(messages))
    if problem:
        raise BadRecord(problem + "; split the record or drop images")
    messages = template.place_images(messages)
    try:
        template.check_record(messages)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    return template.render(messages, eos=eos)


def encode_detail(messages: list[dict], template: Template, tokenizer, layout: TokenLayout, counts=None) -> Encoded:
    """One conversation -> `Encoded`: ids and labels as training builds them (images expanded), cut to max_length.

    Raises BadRecord when the template cannot express the record, an image does not fit, or no supervised token is
    left after the cut."""
    r = prepare(messages, template, tokenizer.eos_token or "")
    try:
        ids, labels = template.ids_and_labels(r, tokenizer, layout.image_token_id, layout.max_length)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    return cut(ids, labels, layout, counts)


def encode(messages: list[dict], template: Template, tokenizer, layout: TokenLayout,
           counts=None) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (input_ids, labels), image tokens expanded, cut to max_length (see `encode_detail`).
    `counts`: each image's token count where it follows the image's size; None: `layout.num_image_tokens` each."""
    e = encode_detail(messages, template, tokenizer, layout, counts)
    return e.input_ids, e.labels


def cut(ids: np.ndarray, labels: np.ndarray, layout: TokenLayout, counts=None) -> Encoded:
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
        ids, labels = expand_images(ids[:n], labels[:n], layout, counts)
    else:
        ids, labels = expand_images(ids, labels, layout, counts)
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


def sample_lengths(records: list[Record], template: Template, tokenizer, layout: TokenLayout, batch: int = 512,
                   counts_of=None):
    """Token length of every record (for length grouping and packing) and the reason each bad one fails.

    Tokenizes in batches where the template tokenizes its text whole; cheap enough to run over 500k records up
    front. The steps are `encode_detail`'s: `prepare`, the template's labels rule, `cut`. `counts_of(record)`: its
    images' token counts where they follow the images' sizes (native resolution), so lengths are the true ones.
    """
    lengths = np.zeros(len(records), dtype=np.int64)
    bad: dict[int, str] = {}
    if not template.batch_tokenizable(tokenizer):  # tokenized piece by piece anyway
        for i, rec in enumerate(records):
            try:
                counts = counts_of(rec) if counts_of is not None else None
                lengths[i] = len(encode(rec.messages, template, tokenizer, layout, counts)[0])
            except BadRecord as e:
                bad[i] = str(e)
        return lengths, bad
    eos = tokenizer.eos_token or ""
    for lo in range(0, len(records), batch):
        rendered: list[Rendered | None] = []
        for j, rec in enumerate(records[lo : lo + batch]):
            try:
                rendered.append(prepare(rec.messages, template, eos))
            except BadRecord as e:
                bad[lo + j] = str(e)
                rendered.append(None)
        texts = [x.text if x is not None else "" for x in rendered]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        for j, (ids, off, x) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], rendered)):
            if x is None:
                continue
            if TEXT_LT in x.text:  # text spelling a tag, kept as text: tokenized as `ids_and_labels` does it
                ids, off = text_ids(tokenizer, x.text)
            labels = labels_from_offsets(ids, off, x.supervised)
            try:
                counts = counts_of(records[lo + j]) if counts_of is not None else None
                lengths[lo + j] = len(cut(np.asarray(ids, dtype=np.int64), labels, layout, counts).input_ids)
            except BadRecord as e:
                bad[lo + j] = str(e)
    return lengths, bad
