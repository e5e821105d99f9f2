"""The text a model is shown for an EvalItem (`format_prompt`): the question as the benchmark asks it.

Multiple choice is shown with lettered options and how to answer (Chinese when the question is), except where a
benchmark's authors wrote their own prompt (omnimedvqa.py, mmmu.py) or the file is LLaVA's
format (task "llava": shown as written, the prompt the model was trained on).
"""

from __future__ import annotations

import re

from .items import CHOICE_INSTRUCTIONS, EvalItem
from .matching import LETTERS
from .mmmu import mmmu_prompt, mmmu_short_prompt
from .omnimedvqa import omnimedvqa_prompt


def format_prompt(item: EvalItem, instruction: str | None = None) -> str:
    """The text to show the model: the question, plus lettered options and how to answer for multiple choice, plus
    `instruction` (eval --instruction) on a line of its own.

    LLaVA-format items (task "llava") are shown as written: their prompt is the one the model was trained on.
    """
    if item.kind == "short" and item.task == "mmmu":
        text = mmmu_short_prompt(item.question)
    elif item.kind != "choice" or item.task == "llava":
        text = item.question
    elif item.task in ("omnimedvqa", "mmmu"):  # their authors' prompts (omnimedvqa.py, mmmu.py)
        text = (omnimedvqa_prompt if item.task == "omnimedvqa" else mmmu_prompt)(item.question, item.choices)
    else:
        lines = [item.question] + [f"{letter}. {c}" for letter, c in zip(LETTERS, item.choices)]
        zh = re.search(r"[\u4e00-\u9fff]", item.question + "".join(item.choices))
        lines.append(CHOICE_INSTRUCTIONS["zh" if zh else "en"])
        text = "\n".join(lines)
    return f"{text}\n{instruction}" if instruction else text
