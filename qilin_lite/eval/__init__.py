"""`qilin-lite eval`: benchmark file -> EvalItems -> predictions.jsonl -> metrics + report.

One step a module, as the data flows (the file layouts, outputs and rules are specified in docs/eval.md):
- items.py: `EvalItem` (one question, whatever layout it came from) and the prompt shown to the model;
- benchmarks.py: the published benchmark layouts -> EvalItems (`load_eval_items`);
- run.py: answering (`run_eval` with an injected `generate`, or `model_generate` for a qilin-lite model), resume,
  answers made elsewhere, the demo's held-out score;
- metrics.py: scoring rules, pure functions (no model, no files);
- report.py: metrics -> Markdown, `eval compare`;
- cli.py: the typer group (`eval run`, `eval compare`).
"""

from .benchmarks import load_eval_items
from .items import KINDS, TASKS, EvalItem, format_prompt
from .report import compare, metrics_from_predictions, render_report
from .run import model_generate, run_benchmark, run_eval, score_demo_heldout

__all__ = ["EvalItem", "KINDS", "TASKS", "compare", "format_prompt", "load_eval_items", "metrics_from_predictions",
           "model_generate", "render_report", "run_benchmark", "run_eval", "score_demo_heldout"]
