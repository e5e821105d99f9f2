"""Rows -> `Item`s (one record's images and texts, whatever layout it came from) -> LLaVA conversations, with the
paper's prompts (about 20 per task). A row that cannot become a record raises `Drop` with the build step it fails.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import IMAGE_TOKEN
from .records import BadRecord, messages_from_llava
from .sources import Layout

log = logging.getLogger(__name__)

PROMPTS: dict[str, tuple[str, ...]] = {
    "caption": (
        "请描述这张图像。", "简要描述图中所见。", "这张医学图像显示了什么？", "请为这张图像写一段说明。",
        "图中有哪些主要发现？", "请解读这张医学图像。", "用几句话概括这张图像的内容。", "请给出这张图像的图注。",
        "描述一下这幅影像的主要表现。", "这幅图展示的是什么内容？", "请说明图像中的关键信息。", "你能描述一下这张图片吗？",
        "请对该图像进行简要的医学描述。", "这张图像的要点是什么？", "请分析这张图像并给出描述。", "图像中可以观察到什么？",
        "请总结这张图像所呈现的信息。", "请详细说明这张图像。", "看图说明：这张图像显示了什么？", "请为这张医学影像撰写描述。",
    ),
    "context": (
        "请结合病例背景解释这张图像。", "这张图像出现在怎样的临床背景中？", "请介绍与这张图像相关的病例信息。",
        "结合上下文，说明这张图像的意义。", "这张图像对应的病例情况是怎样的？", "请根据图像讲述相关的临床经过。",
        "请说明这张图像所在病例的背景。", "这张影像与患者的病情有什么关系？", "请提供这张图像的临床背景信息。",
        "请结合病史描述这张图像。", "这张图像反映了病例中的哪些情况？", "请阐述这张图像在病例报告中的作用。",
        "根据这张图像，介绍一下相关病例。", "请描述与该图像相关的诊疗过程。", "这张图像是在什么情况下拍摄的？",
        "请从病例的角度解读这张图像。", "请概述这张图像相关的临床资料。", "这张图像所属病例的要点是什么？",
        "请说明该图像在诊断中的意义。", "请结合上下文对这张图像进行说明。",
    ),
    "vqa": (
        "{question}", "请根据图像回答：{question}", "请看图回答下面的问题。\n{question}", "根据这张医学图像，{question}",
        "问题：{question}", "结合图像内容回答：{question}", "请仔细观察图像，回答：{question}", "关于这张图像：{question}",
        "请回答与图像相关的问题：{question}", "基于图中所见，{question}", "请分析图像后回答。{question}",
        "图像问题：{question}", "根据影像表现回答以下问题：{question}", "看这张图，{question}",
        "请根据医学图像作答：{question}", "这是一道看图问答题。{question}", "请结合图像给出答案：{question}",
        "观察这幅影像，{question}", "{question}\n请根据图像回答。", "请依据图像信息回答问题：{question}",
    ),
}


class Drop(Exception):
    """A row left out of the output: `step` names the build step, the message says why (never quotes text)."""

    def __init__(self, step: str, reason: str, rid: str | None = None):
        super().__init__(reason)
        self.step, self.rid = step, rid


@dataclass
class Item:
    id: str
    line: int
    file: str
    source: str
    task: str  # caption | context | vqa | dialog
    names: list[str]  # image references as the row gives them
    texts: dict[str, str]  # caption/context: text; vqa: question, answer, choice_1..; dialog: turn_1..
    roles: list[str] = field(default_factory=list)  # dialog only: human/gpt per turn
    paths: list[str] = field(default_factory=list)  # absolute, once found
    rel: list[str] = field(default_factory=list)  # the same, relative to OUT's folder
    image: str | list[str] | None = None  # as written to OUT: one file (maybe a composite), or a list (separate)
    source_text: dict[str, str] = field(default_factory=dict)


_CHOICE_LABEL = re.compile(r"^\s*[A-Ha-h]\s*[:.)：、]\s*")


def image_names(value: Any, split: bool = True) -> list[str]:
    """A list, a JSON/Python list literal (PMC-CaseReport's `img_ref`), or names split on , ; | (with `split`)."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(s)
                except (ValueError, SyntaxError):
                    raise Drop("fields", "image field is not a readable list") from None
        else:
            value = re.split(r"[,;|]", s) if split else [s]
    if not isinstance(value, (list, tuple)):
        raise Drop("fields", "image field is not a file name or a list of file names")
    names = [str(v).strip() for v in value if v is not None and str(v).strip()]
    return names


def _text(row: dict, key: str | None) -> str:
    value = row.get(key) if key else None
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas-made CSV/Parquet
        return ""
    return str(value).strip()


def _derived_id(prefix: str, names: list[str], texts: dict[str, str]) -> str:
    # No id in the row: a hash of its content, so exact duplicates share an id and deduplicate.
    h = hashlib.sha1("\x1f".join(names + [f"{k}={v}" for k, v in sorted(texts.items())]).encode("utf-8"))
    return f"{prefix}-{h.hexdigest()[:12]}"


def row_to_item(row: dict, layout: Layout, line: int, file: str, source: str | None) -> Item:
    if layout.name == "llava":
        return _llava_item(row, layout, line, file, source)
    k = layout.keys
    names = image_names(row.get(k["image"]))
    if layout.task == "vqa":
        texts = {"question": _text(row, k["question"]), "answer": _text(row, k["answer"])}
        choices = []
        for ck in k["choices"] or []:
            v = row.get(ck)
            choices += list(v) if isinstance(v, (list, tuple)) else [v]
        choices = [_CHOICE_LABEL.sub("", str(c)).strip() for c in choices if c is not None and str(c).strip()]
        texts.update({f"choice_{i}": c for i, c in enumerate(choices, 1)})
        if _CHOICE_LABEL.sub("", texts["answer"]) in choices:  # "B:Focal uptake" -> "Focal uptake", as the choices
            texts["answer"] = _CHOICE_LABEL.sub("", texts["answer"])
    else:
        texts = {layout.task: _text(row, k["text"])}
    rid = _text(row, k["id"])
    if not rid:
        prefix = _text(row, "PMC_id") or (Path(names[0]).stem if names else Path(file).stem)
        rid = _derived_id(prefix, names, texts)
    return Item(rid, line, file, source or layout.source or Path(file).stem, layout.task, names, texts)


def _llava_item(row: dict, layout: Layout, line: int, file: str, source: str | None) -> Item:
    try:  # the turns as training parses them (records.messages_from_llava)
        messages = messages_from_llava(row.get("conversations", row.get("messages")))
    except BadRecord as e:
        raise Drop("fields", str(e)) from None
    roles, texts = [], {}
    for i, m in enumerate(messages, 1):
        if m["role"] not in ("user", "assistant"):
            raise Drop("fields", f"turn {i} needs a human/gpt role and a text value")
        roles.append("human" if m["role"] == "user" else "gpt")
        # tags are collapsed: one composite image, one <image> at the start of the first human turn
        texts[f"turn_{i}"] = m["content"].replace(IMAGE_TOKEN, "").strip()
    names = image_names(row.get("image", row.get("images")), split=False)
    rid = row.get(layout.keys["id"])
    rid = str(rid) if rid not in (None, "") else _derived_id(Path(file).stem, names, texts)
    src = source or (row.get("source") if isinstance(row.get("source"), str) else None) or Path(file).stem
    return Item(rid, line, file, src, "dialog", names, texts, roles)


def too_short(item: Item, min_chars: int, min_question_chars: int) -> str | None:
    t = item.texts
    if item.task in ("caption", "context"):
        n = len(t[item.task])
        return f"{item.task} has {n} characters, fewer than --min-chars {min_chars}" if n < min_chars else None
    if item.task == "vqa":
        if len(t["question"]) < min_question_chars:
            return f"question has {len(t['question'])} characters, fewer than --min-question-chars {min_question_chars}"
        return "empty answer" if not t["answer"] else None
    for i, role in enumerate(item.roles, 1):
        if not t[f"turn_{i}"] and (role == "gpt" or i > 1 or not item.names):  # only an image may stand alone
            return f"turn {i} is empty"
    if item.roles[:2] == ["human", "gpt"] and not t["turn_1"]:  # image-only question: a caption record
        n = len(t["turn_2"])
        return f"caption has {n} characters, fewer than --min-chars {min_chars}" if n < min_chars else None
    return None


def image_count(item: Item) -> int:
    """How many `<image>` the record's first question carries: one per file it names."""
    return len(item.image) if isinstance(item.image, list) else int(bool(item.image))


def conversation(item: Item, seed: int) -> list[dict]:
    """Item -> LLaVA turns; the prompt is drawn from PROMPTS with an RNG seeded by (seed, task, id), so the draw
    does not depend on the order or the chunking of the input."""
    tag = (IMAGE_TOKEN + "\n") * image_count(item)
    if item.task == "dialog":
        turns = []
        for i, role in enumerate(item.roles, 1):
            value = item.texts[f"turn_{i}"]
            if i == 1 and role == "human":
                value = (tag + value).rstrip("\n")  # "<image>" alone when the question is the image
            turns.append({"from": role, "value": value})
        return turns
    rng = random.Random(f"{seed}:{item.task}:{item.id}")
    prompt = rng.choice(PROMPTS[item.task])
    if item.task == "vqa":
        choices = [v for k, v in item.texts.items() if k.startswith("choice_")]
        q = item.texts["question"]
        if choices:
            q += "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        return [{"from": "human", "value": tag + prompt.format(question=q)},
                {"from": "gpt", "value": item.texts["answer"]}]
    return [{"from": "human", "value": tag + prompt}, {"from": "gpt", "value": item.texts[item.task]}]


def source_text(item: Item) -> dict:
    st = item.source_text
    out: dict[str, Any] = {k: v for k, v in st.items() if not k.startswith(("choice_", "turn_"))}
    choices = [item.source_text.get(k, v) for k, v in item.texts.items() if k.startswith("choice_")]
    if any(k.startswith("choice_") for k in st):
        out["choices"] = choices
    if any(k.startswith("turn_") for k in st):
        out["conversations"] = [st.get(f"turn_{i}", item.texts[f"turn_{i}"]) for i in range(1, len(item.roles) + 1)]
    return out
