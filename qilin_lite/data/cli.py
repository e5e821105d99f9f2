"""`qilin-lite data build | check | inspect | stats`: thin commands over build.py, check.py, inspect.py and
stats.py (added to the CLI by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

data_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Build, check and describe ChiMed-VL-style training data (LLaVA conversation files).",
)

Model = Annotated[Optional[str], typer.Option("--model", help="Llava or run directory: its tokenizer counts tokens")]


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("pairs")
def pairs_cmd(
    eval_dir: Annotated[Path, typer.Argument(help="an output directory of qilin-lite eval (its predictions.jsonl)")],
    out: Annotated[Path, typer.Option("--out", help="new JSONL file of preference pairs for qilin-lite prefer")],
):
    """Preference pairs from an eval run: each wrong answer rejected, the reference answer chosen."""
    from ..prefer.pairs import pairs_from_eval

    n = pairs_from_eval(eval_dir, out)
    typer.echo(f"{n} pairs written to {out}  (next: qilin-lite prefer --from RUN --data {out})")


@data_app.command("build")
def build_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="sources: PMC-OA / PMC-CaseReport / PMC-VQA / ChiMed-VL files (JSONL, JSON, CSV, Parquet)")],
    out: Annotated[Path, typer.Option("--out", help="output file: .jsonl (default) or .json")],
    image_folder: Annotated[Optional[list[Path]], typer.Option("--image-folder", help="folder with the images, once or once per input (default: the input's folder)")] = None,
    task: Annotated[str, typer.Option("--task", help="auto | align (caption/context -> stage 1) | instruct (question/answer -> stage 2)")] = "auto",
    layout: Annotated[str, typer.Option("--layout", help="auto | llava | pmc-oa | pmc-casereport | pmc-vqa | fields")] = "auto",
    id_field: Annotated[Optional[str], typer.Option("--id-field")] = None,
    image_field: Annotated[Optional[str], typer.Option("--image-field", help="a file name, or a list of 1-4 file names")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="caption / inline / context text (align)")] = None,
    question_field: Annotated[Optional[str], typer.Option("--question-field")] = None,
    answer_field: Annotated[Optional[str], typer.Option("--answer-field")] = None,
    choices_field: Annotated[Optional[str], typer.Option("--choices-field", help="one list field, or several fields separated by commas")] = None,
    text_kind: Annotated[Optional[str], typer.Option("--text-kind", help="caption | context: which prompt set (default: context for a 'context' field)")] = None,
    source_name: Annotated[Optional[str], typer.Option("--source-name", help="the records' 'source' (default: the dataset's name)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl | json (default: from --out's suffix)")] = None,
    min_chars: Annotated[int, typer.Option("--min-chars", help="drop captions/contexts shorter than this (characters)")] = 10,
    min_question_chars: Annotated[int, typer.Option("--min-question-chars")] = 4,
    max_images: Annotated[int, typer.Option("--max-images", help="drop records with more images (1-4 for composites)")] = 4,
    images: Annotated[str, typer.Option("--images", help="composite (the paper: a multi-image item becomes one image) | separate (a list, one <image> each: HuatuoGPT-Vision)")] = "composite",
    seed: Annotated[int, typer.Option("--seed", help="prompt choice; same seed and input, same bytes out")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="processes making composites (0: none)")] = 2,
    limit: Annotated[Optional[int], typer.Option("--limit", help="only the first N input rows (a quick trial)")] = None,
    translate_url: Annotated[Optional[str], typer.Option("--translate-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")] = None,
    translate_model: Annotated[Optional[str], typer.Option("--translate-model", help="e.g. gpt-3.5-turbo (as the paper)")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="environment variable holding the API key")] = "OPENAI_API_KEY",
    translate_batch: Annotated[int, typer.Option("--translate-batch", help="texts per request")] = 8,
    translate_retries: Annotated[int, typer.Option("--translate-retries")] = 6,
    translate_cache: Annotated[Optional[Path], typer.Option("--translate-cache", help="sqlite cache (default OUT.translations.sqlite)")] = None,
):
    """Raw sources -> LLaVA conversation file + OUT.rejects.jsonl + OUT.report.json."""
    from ..errors import UserError
    from .build import BuildConfig, build, format_build_report
    from .sources import FieldMap
    from .translate import TranslateConfig

    tr = None
    if translate_url or translate_model:
        if not (translate_url and translate_model):
            raise UserError("translation needs both --translate-url and --translate-model")
        tr = TranslateConfig(translate_url, translate_model, api_key_env, batch_size=translate_batch,
                             retries=translate_retries, cache=translate_cache)
    fields = FieldMap(id_field, image_field, text_field, question_field, answer_field,
                      [c.strip() for c in choices_field.split(",")] if choices_field else None)
    cfg = BuildConfig(task=task, layout=layout, fields=fields, text_kind=text_kind, source_name=source_name,
                      out_format=fmt, min_chars=min_chars, min_question_chars=min_question_chars,
                      max_images=max_images, images=images, seed=seed, workers=workers, limit=limit, translate=tr)
    typer.echo(format_build_report(build(inputs, out, image_folder, cfg), out))


@data_app.command("check")
def check_cmd(
    file: Annotated[Path, typer.Argument(help="LLaVA JSON/JSONL training file")],
    image_folder: Annotated[Optional[Path], typer.Option("--image-folder", help="default: the file's folder")] = None,
    model: Model = None,
    max_length: Annotated[int, typer.Option("--max-length", help="the training cut (see --length-mode)")] = 2048,
    length_mode: Annotated[str, typer.Option("--length-mode", help="text: text ids, an image counting one (the authors') | total: every position")] = "text",
    template: Annotated[Optional[str], typer.Option("--template", help="plain | vicuna_v1 (default: the model's run template, else vicuna_v1)")] = None,
    examples: Annotated[int, typer.Option("--examples", help="examples shown per problem")] = 5,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="decode every image (slowest part)")] = True,
    workers: Annotated[Optional[int], typer.Option("--workers", help="threads decoding images")] = None,
    allow_outside_images: Annotated[bool, typer.Option("--allow-outside-images", help="image names may lead outside --image-folder (absolute paths on purpose)")] = False,
):
    """Validate every record as training would; exit 1 when any record fails."""
    from ..errors import UserError
    from .check import check_data

    if length_mode not in ("text", "total"):
        raise UserError(f"--length-mode must be text or total, not '{length_mode}'")
    result = check_data(file, image_folder, model=model, max_length=max_length, template=template,
                        examples=examples, decode=decode, workers=workers, length_mode=length_mode,
                        allow_outside_images=allow_outside_images)
    typer.echo(result.format())
    if not result.ok:
        # SystemExit, not typer.Exit: cli.main runs the app with standalone_mode=False, which turns Exit into a
        # return value and would exit 0
        raise SystemExit(1)


@data_app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="LLaVA JSON/JSONL training file (or a dataset, as training takes)")],
    model: Annotated[str, typer.Option("--model", help="base, Llava or run directory (or hub id) whose tokenizer trains")],
    image_folder: Annotated[Optional[Path], typer.Option("--image-folder", help="default: the file's folder")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="take template and max length from this recipe")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="plain | vicuna_v1 (default: the run's or recipe's)")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="default: the run's or recipe's, else 2048")] = None,
    length_mode: Annotated[Optional[str], typer.Option("--length-mode", help="text | total (default: the run's or recipe's, else text)")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="records shown (from the start of the file)")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per record: id, input_ids, labels as the model gets them")] = False,
    color: Annotated[Optional[bool], typer.Option("--color/--no-color", help="default: colour on a terminal, [brackets] otherwise")] = None,
):
    """Show records as training tokenizes them: supervised tokens marked, counts, where and why the cut fell."""
    from .inspect import inspect_records

    inspect_records(file, model, image_folder=image_folder, recipe=recipe, template=template, max_length=max_length,
                    length_mode=length_mode, n=n, as_json=as_json, color=color)


@data_app.command("stats")
def stats_cmd(
    file: Annotated[Path, typer.Argument(help="LLaVA JSON/JSONL file")],
    model: Model = None,
    image_folder: Annotated[Optional[Path], typer.Option("--image-folder", help="also describe image sizes (headers only)")] = None,
    out: Annotated[Path, typer.Option("--out", help="PNG of the length histograms (numbers in the .json beside it)")] = Path("stats.png"),
):
    """Pairs, tokens, max, median (Q1, Q3) per text field and source (the paper's Table 1/2), image sizes."""
    from .stats import data_stats, format_stats

    typer.echo(format_stats(data_stats(file, model=model, image_folder=image_folder, out=out)))
