"""Answering a benchmark: EvalItems -> predictions.jsonl (resumable) -> metrics.json + report.md.

The model is injected: `run_eval(items, generate, out_dir)` calls `generate(batch of EvalItems) -> list[str]`
(`format_prompt(item)` is the text to show the model). `model_generate(model_dir)` is that callable for a
qilin-lite model (greedy, loaded by `generate.load_generator`); tests pass fakes. `score_demo_heldout` is the
demo's held-out accuracy, computed by this same code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..families import IMAGE_TOKEN, get_template, typed_text
from ..errors import UserError, where
from ..files import write_text_atomic
from .benchmarks import load_eval_items
from .endpoint import PartialAnswers, endpoint_generate
from .endpoint import check_flags as check_endpoint_flags
from .items import METRICS, PREDICTIONS, REPORT, EvalItem, scan_predictions
from .judge import JUDGE_CACHE, PROMPT_VERSION, http_judge, is_local, judge_open
from .matching import as_text
from .metrics import aggregate, score_item
from .prompt import format_prompt
from .protocol import PROTOCOL, build_protocol, differences, file_sha256, model_protocol
from .records import ANSWER_KEYS, ID_KEYS, first_of, read_benchmark_records
from .reliance import control_items, reliance
from .report import render_report

log = logging.getLogger(__name__)


def run_eval(
    items: Sequence[EvalItem],
    generate: Callable[[list[EvalItem]], list[str]] | None,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    predictions_file: str | Path | None = None,
    controls: Sequence[str] = (),
    fill: tuple[int, int, int] = (127, 127, 127),
    protocol: dict | None = None,
    judge: tuple[Callable[[str], str], str] | None = None,
) -> dict:
    """Answer (or take answers for) each item, append them to OUT/predictions.jsonl, then write metrics and report.

    With `generate`, a rerun into the same `out_dir` resumes: ids already in predictions.jsonl are not generated
    again. With `predictions_file`, answers come from that file (matched by id) and no model runs. `controls`
    (reliance.CONTROLS) asks every question again without its image (blank images in `fill`, or swapped).
    `protocol` (protocol.build_protocol) is recorded; a rerun with another protocol is refused. `judge` (ask, model
    name) scores open answers with a judge model (judge.py), cached in OUT/judge.jsonl.
    """
    _check_flags(generate is not None, predictions_file is not None, limit, batch_size, bool(controls))
    if limit is not None:
        items = list(items[:limit])
    if not items:
        raise UserError("no items to evaluate; check --data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    if protocol is not None:
        _same_protocol(out, protocol)

    if predictions_file is not None:
        answers = _read_external(Path(predictions_file), items)
        with open(pred_path, "w", encoding="utf-8") as f:
            f.write("".join(_prediction_line(it, answers[it.id]) for it in items))
    else:
        _answer(pred_path, items, generate, batch_size)
    predictions = _read_answers(pred_path, items)
    metrics = aggregate(items, predictions)
    if controls:
        metrics["image_reliance"] = {}
        for control in controls:
            shown = control_items(items, control, out / "controls", fill)
            path = out / f"predictions.{control}.jsonl"
            _answer(path, shown, generate, batch_size)
            metrics["image_reliance"][control] = reliance(items, predictions, _read_answers(path, shown))
    if judge is not None:
        metrics["judge"] = judge_open(items, predictions, judge[0], judge[1], out / JUDGE_CACHE)
    if protocol is not None:
        metrics["protocol"] = protocol
    write_text_atomic(out / REPORT, render_report(metrics))  # metrics.json last: its presence means finished
    write_text_atomic(out / METRICS, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    return metrics


def _check_flags(model: bool, predictions: bool, limit: int | None, batch_size: int, controls: bool,
                 endpoint: bool = False) -> None:
    if model + predictions + endpoint != 1:
        raise UserError("give one source of answers, not both or none: a model (--model), a server (--endpoint "
                        "URL --served-model NAME) or answers made elsewhere (--predictions FILE)")
    if controls and predictions:
        raise UserError("--image-blind asks the model again without the images: it needs --model or --endpoint, "
                        "not --predictions")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def _answer(pred_path: Path, items: Sequence[EvalItem], generate, batch_size: int) -> None:
    """Append the answers of the items not yet in `pred_path`, a batch at a time, each batch synced to disk."""
    done = _resume(pred_path, {it.id: it for it in items})
    todo = [it for it in items if it.id not in done]
    check_images(todo)
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            try:
                answers = list(generate(batch))
            except PartialAnswers as e:  # a server stopped mid-batch: what it answered is kept for the resume
                f.write("".join(_prediction_line(it, a) for it, a in zip(batch, e.answers)))
                f.flush()
                os.fsync(f.fileno())
                kept = len(done) + start + len(e.answers)
                raise UserError(f"{e} ({kept} of {len(items)} answers are kept in {pred_path}; rerun into the same "
                                "--out to go on)") from None
            if len(answers) != len(batch):
                raise ValueError(f"generate returned {len(answers)} answers for a batch of {len(batch)}")
            f.write("".join(_prediction_line(it, a) for it, a in zip(batch, answers)))
            f.flush()
            os.fsync(f.fileno())  # what is on disk is what a rerun resumes from


def _read_answers(pred_path: Path, items: Sequence[EvalItem]) -> list[str]:
    written = {rec["id"]: rec for _, rec in scan_predictions(pred_path)[0]}
    return [written[it.id]["prediction"] for it in items]


def _same_protocol(out: Path, protocol: dict) -> None:
    """Record the protocol at the first run; a resume under another one would mix two protocols in one file."""
    path = out / PROTOCOL
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            before = None
        changed = differences(before, protocol, include_model=True)
        # a resume may score more questions, add controls, or find its server on another address
        changed = [c for c in changed if not c.startswith(("benchmark.n:", "benchmark.limit:", "controls:",
                                                           "model.endpoint:", "model.server.listed_models:"))]
        if changed:
            raise UserError(f"{out}: answered before under another protocol ({'; '.join(changed[:3])}); "
                            "use a new --out for this run")
    write_text_atomic(path, json.dumps(protocol, ensure_ascii=False, indent=2) + "\n")


def _prediction_line(item: EvalItem, prediction: Any) -> str:
    text = as_text(prediction)
    rec = {
        "id": item.id,
        "task": item.task,
        "kind": item.kind,
        "lang": item.lang,
        "image": item.image,
        **({"parts": list(item.parts)} if item.parts else {}),
        "question": item.question,
        "choices": item.choices,
        "reference": item.reference,
        "prediction": text,
        **score_item(item, text),
    }
    return json.dumps(rec, ensure_ascii=False) + "\n"


def _resume(pred_path: Path, by_id: dict[str, EvalItem]) -> set[str]:
    """Ids already answered in `pred_path`; cuts off a torn last line so appending starts on a fresh line."""
    if not pred_path.exists():
        return set()
    lines, good_end = scan_predictions(pred_path)
    with open(pred_path, "r+b") as f:
        f.truncate(good_end)
        if good_end:  # a last line that parsed but lost its newline gets one back
            f.seek(good_end - 1)
            ends_clean = f.read(1) == b"\n"
            f.seek(good_end)
            if not ends_clean:
                f.write(b"\n")
    done = set()
    for n, rec in lines:
        item = by_id.get(str(rec["id"]))
        if item is None:
            continue  # e.g. an earlier run with a larger --limit
        if rec.get("task") != item.task or rec.get("reference") != item.reference:
            raise UserError(
                f"{where(pred_path, n, item.id)}: written for other data (task {rec.get('task')!r}, reference "
                f"{rec.get('reference')!r}); use a new --out for this run"
            )
        done.add(item.id)
    return done


def check_images(items: Iterable[EvalItem]) -> None:
    """Fail before generating anything rather than after hours of it."""
    for it in items:
        for image in ([it.image] if it.image is not None else []) + list(it.parts):
            if not Path(image).is_file():
                raise UserError(f"{where(image, record_id=it.id)}: image not found; check --image-folder")


def _read_external(path: Path, items: Sequence[EvalItem]) -> dict[str, str]:
    """id -> answer text from a file of answers produced elsewhere."""
    if not path.is_file():
        raise UserError(f"{path}: no such predictions file; check --predictions")
    answers: dict[str, str] = {}
    for line, pos, rec in read_benchmark_records(path):
        loc = where(path, line, f"record {pos}" if line is None else None)
        if not isinstance(rec, dict):
            raise UserError(f"{loc}: expected a JSON object with an id and a prediction")
        rid = first_of(rec, ID_KEYS)
        key = next((k for k in ANSWER_KEYS if k in rec), None)
        if rid is None or key is None:
            raise UserError(
                f"{loc}: needs an id ({' / '.join(ID_KEYS)}) and an answer ({' / '.join(ANSWER_KEYS)})"
            )
        answers[str(rid)] = as_text(rec[key])
    missing = [it.id for it in items if it.id not in answers]
    if missing:
        raise UserError(
            f"{path}: no prediction for {len(missing)} of {len(items)} questions (first id {missing[0]}); every "
            "question scored needs a line with its id (use --limit to score the first N only)"
        )
    return answers


def model_generate(
    model_dir: str | Path,
    *,
    bits: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    dtype: str = "auto",
    template: str | None = None,
    attn: str = "auto",
    instruction: str | None = None,
) -> Callable[[list[EvalItem]], list[str]]:
    """Load a model directory once; return `generate(items) -> answers` for `run_eval` (greedy decoding).

    Each item is one user turn, "<image>\n" + `format_prompt(item)` (no image token for an item without an image),
    rendered in the run's template (or `template`); `batch_size` items go through the model at a time.
    dtype "auto" and attn "auto" are the loader's choice for this machine (device.py), as in chat and web.
    """
    from ..serve.generate import load_generator

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    override = get_template(template) if template is not None else None  # a bad name fails before loading
    gen, _ = load_generator(str(model_dir), bits=bits, dtype=None if dtype == "auto" else dtype, attn=attn,
                            max_new_tokens=max_new_tokens, temperature=0.0)
    if override is not None:
        gen.template = override

    def generate(items: list[EvalItem]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            answers += gen.generate([conversation_for(it, gen.template, instruction) for it in batch],
                                    [it.shown(gen.template) for it in batch])
        return answers

    return generate


def conversation_for(item: EvalItem, template, instruction: str | None = None) -> list[dict]:
    """The one user turn an item is asked as: an image mark per image the template shows, then the prompt (typed
    tags in it kept as text). Shared by eval and the task metrics during training (train/task_eval.py)."""
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * len(item.shown(template))
             + typed_text(format_prompt(item, instruction), template)}]


def _load_on_first_call(load: Callable[[], Callable]) -> Callable:
    """A `generate` that loads the model when first asked: bad flags, missing images and a resume with nothing
    left to do then never wait minutes for a 13B model."""
    loaded: list[Callable] = []

    def generate(batch):
        if not loaded:
            loaded.append(load())
        return loaded[0](batch)

    return generate


def run_benchmark(
    data: str | Path,
    task: str,
    out: str | Path,
    *,
    model: str | Path | None = None,
    predictions: str | Path | None = None,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    bits: int | None = None,
    dtype: str = "auto",
    attn: str = "auto",
    instruction: str | None = None,
    image_blind: bool = False,
    judge_url: str | None = None,
    judge_model: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    concurrency: int = 4,
    timeout: float = 300,
    images_as: str | None = None,
) -> dict:
    """`qilin-lite eval run`: read DATA as TASK, answer with MODEL, a server at ENDPOINT (endpoint.py) or take
    PREDICTIONS; write OUT; the metrics."""
    from ..images.pixel_values import pad_fill
    from .reliance import CONTROLS

    items = load_eval_items(data, task, image_folder)
    _check_flags(model is not None, predictions is not None, limit, batch_size, image_blind, endpoint is not None)
    if (endpoint is None) != (served_model is None):
        raise UserError("--endpoint URL and --served-model NAME go together (e.g. --endpoint http://127.0.0.1:8000 "
                        "--served-model runs/tune-merged)")
    if endpoint is not None:
        check_endpoint_flags(endpoint, served_model, concurrency, timeout)
    elif images_as is not None:
        raise UserError("--images-as RUN prepares the images sent to --endpoint; without a server, drop it")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if (judge_url is None) != (judge_model is None):
        raise UserError("--judge URL and --judge-model NAME go together (e.g. --judge http://127.0.0.1:8080 "
                        "--judge-model qwen2.5-7b-instruct)")
    judge = None
    if judge_url is not None:
        if not judge_url.startswith(("http://", "https://")):
            raise UserError(f"--judge {judge_url}: give the server's address, e.g. http://127.0.0.1:8080")
        if not is_local(judge_url):
            log.warning("--judge %s is not this machine: questions, reference answers and the model's answers are "
                        "sent there", judge_url)
        judge = (http_judge(judge_url, judge_model), judge_model)
    generate, fill, controls = None, (127, 127, 127), list(CONTROLS) if image_blind else []
    if model is not None:
        check_images(items[:limit] if limit else items)  # before anything about the model is read
        generate = _load_on_first_call(
            lambda: model_generate(model, bits=bits, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                                   attn=attn, instruction=instruction)
        )
        described = model_protocol(str(model))
        fill = pad_fill(described["image_processor"]["image_mean"] or (0.5, 0.5, 0.5))
        decoding = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": dtype, "bits": bits}
    elif endpoint is not None:
        check_images(items[:limit] if limit else items)  # before the server is asked anything
        generate, described = endpoint_generate(endpoint, served_model, max_new_tokens=max_new_tokens,
                                                concurrency=concurrency, timeout=timeout, instruction=instruction,
                                                images_as=images_as)
        if isinstance(described.get("images"), dict):  # --images-as: the blank image in that run's mean colour
            fill = tuple(described["images"]["fill"])
        # answers are written a batch at a time; several rounds of requests in flight per batch keep the server busy
        batch_size = concurrency * 4
        decoding = {"max_new_tokens": max_new_tokens, "temperature": 0, "top_p": 1, "served": True}
    else:
        described = {"predictions": Path(predictions).name, "sha256": file_sha256(Path(predictions))
                     if Path(predictions).is_file() else None}
        decoding = {"made_elsewhere": True}
    n = min(len(items), limit) if limit else len(items)
    protocol = build_protocol(data=Path(data), task=task, limit=limit, n=n, instruction=instruction,
                              decoding=decoding, controls=controls, model=described,
                              judge={"model": judge_model, "prompt_version": PROMPT_VERSION} if judge else None)
    return run_eval(items, generate, out, batch_size=batch_size, limit=limit, predictions_file=predictions,
                    controls=controls, fill=fill, protocol=protocol, judge=judge)


def score_demo_heldout(
    model_dir: str | Path, heldout_path: str | Path, images_dir: str | Path, template: str | None = None
) -> dict:
    """The demo's held-out accuracy, by the eval code: {"accuracy": over all records, "per_task": {task: accuracy}}.

    Every held-out record has `choices`, `answer` and `task` (side, modality, ...); read as task "llava" they are
    choice items, right when the greedy answer names the reference option and no other. `template` overrides the
    run's own (the demo asks its align run, trained on the plain template, in the tune run's template).
    Decoding matches the demo's own runs: float32, 8 new tokens, 16 questions per batch.
    """
    path = Path(heldout_path)
    items = load_eval_items(path, "llava", images_dir)
    not_choice = [it.id for it in items if it.kind != "choice"]
    if not_choice:
        raise UserError(f"{where(path, record_id=not_choice[0])}: held-out records need choices and an answer")
    labels = [str(rec.get("task", "llava")) for _, _, rec in read_benchmark_records(path)]  # one per item, same order
    check_images(items)
    answers = model_generate(model_dir, max_new_tokens=8, batch_size=16, dtype="float32", template=template)(items)

    def accuracy(pick: list[int]) -> float:
        return aggregate([items[i] for i in pick], [answers[i] for i in pick])["groups"]["all"]["accuracy"]

    per_task = {t: accuracy([i for i, x in enumerate(labels) if x == t]) for t in dict.fromkeys(labels)}
    return {"accuracy": accuracy(list(range(len(items)))), "per_task": per_task}
