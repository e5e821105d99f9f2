"""`qilin-lite eval [run] ...` and `qilin-lite eval compare ...`: thin commands over run.py and report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from ..options import Attn, Dtype, Load4bit, Load8bit, quant_bits
from .items import METRICS, PREDICTIONS, REPORT, TASKS
from .report import compare, render_report
from .run import run_benchmark


class _RunByDefault(TyperGroup):
    """`qilin-lite eval --model ...` is short for `qilin-lite eval run --model ...`."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Score a model on a medical VQA / caption benchmark (`eval run`, or just `eval --model ...`); "
    "compare runs.",
)


@eval_app.command("run")
def eval_run(
    data: Annotated[Path, typer.Option("--data", help="benchmark file in its published layout (docs/eval.md)")],
    task: Annotated[str, typer.Option("--task", help=" | ".join(TASKS))],
    out: Annotated[Path, typer.Option("--out", help="directory for predictions.jsonl, metrics.json, report.md; "
                                                    "rerun into it to resume")],
    model: Annotated[Optional[str], typer.Option("--model", help="qilin-lite run directory or Llava model")] = None,
    image_folder: Annotated[Optional[Path], typer.Option(
        "--image-folder", help="folder the image names are relative to (default: the data file's folder)")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="score only the first N questions")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="questions per forward pass")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="longest answer, in tokens")] = 64,
    load_4bit: Load4bit = False,
    load_8bit: Load8bit = False,
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", help="score answers made elsewhere (JSONL / JSON with id + prediction); no model")] = None,
    instruction: Annotated[Optional[str], typer.Option(
        "--instruction", help="a line added after every question (e.g. 'Answer with a single word or phrase.'); "
                              "recorded in the protocol")] = None,
    image_blind: Annotated[bool, typer.Option(
        "--image-blind", help="ask every question again with a blank image and with another question's image; "
                              "report how much the score depends on the image")] = False,
    judge: Annotated[Optional[str], typer.Option(
        "--judge", help="score open answers with a judge model at this OpenAI-compatible server too (e.g. a local "
                        "llama-server: http://127.0.0.1:8080); off by default")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="the judge's model name")] = None,
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", help="answer through this OpenAI-compatible server instead of loading a model (vLLM, SGLang, "
                           "llama-server, transformers serve, Ollama), e.g. http://127.0.0.1:8000")] = None,
    served_model: Annotated[Optional[str], typer.Option(
        "--served-model", help="the model's name at --endpoint (GET /v1/models lists it)")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="requests in flight at --endpoint")] = 4,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for one answer from --endpoint")] = 300,
    images_as: Annotated[Optional[str], typer.Option(
        "--images-as", help="send each image to --endpoint as this run saw it in training (square padding, "
                            "composite); default: the served model, where its name is an output directory here")] = None,
    dtype: Dtype = "auto",
    attn: Attn = "auto",
):
    """Answer a benchmark with a model or a server (or score answers made elsewhere); write predictions, metrics and
    a report."""
    metrics = run_benchmark(data, task, out, model=model, predictions=predictions, image_folder=image_folder,
                            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            bits=quant_bits(load_4bit, load_8bit), dtype=dtype, attn=attn,
                            instruction=instruction, image_blind=image_blind, judge_url=judge,
                            judge_model=judge_model, endpoint=endpoint, served_model=served_model,
                            concurrency=concurrency, timeout=timeout, images_as=images_as)
    typer.echo(render_report(metrics))
    typer.echo("written: " + ", ".join(str(Path(out) / name) for name in (PREDICTIONS, METRICS, REPORT)))


@eval_app.command("compare")
def eval_compare(
    paths: Annotated[list[Path], typer.Argument(help="eval --out directories, metrics.json or predictions.jsonl")],
    allow_protocol_diff: Annotated[bool, typer.Option(
        "--allow-protocol-diff", help="compare runs scored under different protocols anyway (flagged)")] = False,
):
    """One Markdown table with a column per run; each run after the first is tested against the first on the same
    questions (95% intervals, McNemar / paired bootstrap), and runs scored differently are refused."""
    typer.echo(compare(paths, allow_protocol_diff=allow_protocol_diff), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
