"""Raw ChiMed-VL-style sources -> LLaVA training files (`qilin-lite data build`).

`build`  In:  caption sources (PMC-OA `{image, caption}`, PMC-CaseReport `{PMC_id, img_ref, context, inline,
              question, answer}`), VQA sources (PMC-VQA CSV `Figure_path, Question, Answer, Choice A..D`), ChiMed-VL's
              own files (LLaVA conversations, or any layout named with field options); JSONL, JSON, CSV/TSV or Parquet.
         Out: OUT (JSONL or a JSON list) of `{"id", "image", "conversations", "source", "task"}` records whose image
              paths are relative to OUT's folder (so `align --data OUT` needs no --image-folder), composites in
              `<OUT stem>_images/`, every dropped record in `OUT.rejects.jsonl`, counts per step in `OUT.report.json`.
         Steps: read -> fields -> duplicate id -> >4 images -> missing image -> too short -> translate (opt-in)
              -> composite (worker processes) -> validate (records.validate_messages) -> write. The input is streamed
              in chunks; only the set of ids seen is held for the whole run.
`check` and `stats` live in datacheck.py and datastats.py.

Reports name only what the input itself holds about a record (file, line, id, image file names); no text is copied
into a reject or an error, because case reports describe patients.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .conversation import IMAGE_TOKEN
from .errors import UserError
from .records import ROLE_NAMES, BadRecord, Reject, iter_jsonl, validate_messages

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- prompts (about 20 per task, as the paper)

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

# ---------------------------------------------------------------- source layouts

FIELD_NAMES = ("id", "image", "text", "question", "answer", "choices")


@dataclass
class FieldMap:
    """Which input field holds what; None = look it up by the layout's usual names. `choices` may name one list
    field or several fields (PMC-VQA's `Choice A`..`Choice D`)."""

    id: str | None = None
    image: str | None = None
    text: str | None = None
    question: str | None = None
    answer: str | None = None
    choices: list[str] | None = None


# layout -> (display name used as `source`, field -> candidate names). Matching ignores case.
LAYOUTS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "pmc-oa": ("PMC-OA", {"id": ("id",), "image": ("image",), "text": ("caption",)}),
    "pmc-casereport": ("PMC-CaseReport", {
        "id": ("id",), "image": ("img_ref",), "text": ("context",), "question": ("question",), "answer": ("answer",),
    }),
    "pmc-vqa": ("PMC-VQA", {
        "id": ("id",), "image": ("Figure_path",), "question": ("Question",), "answer": ("Answer", "Anwser"),
        "choices": ("Choice A", "Choice B", "Choice C", "Choice D"),
    }),
    "fields": ("", {
        "id": ("id", "question_id", "qid"),
        "image": ("image", "images", "img_ref", "figure_path", "image_path", "img", "file_name"),
        "text": ("caption", "text", "context", "inline", "description"),
        "question": ("question", "query"), "answer": ("answer", "anwser", "response"),
        "choices": ("choices", "options"),
    }),
}


@dataclass
class Layout:
    name: str  # llava | pmc-oa | pmc-casereport | pmc-vqa | fields
    source: str  # written as each record's `source`
    task: str  # dialog (llava passes through) | caption | context | vqa
    keys: dict[str, Any]  # field -> actual key in the rows (choices: list of keys)


