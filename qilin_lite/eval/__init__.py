"""`qilin-lite eval`: benchmark file -> EvalItems -> predictions.jsonl -> metrics + report.

One step a module, as the data flows (the file layouts, outputs and rules are specified in docs/eval.md):
- items.py: `EvalItem` (one question, whatever layout it came from) and the files a run writes;
- benchmarks.py: the published benchmark layouts -> EvalItems (`load_eval_items`), one module a benchmark: vqa_json.py
  (VQA-RAD, SLAKE, PathVQA, captions, LLaVA-format), pmc_vqa.py, omnimedvqa.py, mmmu.py (the last two with their
  authors' prompts and scoring rules); records.py reads the JSON / JSONL records they and `--predictions` come in;
- prompt.py: the text shown to the model for an item (`format_prompt`);
- run.py: answering (`run_eval` with an injected `generate`, or `model_generate` for a qilin-lite model), resume,
  answers made elsewhere, the demo's held-out score;
- matching.py: the answer-matching rules every benchmark shares (normalisation, option letters, yes/no, recall,
  BLEU, ROUGE-L), pure functions of text;
- metrics.py: those rules applied per item kind (`score_item`) and summed per run (`aggregate`);
- stats.py (intervals, paired tests), protocol.py (what a run was), reliance.py (`--image-blind`), judge.py
  (`--judge`);
- report.py: metrics -> Markdown, `eval compare`;
- cli.py: the typer group (`eval run`, `eval compare`).
"""

from .benchmarks import load_eval_items
from .items import KINDS, TASKS, EvalItem
from .prompt import format_prompt
from .report import compare, metrics_from_predictions, render_report
from .run import model_generate, run_benchmark, run_eval, score_demo_heldout

__all__ = ["EvalItem", "KINDS", "TASKS", "compare", "format_prompt", "load_eval_items", "metrics_from_predictions",
           "model_generate", "render_report", "run_benchmark", "run_eval", "score_demo_heldout"]
