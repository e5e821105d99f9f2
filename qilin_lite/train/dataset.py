"""Checked records -> the samples training reads: tokens and labels (encoding.py), images decoded and processed.

In:  `Record`s, a tokenizer, an `ImageLoader` (images/pixel_values.py), a `Template`, a `TokenLayout`, the lengths
     `sample_lengths` computed.
Out: per sample `{"input_ids", "labels", "pixel_values"}` (and `image_grid_thw` at native resolution), built lazily per batch in DataLoader workers; a sample
     that fails to load is recorded in rejects.jsonl and replaced by the next.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.records import Record
from ..encoding import TokenLayout, encode
from ..families import Template
from ..images.pixel_values import ImageLoader

log = logging.getLogger(__name__)


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
            item.update(self.images.inputs(opened))
        return item

    def _unprocessed(self, rec: Record) -> tuple[dict, list]:
        """Tokens and labels, and the record's images decoded and squared (what can fail per record); at native
        resolution the images are opened first, since their sizes give their token counts."""
        opened = self.images.open_record(list(rec.images or ()), self.template)
        ids, labels = encode(rec.messages, self.template, self.tokenizer, self.layout, self.images.counts(opened))
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.layout.marks:
            # which tokens are image tokens: Qwen2.5-VL computes its 3-D positions from them (without them it
            # silently falls back to 1-D positions), Gemma 3 its bidirectional image attention; their processors
            # return them beside input_ids
            item[self.layout.marks] = torch.from_numpy((ids == self.layout.image_token_id).astype(np.int64))
        return item, opened

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
            for item, vision in zip(items, self.images.split(self.images.inputs(flat), [len(x) for x in opened])):
                item.update(vision)
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
        keys = ("input_ids", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids",
                "position_ids")
        # any item, not the first: a text-only first item must not drop the images of the rest
        return {k: [it.get(k) for it in items] for k in keys if any(k in it for it in items)}

    hf.set_transform(transform)
    return hf
