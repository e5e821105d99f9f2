"""Preference pairs: a file of image(s) + prompt + chosen + rejected reply -> checked pairs -> DPO batches.

Layouts read (JSON or JSONL; an `id` is optional, images by `image` or `images`, names relative to --image-folder):
- trl / RLAIF-V: `prompt` (text or a list of turns), `chosen`, `rejected` (text, or a list whose last turn is the
  reply); RLAIF-V's own `question` for `prompt`;
- LLaMA-Factory, ShareGPT style: `conversations` ending in the user's turn, `chosen` / `rejected` as {from, value};
- LLaMA-Factory, Alpaca style: `instruction` (+ `input`), `chosen` / `rejected` as text.
A prompt without `<image>` tags gets one per image before its first question (as trl and LLaMA-Factory place them).

Each reply is encoded as training encodes a dialog (encoding.encode, the family's template and tokenization), so the
prompt a pair is scored on is the prompt `chat` sends; only the final reply's tokens count, earlier turns are
context. Out per pair: chosen and rejected ids and labels, the images processed once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.records import BadRecord, Reject, _from_llava, messages_from_llava, write_rejects
from ..data.rows import iter_json
from ..encoding import encode, prompt_ids
from ..errors import UserError, where
from ..families import IGNORE, IMAGE_TOKEN
from ..train.collator import Collator

log = logging.getLogger(__name__)


@dataclass
class Pair:
    id: str
    prompt: list[dict]  # messages ending in the user's turn
    chosen: str
    rejected: str
    images: list[Path] = field(default_factory=list)
    source: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        return where(self.source, self.line, self.id)


def _reply(value, name: str) -> str:
    """A reply as text: a string, {from/role, value/content}, or a list of turns whose last is the reply."""
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"'{name}' is an empty list; give the reply text")
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
        if isinstance(value, list):  # typed parts
            value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"'{name}' must be a non-empty reply (text, {{from, value}}, or a list of turns)")
    return value


def _prompt(row: dict) -> list[dict]:
    if "conversations" in row or "messages" in row:
        turns = messages_from_llava(row.get("conversations", row.get("messages")))
    elif isinstance(row.get("prompt"), list):
        turns = messages_from_llava(row["prompt"])
    else:
        text = row.get("prompt", row.get("question"))
        if text is None and "instruction" in row:
            text = "\n".join(str(x) for x in (row.get("instruction"), row.get("input")) if x)
        if not isinstance(text, str) or not text.strip():
            raise BadRecord("no prompt: give 'prompt' (or 'question', 'instruction', 'conversations')")
        turns = [{"role": "user", "content": text}]
    if not turns or turns[-1]["role"] != "user":
        raise BadRecord("the prompt must end with the user's turn; chosen and rejected are the replies to it")
    return turns


def pair_from_row(row, folder: Path, default_id: str, allow_outside_images: bool = False) -> Pair:
    if not isinstance(row, dict):
        raise BadRecord("a pair must be a JSON object with a prompt, 'chosen' and 'rejected'")
    for name in ("chosen", "rejected"):
        if name not in row:
            raise BadRecord(f"no '{name}' reply; a preference pair needs both 'chosen' and 'rejected'")
    prompt = _prompt(row)
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise BadRecord("'chosen' and 'rejected' are the same reply; a pair must differ")
    image = row.get("image", row.get("images"))
    names = [] if image in (None, "", []) else image if isinstance(image, list) else [image]
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in prompt if m["role"] == "user")
    if names and tags == 0:  # trl's and LLaMA-Factory's placement when the text has no tags
        first = next(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt[first] = {**prompt[first], "content": f"{IMAGE_TOKEN}\n" * len(names) + prompt[first]["content"]}
    # the dialog checks training applies (roles, tags against images, image files inside the folder), once per reply
    rec = None
    for reply in (chosen, rejected):
        rec = _from_llava({"id": row.get("id"), "conversations": prompt + [{"role": "assistant", "content": reply}],
                                   "images": names}, folder, default_id, allow_outside_images)
    return Pair(rec.id, prompt, chosen, rejected, list(rec.images))


def read_pairs(path, image_folder=None, *, skip_bad: bool = False, rejects: list[Reject] | None = None,
               allow_outside_images: bool = False) -> list[Pair]:
    """Every pair of a JSON / JSONL file, checked; the first bad one is a UserError naming its line, unless
    `skip_bad` (then set aside in `rejects`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: preference file not found; pass --data PAIRS.jsonl")
    folder = Path(image_folder) if image_folder else p.parent
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found; pass --image-folder with the folder holding the images")
    contain = image_folder is not None and not allow_outside_images
    out, seen = [], set()
    rejects = rejects if rejects is not None else []
    for line, row, error in iter_json(p, on_broken="raise"):
        rid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else None
        try:
            if error:
                raise BadRecord(error)
            pair = pair_from_row(row, folder, f"{p.name}:{line}", not contain)
            pair.source, pair.line = str(p), line
            if pair.id in seen:
                raise BadRecord(f"duplicate id '{pair.id}'; ids must be unique")
            seen.add(pair.id)
            out.append(pair)
        except BadRecord as e:
            if not skip_bad:
                raise UserError(f"{where(p, line, rid)}: {e} (or pass --skip-bad to set such pairs aside)") from None
            rejects.append(Reject(str(p), line, rid, str(e)))
    if not out:
        raise UserError(f"{p}: no usable pairs" + (f" ({len(rejects)} rejected, see rejects.jsonl)" if rejects else ""))
    return out


def reply_only(ids: np.ndarray, labels: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """Labels with only the final reply supervised: nothing before the end of chat's prompt (earlier replies of a
    multi-turn prompt are context, as trl counts the completion alone; and a family whose own fine-tuning code
    supervises the prompt text too, Gemma 3's notebook, still scores the reply alone here), tune's labels after it."""
    n = len(prompt)
    if len(ids) < n or not np.array_equal(ids[:n], prompt):
        raise BadRecord("the reply does not start where chat's prompt ends (cut by --max-length, or a template "
                        "that cannot separate them); shorten the prompt or raise --max-length")
    out = labels.copy()
    out[:n] = IGNORE
    if not (out != IGNORE).any():
        raise BadRecord("no reply token is left after the prompt (cut by --max-length); raise --max-length")
    return out


class PairDataset(torch.utils.data.Dataset):
    """Pairs -> per item {"chosen": sample, "rejected": sample}, each sample as training's dataset builds it
    (input_ids, labels, the image-token marks; pixel_values / image_grid_thw on the chosen side, shared)."""

    def __init__(self, pairs: list[Pair], tokenizer, images, template, layout):
        self.pairs, self.tokenizer, self.images, self.template, self.layout = pairs, tokenizer, images, template, layout
        self.lengths = np.zeros(len(pairs), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def encode(self, pair: Pair, counts=None) -> tuple[dict, dict]:
        """(chosen sample, rejected sample) without pixels; raises BadRecord."""
        sides = []
        prompt = prompt_ids(pair.prompt, self.template, self.tokenizer, self.layout, counts)
        for reply in (pair.chosen, pair.rejected):
            ids, labels = encode(pair.prompt + [{"role": "assistant", "content": reply}], self.template,
                                 self.tokenizer, self.layout, counts)
            s = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(reply_only(ids, labels, prompt))}
            if self.layout.marks:
                s[self.layout.marks] = torch.from_numpy((ids == self.layout.image_token_id).astype(np.int64))
            sides.append(s)
        return sides[0], sides[1]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        items, opened = [], []
        for i in indices:
            pair = self.pairs[i]
            imgs = self.images.open_record(list(pair.images), self.template)
            chosen, rejected = self.encode(pair, self.images.counts(imgs))
            items.append({"chosen": chosen, "rejected": rejected})
            opened.append(imgs)
        flat = [img for imgs in opened for img in imgs]
        if flat:
            for item, vision in zip(items, self.images.split(self.images.inputs(flat), [len(x) for x in opened])):
                item["chosen"].update(vision)
        return items


def check_pairs(pairs: list[Pair], dataset: PairDataset, skip_bad: bool, rejects: list[Reject], out: Path):
    """Encode every pair once before training (image token counts from the image sizes): a reply cut to nothing or
    a prompt the template cannot express is reported now, naming the pair. Returns the kept pairs."""
    from ..images.decode import load_image

    kept, lengths = [], []
    for pair in pairs:
        try:
            for ref in pair.images:
                load_image(ref)
            counts = dataset.images.counts(dataset.images.open_record(list(pair.images), dataset.template))
            chosen, rejected = dataset.encode(pair, counts)
        except (BadRecord, UserError) as e:
            if not skip_bad:
                raise UserError(f"{pair.where}: {e} (or pass --skip-bad to set such pairs aside)") from None
            rejects.append(Reject(pair.source, pair.line, pair.id, str(e)))
            continue
        kept.append(pair)
        lengths.append(len(chosen["input_ids"]) + len(rejected["input_ids"]))
    if rejects:
        log.warning("%d pair(s) set aside, listed in %s", len(rejects), write_rejects(rejects, out))
    if not kept:
        raise UserError(f"every pair was rejected; see {out / 'rejects.jsonl'}")
    dataset.pairs, dataset.lengths = kept, np.asarray(lengths, dtype=np.int64)
    return kept


@dataclass
class PairCollator:
    """Pairs -> one batch as trl's DPOTrainer reads it: every chosen row, then every rejected row (right-padded),
    `completion_mask` marking the final reply's tokens, the images once per row in row order."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        rows = [it["chosen"] for it in items] + [{**it["rejected"], **{k: v for k, v in it["chosen"].items()
                                                                     if k in ("pixel_values", "image_grid_thw")}}
                                                 for it in items]
        batch = Collator(self.pad_token_id)(rows)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE).long()
        return batch


def as_pair_dataset(ds: PairDataset):
    """For trl, which wants a `datasets.Dataset`: a table of indices whose transform builds the pairs on access."""
    import datasets

    hf = datasets.Dataset.from_dict({"index": list(range(len(ds)))})

    def transform(batch: dict) -> dict:
        items = ds.__getitems__(batch["index"])
        return {"chosen": [it["chosen"] for it in items], "rejected": [it["rejected"] for it in items]}

    hf.set_transform(transform)
    return hf


# ---------------------------------------------------------------- the builder
def pairs_from_eval(eval_dir: Path, out_file: Path) -> int:
    """`qilin-lite prefer pairs EVAL_DIR OUT.jsonl`: each question an eval run answered wrong becomes a pair, the
    reference answer chosen and the model's answer rejected, asked as eval asked it (eval/prompt.py). Returns the
    number of pairs written; never over an existing file."""
    from ..eval.items import EvalItem
    from ..eval.matching import LETTERS
    from ..eval.prompt import format_prompt
    from ..files import write_text_atomic

    pred = Path(eval_dir) / "predictions.jsonl"
    if not pred.is_file():
        raise UserError(f"{eval_dir}: no predictions.jsonl; pass an output directory of `qilin-lite eval`")
    if Path(out_file).exists():
        raise UserError(f"{out_file} exists; choose a new file for the pairs (nothing is overwritten)")
    rows = []
    for line, rec, error in iter_json(pred, on_broken="raise"):
        if error or not isinstance(rec, dict) or "prediction" not in rec:
            raise UserError(f"{where(pred, line, None)}: not a prediction line of qilin-lite eval")
        if rec.get("correct") in (True, 1, 1.0) or rec.get("kind") == "caption":
            continue  # right answers, and captions (no wrong / right), make no pair
        item = EvalItem(id=str(rec["id"]), image=rec.get("image"), question=rec["question"],
                        reference=str(rec["reference"]), task=rec["task"], kind=rec["kind"],
                        choices=rec.get("choices"), lang=rec.get("lang"))
        prompt = format_prompt(item)
        chosen = item.reference
        if item.kind == "choice" and item.task == "llava":
            # asked as written (no lettered options, eval/prompt.py): the answer is the option's text
            chosen = item.choices[LETTERS.index(item.reference)]
        if not str(rec["prediction"]).strip() or rec["prediction"].strip() == chosen.strip():
            continue
        images = [str(Path(i).resolve()) for i in (rec.get("parts") or ([rec["image"]] if rec.get("image") else []))]
        rows.append({"id": item.id, "images": images,
                     "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n" * len(images) + prompt}],
                     "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rec["prediction"]}})
    if not rows:
        raise UserError(f"{pred}: no wrong answers to build pairs from")
    write_text_atomic(Path(out_file), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
