"""Training data: a recipe's records -> checked, tokenized, length-known dataset, before the Trainer exists.

Every record is read, every image decoded once, every sample tokenized once: a corrupt file or an impossible
length is reported now, not hours into training (or set aside in rejects.jsonl with --skip-bad). The checked
records go to an on-disk index (data/cache.py) that every rank and DataLoader worker shares; a restart on the same
data, tokenizer and settings reuses it instead of checking everything again.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..config import Recipe
from ..families import get_template
from ..data.records import Record, Reject, read_records, write_rejects
from ..distributed import gather_dicts, my_share, rank, wait_for_everyone, world_size
from ..errors import UserError
from ..heap import release_freed_memory
from ..model import image_mode_for, token_layout
from ..encoding import sample_lengths
from ..images.pixel_values import image_loader, record_counts
from .dataset import VisionTextDataset

log = logging.getLogger(__name__)

def shared_lengths(records: list[Record], template, tokenizer, layout, counts_of=None):
    """`sample_lengths`, each process tokenizing its share and all getting every result (as `verify_images`)."""
    if world_size() == 1:
        return sample_lengths(records, template, tokenizer, layout, counts_of=counts_of)
    mine = list(my_share(len(records)))
    part, part_bad = sample_lengths([records[i] for i in mine], template, tokenizer, layout, counts_of=counts_of)
    found = gather_dicts({i: int(n) for i, n in zip(mine, part)})
    bad = gather_dicts({mine[j]: reason for j, reason in part_bad.items()})
    return np.array([found[i] for i in range(len(records))], dtype=np.int64), bad


def verify_images(records: list[Record], rejects: list[Reject], skip_bad: bool, workers: int = 4,
                  verdicts=None) -> list[Record]:
    """Decode every image once so a corrupt file is reported before training, not hours into it.

    `verdicts` (data.cache.ImageVerdicts) remembers what each unchanged file gave, so a rerun decodes only new ones."""
    from ..images.decode import load_image

    def check(rec: Record):
        for ref in rec.images:
            if not isinstance(ref, Path):
                continue
            if verdicts is not None:
                known, problem = verdicts.known(ref)
                if known:
                    if problem:
                        return problem
                    continue
            try:
                load_image(ref)
            except UserError as e:
                if verdicts is not None:
                    verdicts.record(ref, str(e))
                return str(e)
            if verdicts is not None:
                verdicts.record(ref, None)
        return None

    # each process decodes its share (8 GPUs: an eighth each, not eight times everything) and all learn every
    # verdict, so every process drops the same records and the ranks' datasets stay identical
    mine = my_share(len(records))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = {i: problem for i, problem in zip(mine, pool.map(check, [records[i] for i in mine])) if problem}
    found = gather_dicts(found)
    if verdicts is not None:
        verdicts.entries = gather_dicts(verdicts.entries)
        if rank() == 0:
            verdicts.save()  # before any error below: the next attempt skips what was decoded
    kept = []
    for i, rec in enumerate(records):
        problem = found.get(i)
        if problem is None:
            kept.append(rec)
        elif skip_bad:
            rejects.append(Reject(rec.source, rec.line, rec.id, problem))
        else:
            raise UserError(f"{rec.where}: {problem} (or pass --skip-bad to set such records aside)")
    return kept


def write_rejects_once(rejects: list[Reject], out: Path) -> Path:
    """Every process finds the same records bad before training; one of them writes the list."""
    if rejects and rank() == 0:
        write_rejects(rejects, out)
    return out / "rejects.jsonl"


def build_dataset(recipe: Recipe, tokenizer, image_processor, model_config, out: Path, source: str | None = None):
    """The training set (or `source`, e.g. the eval file) under the same rules: records, images, lengths.

    The checked records go to an on-disk index (data/cache.py) that every rank and DataLoader worker shares; a
    restart on the same data, tokenizer and settings reuses it instead of checking everything again."""
    from ..data.cache import CACHE_DIR, RecordIndex, data_key, file_identity, tokenizer_identity
    from ..data.records import is_data_file, open_hf_dataset

    d = recipe.data
    source = source or d.train
    template = get_template(recipe.template)
    layout = token_layout(model_config, d.max_length, d.length_mode)
    images = image_loader(image_processor, image_mode_for(model_config, d.image_mode, recipe.image_mode))
    key = data_key({
        "data": file_identity(source), "image_folder": str(Path(d.image_folder).resolve()) if d.image_folder else None,
        "tokenizer": tokenizer_identity(tokenizer), "template": [template.name, template.system], "layout": layout,
        "verify_images": d.verify_images, "skip_bad": d.skip_bad, "hf": [d.split, d.image_column, d.messages_column],
        **({"allow_outside_images": True} if d.allow_outside_images else {}),  # keys of earlier runs stay valid
        **({"images": images.identity()} if hasattr(images, "identity") else {}),  # what sets image token counts
    })
    index_dir = out / CACHE_DIR / key
    hf = None if is_data_file(source) else open_hf_dataset(str(source), d.split)
    index = RecordIndex.load(index_dir, hf)
    if index is not None:
        log.info("reusing the records checked before (%s): %d records, %d set aside then (see rejects.jsonl)",
                 index_dir, len(index), index.meta["rejected"])
    else:
        records, lengths, rejects = check_records(recipe, source, tokenizer, template, layout, out, images)
        if rank() == 0:
            RecordIndex.write(index_dir, records, lengths, {"records": len(records), "rejected": len(rejects),
                                                            "source": str(source)})
        del records  # from here on the index serves them: 16 bytes a record in memory, none copied per worker
        release_freed_memory(collect=True)
        wait_for_everyone()
        index = RecordIndex.load(index_dir, hf)
        if index is None:
            raise RuntimeError(f"{index_dir}: the record index just written cannot be read back")
    dataset = VisionTextDataset(
        index, tokenizer, images, template, layout, index.lengths,
        rejects_path=out / "rejects.jsonl",
    )
    return dataset, int(index.meta["rejected"])


def check_records(recipe: Recipe, source, tokenizer, template, layout, out: Path, images=None):
    """Read, decode and tokenize every record once: (kept records, their lengths, rejects)."""
    from ..data.cache import CACHE_DIR, ImageVerdicts

    d = recipe.data
    rejects: list[Reject] = []
    try:
        records = read_records(
            source, d.image_folder, skip_bad=d.skip_bad, rejects=rejects, split=d.split,
            image_column=d.image_column, messages_column=d.messages_column,
            allow_outside_images=d.allow_outside_images,
        )
    except UserError:
        write_rejects_once(rejects, out)  # "no usable records ... see rejects.jsonl": make it exist
        raise
    if d.verify_images:
        # threads on every core this process's share of the machine has: PIL decodes without holding the GIL
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))  # processes sharing this machine
        records = verify_images(records, rejects, d.skip_bad, workers=max(2, cores // max(1, per_node)),
                                verdicts=ImageVerdicts(out / CACHE_DIR / "images.json"))
    lengths, bad = shared_lengths(records, template, tokenizer, layout, record_counts(images))
    if bad:
        first = min(bad)
        if not d.skip_bad:
            raise UserError(f"{records[first].where}: {bad[first]} (or pass --skip-bad to set such records aside)")
        rejects += [Reject(records[i].source, records[i].line, records[i].id, bad[i]) for i in sorted(bad)]
        keep = [i for i in range(len(records)) if i not in bad]
        records, lengths = [records[i] for i in keep], lengths[keep]
    if rejects:
        log.warning("%d record(s) set aside, listed in %s", len(rejects), write_rejects_once(rejects, out))
    if not records:
        raise UserError(f"{source}: every record was rejected; see {out / 'rejects.jsonl'}")
    return records, lengths, rejects