def detect_layout(row: dict, name: str, fields: FieldMap, task: str, text_kind: str | None, path: Path) -> Layout:
    """Pick the layout from the first row's keys (or `name`), resolve field names, and choose the task."""
    keys = {k.lower(): k for k in row}
    if name == "auto":
        if "conversations" in keys or "messages" in keys:
            name = "llava"
        elif "figure_path" in keys:
            name = "pmc-vqa"
        elif "img_ref" in keys:
            name = "pmc-casereport"
        elif "image" in keys and "caption" in keys:
            name = "pmc-oa"
        else:
            name = "fields"
    if name == "llava":
        return Layout("llava", "", "dialog", {"id": fields.id or keys.get("id", "id")})
    if name not in LAYOUTS:
        raise UserError(f"unknown --layout '{name}'; choose auto, llava, {', '.join(LAYOUTS)}")
    display, candidates = LAYOUTS[name]

    def find(f: str):
        given = getattr(fields, f)
        if f == "choices":
            names = given or [c for c in candidates.get(f, ()) if c.lower() in keys]
            if given and any(c.lower() not in keys for c in given):
                raise UserError(f"{path}: --choices-field names {given}, but the rows have {sorted(row)}")
            return [keys[c.lower()] for c in names] or None
        if given is not None:
            if given.lower() not in keys:
                raise UserError(f"{path}: --{f}-field '{given}' is not a field of the rows (fields: {sorted(row)})")
            return keys[given.lower()]
        return next((keys[c.lower()] for c in candidates.get(f, ()) if c.lower() in keys), None)

    k = {f: find(f) for f in FIELD_NAMES}
    has_text, has_qa = k["text"] is not None, k["question"] is not None and k["answer"] is not None
    if task == "auto":
        if has_text and has_qa:
            raise UserError(
                f"{path}: rows hold both a text ('{k['text']}') and question/answer fields; pass --task align "
                "(text -> stage-1 pairs) or --task instruct (question/answer -> stage-2 dialogs)"
            )
        task = "align" if has_text else "instruct" if has_qa else ""
    need = {"align": ("text",), "instruct": ("question", "answer")}.get(task)
    if need is None or any(k[f] is None for f in need) or k["image"] is None:
        raise UserError(
            f"{path}: cannot tell which fields to use (fields: {sorted(row)}); name them with --image-field and "
            "--text-field (captions) or --question-field/--answer-field (VQA), and --task align|instruct"
        )
    if task == "instruct":
        out_task = "vqa"
    else:
        out_task = text_kind or ("context" if k["text"].lower() == "context" else "caption")
    return Layout(name, display, out_task, k)


# ---------------------------------------------------------------- reading rows (streamed)


def iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line or position, row, parse error) without loading the file: JSONL, JSON list, CSV/TSV, Parquet."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found; check the path")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        yield from _iter_json_list(path) if head.startswith(b"[") else iter_jsonl(path)


