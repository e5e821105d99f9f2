"""Data files, from raw sources to checked training records.

records.py reads training files (LLaVA JSON/JSONL, HF datasets) into validated Records; sources.py, items.py,
translate.py and build.py turn raw PMC / ChiMed-VL sources into such files (`data build`); cache.py keeps the
checked records on disk for every process; check.py, stats.py and inspect.py are the `data` commands' plain
functions, and cli.py their typer group.
"""