def _iter_json_list(path: Path, chunk: int = 1 << 20):
    """Elements of a top-level JSON list, decoded one at a time from a sliding buffer (1-based positions)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            eof = not data
            buf, pos = buf[pos:] + data, 0
            return bool(data)

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        more()
        if skip_space() != "[":
            yield 1, None, "not a JSON list"
            return
        pos += 1
        n = 0
        while True:
            c = skip_space()
            if c == "]":
                return
            if n:
                if c != ",":
                    yield n + 1, None, "not valid JSON (expected ',' between records)"
                    return
                pos += 1
                skip_space()
            while True:
                try:
                    row, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof:
                        raise json.JSONDecodeError("incomplete", buf, end)  # the value may go on in the next chunk
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        # a JSON list cannot be resynchronised after a broken element: say that reading stopped
                        yield n + 1, None, (f"not valid JSON ({e.msg}); the records after it were not read: "
                                            "fix it or use JSONL")
                        return
            n += 1
            pos = end
            yield n, row, None if isinstance(row, dict) else "record is not a JSON object"


def _iter_csv(path: Path, delimiter: str):
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None


def _iter_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs `pip install pyarrow`, or convert it to JSONL") from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None


# ---------------------------------------------------------------- rows -> items


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
    image: str | None = None  # as written to OUT
    source_text: dict[str, str] = field(default_factory=dict)


_CHOICE_LABEL = re.compile(r"^\s*[A-Ha-h]\s*[:.)：、]\s*")


def _image_names(value: Any, split: bool = True) -> list[str]:
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
    names = _image_names(row.get(k["image"]))
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
    convs = row.get("conversations", row.get("messages"))
    if not isinstance(convs, list) or not convs or not all(isinstance(t, dict) for t in convs):
        raise Drop("fields", "'conversations' must be a non-empty list of {from, value} turns")
    roles, texts = [], {}
    for i, turn in enumerate(convs, 1):
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role not in ("user", "assistant") or not isinstance(value, str):
            raise Drop("fields", f"turn {i} needs a human/gpt role and a text value")
        roles.append("human" if role == "user" else "gpt")
        # tags are collapsed: one composite image, one <image> at the start of the first human turn
        texts[f"turn_{i}"] = value.replace(IMAGE_TOKEN, "").strip()
    names = _image_names(row.get("image", row.get("images")), split=False)
    rid = row.get(layout.keys["id"])
    rid = str(rid) if rid not in (None, "") else _derived_id(Path(file).stem, names, texts)
    src = source or (row.get("source") if isinstance(row.get("source"), str) else None) or Path(file).stem
    return Item(rid, line, file, src, "dialog", names, texts, roles)


def _too_short(item: Item, min_chars: int, min_question_chars: int) -> str | None:
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


def conversation(item: Item, seed: int) -> list[dict]:
    """Item -> LLaVA turns; the prompt is drawn from PROMPTS with an RNG seeded by (seed, task, id), so the draw
    does not depend on the order or the chunking of the input."""
    tag = IMAGE_TOKEN + "\n" if item.image else ""
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


def _source_text(item: Item) -> dict:
    st = item.source_text
    out: dict[str, Any] = {k: v for k, v in st.items() if not k.startswith(("choice_", "turn_"))}
    choices = [item.source_text.get(k, v) for k, v in item.texts.items() if k.startswith("choice_")]
    if any(k.startswith("choice_") for k in st):
        out["choices"] = choices
    if any(k.startswith("turn_") for k in st):
        out["conversations"] = [st.get(f"turn_{i}", item.texts[f"turn_{i}"]) for i in range(1, len(item.roles) + 1)]
    return out


# ---------------------------------------------------------------- translation (opt-in)

TRANSLATE_PROMPT_VERSION = "1"
_SYSTEM_ONE = (
    "You translate English medical text into simplified Chinese for a medical image dataset. Translate faithfully "
    "and fluently; keep numbers, units, abbreviations (CT, MRI, T2) and drug names as they are. "
)
_SYSTEM_BATCH = _SYSTEM_ONE + (
    "The user message is a JSON array of strings. Reply with a JSON array of the same length holding the "
    "translation of each string, in the same order, and nothing else."
)
_SYSTEM_ONE += "Reply with the translation only."


def needs_translation(text: str) -> bool:
    """English (or mostly English) text: more than twice as many Latin letters as CJK characters."""
    latin = sum(1 for c in text if c.isascii() and c.isalpha())
    cjk = sum(1 for c in text if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return latin > 2 * cjk


@dataclass
class TranslateConfig:
    url: str  # an OpenAI-compatible endpoint: base URL (…/v1) or the full …/chat/completions
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = 8  # texts per request (one JSON array in, one out)
    max_chars: int = 6000  # and at most this many characters per request
    retries: int = 6  # on HTTP 429/5xx and network errors, waiting backoff * 2**attempt seconds
    backoff: float = 1.0
    timeout: float = 120.0
    cache: Path | None = None  # default: OUT.translations.sqlite

    def __post_init__(self):
        if urllib.parse.urlparse(self.url).scheme not in ("http", "https") or not self.model:
            raise UserError("--translate-url must be an http(s) URL and --translate-model a model name")
        if self.batch_size < 1 or self.retries < 0 or self.backoff < 0:
            raise UserError("--translate-batch must be >= 1, --translate-retries and backoff >= 0")


class Translator:
    """English -> Chinese through any OpenAI-compatible chat-completions endpoint, with an sqlite cache keyed by a
    hash of (model, prompt version, text): every answer is committed as it arrives, so an interrupted run resumes
    without paying twice. Standard library only (urllib)."""

    def __init__(self, cfg: TranslateConfig, cache_path: Path, sleep=time.sleep):
        self.cfg, self.sleep = cfg, sleep
        base = cfg.url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env)
        if not self.key:
            log.warning("$%s is not set: calling %s without an API key", cfg.api_key_env, self.url)
        host = urllib.parse.urlparse(self.url).hostname
        # a local endpoint must not go through an HTTP proxy set in the environment
        proxies = {} if host in ("127.0.0.1", "localhost", "::1") else None
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        self.cache_path = cache_path
        self.db = sqlite3.connect(str(cache_path))
        self.db.execute("CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self.stats = Counter()

    def close(self) -> None:
        self.db.close()

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.cfg.model}\n{TRANSLATE_PROMPT_VERSION}\n{text}".encode("utf-8")).hexdigest()

    def translate(self, texts: list[str]) -> dict[str, str]:
        """Unique texts -> translations (cached or fetched in batches)."""
        todo, done = [], {}
        for t in dict.fromkeys(texts):
            hit = self.db.execute("SELECT text FROM translations WHERE key = ?", (self._key(t),)).fetchone()
            if hit is None:
                todo.append(t)
            else:
                done[t] = hit[0]
                self.stats["cached"] += 1
        batch: list[str] = []
        for t in todo + [None]:
            if batch and (t is None or len(batch) >= self.cfg.batch_size
                          or sum(map(len, batch)) + len(t) > self.cfg.max_chars):
                for src, out in zip(batch, self._fetch(batch)):
                    done[src] = out
                    self.db.execute("INSERT OR REPLACE INTO translations VALUES (?, ?)", (self._key(src), out))
                self.db.commit()
                batch = []
            if t is not None:
                batch.append(t)
        return done

    def _fetch(self, batch: list[str]) -> list[str]:
        self.stats["requested"] += len(batch)
        if len(batch) > 1:
            reply = self._post(_SYSTEM_BATCH, json.dumps(batch, ensure_ascii=False))
            parsed = _json_list(reply)
            if parsed is not None and len(parsed) == len(batch) and all(isinstance(x, str) for x in parsed):
                return [x.strip() for x in parsed]
            self.stats["batch_fallbacks"] += 1  # the model broke the array: ask one by one
        return [self._post(_SYSTEM_ONE, t).strip() for t in batch]

    def _post(self, system: str, user: str) -> str:
        body = json.dumps({
            "model": self.cfg.model, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.cfg.retries + 1):
            wait = self.cfg.backoff * 2**attempt
            try:
                self.stats["requests"] += 1
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self.opener.open(req, timeout=self.cfg.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                e.close()
                if e.code != 429 and e.code < 500:
                    raise UserError(
                        f"{self.url}: HTTP {e.code} from the translation endpoint; check --translate-url, "
                        f"--translate-model and the API key in ${self.cfg.api_key_env}"
                    ) from None
                last = f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = type(e).__name__ if not isinstance(e, urllib.error.URLError) else f"network error: {e.reason}"
            if attempt < self.cfg.retries:
                self.stats["retries"] += 1
                self.sleep(min(wait, 60.0))
        raise UserError(
            f"{self.url}: translation failed after {self.cfg.retries + 1} tries ({last}); translations so far are "
            f"cached in {self.cache_path}: run the same command again to resume"
        )


def _json_list(reply: str):
    s = reply.strip()
    if s.startswith("```"):
        s = s.strip("`").removeprefix("json").strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------- composites (worker processes)


def _make_composite(job: tuple[list[str], str]) -> str | None:
    """Load 2-4 images, composite them and write a PNG; returns the problem, or None. Runs in a worker process."""
    from .images import load_images

    paths, dest = job
    try:
        image = load_images(paths)
    except UserError as e:
        return str(e)
    tmp = f"{dest}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, dest)  # atomic: a killed run never leaves half a PNG under the final name
    return None


def composite_name(names: list[str]) -> str:
    """Deterministic file name of the composite of these images (same images, same name)."""
    return hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest()[:20] + ".png"


# ---------------------------------------------------------------- build


STEPS = ("read", "fields", "duplicate", "too_many_images", "missing_image", "too_short", "translate", "composite",
         "validate")


@dataclass
class BuildConfig:
    task: str = "auto"  # auto | align (caption/context -> stage 1) | instruct (question/answer -> stage 2)
    layout: str = "auto"  # auto | llava | pmc-oa | pmc-casereport | pmc-vqa | fields
    fields: FieldMap = field(default_factory=FieldMap)
    text_kind: str | None = None  # caption | context; default: context when the text field is `context`
    source_name: str | None = None  # the records' `source` (default: the layout's dataset name, or the file name)
    out_format: str | None = None  # jsonl | json; default from OUT's suffix
    min_chars: int = 10  # captions/contexts shorter than this (in the input's language) are dropped
    min_question_chars: int = 4
    max_images: int = 4  # more images than this: dropped (a composite holds at most 4)
    seed: int = 0
    workers: int = 2  # composite worker processes; 0 = in this process
    chunk_size: int = 256  # records per translate/composite round: bounds memory
    limit: int | None = None  # stop after this many input rows (a quick trial)
    translate: TranslateConfig | None = None

    def __post_init__(self):
        if self.task not in ("auto", "align", "instruct"):
            raise UserError(f"--task must be auto, align or instruct, not '{self.task}'")
        if self.text_kind not in (None, "caption", "context"):
            raise UserError(f"--text-kind must be caption or context, not '{self.text_kind}'")
        if self.out_format not in (None, "jsonl", "json"):
            raise UserError(f"--format must be jsonl or json, not '{self.out_format}'")
        if not 1 <= self.max_images <= 4:
            raise UserError(f"--max-images must be 1 to 4 (a composite holds at most 4), not {self.max_images}")
        if self.workers < 0 or self.chunk_size < 1 or self.min_chars < 0:
            raise UserError("--workers and --min-chars must be >= 0")


class _Writer:
    """OUT as JSONL or a JSON list, written to OUT.tmp and renamed at the end, so a failed run leaves no
    complete-looking file."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt, self.n = out, fmt, 0
        self.tmp = out.with_name(out.name + ".tmp")
        self.f = self.tmp.open("w", encoding="utf-8")
        if fmt == "json":
            self.f.write("[")

    def write(self, rec: dict) -> None:
        text = json.dumps(rec, ensure_ascii=False)
        if self.fmt == "json":
            self.f.write(("," if self.n else "") + "\n" + text)
        else:
            self.f.write(text + "\n")
        self.n += 1

    def close(self, ok: bool) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n")
        self.f.close()
        if ok:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)


def build(
    inputs: list[str | Path],
    out: str | Path,
    image_folders: list[str | Path] | None = None,
    cfg: BuildConfig | None = None,
) -> dict:
    """Build OUT from the inputs; returns the report (also written to OUT.report.json).

    `image_folders`: one folder for all inputs, or one per input; default: each input's own folder.
    """
    cfg = cfg or BuildConfig()
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("data build needs at least one input file")
    folders = [Path(f) for f in image_folders or []]
    if len(folders) not in (0, 1, len(inputs)):
        raise UserError(f"give --image-folder once, or once per input ({len(inputs)}), not {len(folders)} times")
    folders = folders * len(inputs) if len(folders) == 1 else folders or [p.parent for p in inputs]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"{f}: image folder not found; pass --image-folder with the folder holding the images")
    if any(out.resolve() == p.resolve() for p in inputs):
        raise UserError(f"{out}: --out names an input file; write the output somewhere else")
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = cfg.out_format or ("json" if out.suffix.lower() == ".json" else "jsonl")
    translator = None
    if cfg.translate:
        translator = Translator(cfg.translate, cfg.translate.cache or out.with_suffix(".translations.sqlite"))
    t0 = time.perf_counter()
    state = _BuildState(cfg, out, fmt, translator)
    try:
        for path, folder in zip(inputs, folders):
            state.run_input(path, folder)
        state.flush()
    except BaseException:
        state.finish(ok=False)
        raise
    state.finish(ok=True)
    report = state.report()
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("data build: %d records in %.1f s", report["written"], time.perf_counter() - t0)
    return report


class _BuildState:
    """One build run: the steps per row and per chunk, the open output and rejects files, the counts."""

    def __init__(self, cfg: BuildConfig, out: Path, fmt: str, translator: Translator | None):
        self.cfg, self.out, self.fmt, self.translator = cfg, out, fmt, translator
        self.image_dir = out.parent / f"{out.stem}_images"
        self.seen: set[str] = set()
        self.dropped: Counter = Counter()
        self.rows = self.missing_files = self.composites = 0
        self.inputs: list[dict] = []
        self.chunk: list[Item] = []
        self.pool: ProcessPoolExecutor | None = None
        self.writer = _Writer(out, fmt)
        self.rejects_path = out.with_suffix(".rejects.jsonl")
        self.rejects_tmp = self.rejects_path.with_name(self.rejects_path.name + ".tmp")
        self.rejects = self.rejects_tmp.open("w", encoding="utf-8")

    def finish(self, ok: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.translator:
            self.translator.close()
        self.writer.close(ok)
        self.rejects.close()
        if ok:
            os.replace(self.rejects_tmp, self.rejects_path)
        else:
            self.rejects_tmp.unlink(missing_ok=True)

    def reject(self, file: str, line: int | None, rid: str | None, step: str, reason: str) -> None:
        self.dropped[step] += 1
        row = dict(Reject(file, line, rid, reason).to_json(), step=step)
        self.rejects.write(json.dumps(row, ensure_ascii=False) + "\n")

    def run_input(self, path: Path, folder: Path) -> None:
        layout, n = None, 0
        # plain string paths: pathlib's resolve() per image costs more than the rest of a row's work
        folder_abs = os.path.abspath(folder)
        rel_prefix = os.path.relpath(folder_abs, os.path.abspath(self.out.parent))
        info = {"path": str(path), "image_folder": str(folder), "rows": 0}
        self.inputs.append(info)
        for line, row, error in iter_rows(path):
            if self.cfg.limit is not None and self.rows >= self.cfg.limit:
                break
            self.rows += 1
            n += 1
            info["rows"] = n
            rid = str(row["id"]) if isinstance(row, dict) and row.get("id") not in (None, "") else None
            if error:
                self.reject(str(path), line, rid, "read", error)
                continue
            if layout is None:
                c = self.cfg
                layout = detect_layout(row, c.layout, c.fields, c.task, c.text_kind, path)
                info.update(layout=layout.name, task=layout.task, fields=layout.keys)
            try:
                item = row_to_item(row, layout, line, str(path), self.cfg.source_name)
                self.check(item, folder_abs, rel_prefix)
            except Drop as d:
                self.reject(str(path), line, d.rid or rid, d.step, str(d))
                continue
            self.chunk.append(item)
            if len(self.chunk) >= self.cfg.chunk_size:
                self.flush()

    def check(self, item: Item, folder: str, rel_prefix: str) -> None:
        """The cheap per-row steps, in report order; raises Drop."""
        def drop(step: str, reason: str) -> Drop:
            return Drop(step, reason, item.id)

        if item.id in self.seen:
            raise drop("duplicate", f"duplicate id '{item.id}' (the first record with this id is kept)")
        self.seen.add(item.id)
        if len(item.names) > self.cfg.max_images:
            raise drop("too_many_images", f"{len(item.names)} images, more than --max-images {self.cfg.max_images}")
        missing = []
        for name in item.names:
            # records often carry a folder prefix that the downloaded images do not have: try the bare name too
            for candidate in dict.fromkeys((name, os.path.basename(name))):
                p = os.path.join(folder, candidate)
                if os.path.isfile(p):
                    item.paths.append(p)
                    item.rel.append(os.path.normpath(os.path.join(rel_prefix, candidate)).replace(os.sep, "/"))
                    break
            else:
                missing.append(name)
        if missing:
            self.missing_files += len(missing)
            raise drop("missing_image", f"image(s) not found in {folder}: {', '.join(missing)}")
        short = _too_short(item, self.cfg.min_chars, self.cfg.min_question_chars)
        if short:
            raise drop("too_short", short)

    def flush(self) -> None:
        chunk, self.chunk = self.chunk, []
        if not chunk:
            return
        if self.translator:
            chunk = self.translate(chunk)
        chunk = self.composite(chunk)
        for item in chunk:
            rec = self.record(item)
            if rec is not None:
                self.writer.write(rec)

    def translate(self, chunk: list[Item]) -> list[Item]:
        texts = [t for it in chunk for t in it.texts.values() if t and needs_translation(t)]
        done = self.translator.translate(texts)
        kept = []
        for it in chunk:
            bad = [k for k, t in it.texts.items() if t in done and not done[t]]
            if bad:
                reason = f"untranslatable: empty translation of {', '.join(bad)}"
                self.reject(it.file, it.line, it.id, "translate", reason)
                continue
            for k, t in list(it.texts.items()):
                if t in done:
                    it.source_text[k] = t
                    it.texts[k] = done[t]
            kept.append(it)
        return kept

    def composite(self, chunk: list[Item]) -> list[Item]:
        jobs: dict[str, list[str]] = {}
        for it in chunk:
            if len(it.paths) == 1:
                it.image = it.rel[0]
            elif it.paths:
                name = composite_name(it.rel)
                it.image = f"{self.image_dir.name}/{name}"
                jobs.setdefault(name, it.paths)
        if not jobs:
            return chunk
        self.image_dir.mkdir(parents=True, exist_ok=True)
        work = [(paths, str(self.image_dir / name)) for name, paths in jobs.items()]
        if self.cfg.workers > 0:
            if self.pool is None:
                import multiprocessing

                # spawn: workers never inherit this process's threads, sqlite handle or open files
                ctx = multiprocessing.get_context("spawn")
                self.pool = ProcessPoolExecutor(max_workers=self.cfg.workers, mp_context=ctx)
            problems = dict(zip(jobs, self.pool.map(_make_composite, work)))
        else:
            problems = dict(zip(jobs, map(_make_composite, work)))
        self.composites += sum(p is None for p in problems.values())
        kept = []
        for it in chunk:
            problem = problems.get(Path(it.image).name) if len(it.paths) > 1 else None
            if problem:
                self.reject(it.file, it.line, it.id, "composite", f"cannot composite the images: {problem}")
            else:
                kept.append(it)
        return kept

    def record(self, item: Item) -> dict | None:
        turns = conversation(item, self.cfg.seed)
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        try:
            validate_messages(messages, 1 if item.image else 0)
        except BadRecord as e:
            self.reject(item.file, item.line, item.id, "validate", str(e))
            return None
        rec: dict[str, Any] = {"id": item.id}
        if item.image:
            rec["image"] = item.image
        rec.update(conversations=turns, source=item.source, task=item.task)
        if item.source_text:
            rec["source_text"] = _source_text(item)
        return rec

    def report(self) -> dict:
        steps, remaining = [], self.rows
        for step in STEPS:
            if step == "translate" and self.translator is None:
                continue
            remaining -= self.dropped[step]
            steps.append({"step": step, "dropped": self.dropped[step], "kept": remaining})
        rep = {
            "output": self.out.name, "format": self.fmt, "images_relative_to": "the output's folder",
            "composite_folder": self.image_dir.name, "seed": self.cfg.seed, "inputs": self.inputs,
            "rows": self.rows, "steps": steps, "written": self.writer.n,
            "composites": self.composites, "missing_image_files": self.missing_files,
            "rejects": self.rejects_path.name,
        }
        if self.translator:
            rep["translation"] = {"model": self.translator.cfg.model, **dict(sorted(self.translator.stats.items()))}
        return rep


def format_build_report(rep: dict, out: str | Path | None = None) -> str:
    lines = []
    for inp in rep["inputs"]:
        lines.append(f"read {inp['rows']} rows from {inp['path']} "
                     f"(layout {inp.get('layout', '?')}, task {inp.get('task', '?')})")
    for s in rep["steps"]:
        if s["step"] != "read" or s["dropped"]:
            lines.append(f"  {s['step']:<16} dropped {s['dropped']:>8}   kept {s['kept']:>8}")
    lines.append(f"composites made: {rep['composites']}; missing image files: {rep['missing_image_files']}")
    if "translation" in rep:
        t = rep["translation"]
        lines.append(f"translation: {t.get('requested', 0)} texts requested in {t.get('requests', 0)} requests "
                     f"({t.get('retries', 0)} retries), {t.get('cached', 0)} from the cache")
    out = Path(out) if out else Path(rep["output"])
    lines.append(f"wrote {rep['written']} records to {out} (image paths relative to its folder); "
                 f"dropped records listed in {out.with_suffix('.rejects.jsonl')}")
    return "\n".join(lines)
