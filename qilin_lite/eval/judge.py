"""A judge model for open answers (`eval --judge URL --judge-model NAME`), off by default.

Token recall (matching.open_recall) misses synonyms and paraphrase ("右侧" vs "右肺"), so newer papers also ask a
language model whether an open answer means the reference. Any OpenAI-compatible chat endpoint works: a local
llama.cpp `llama-server`, `transformers serve`, vLLM. Nothing leaves the machine unless URL points elsewhere (a
URL off this machine is named in a warning before anything is sent).

- The prompt is pinned (`PROMPT`, its version in `PROMPT_VERSION`, both recorded in the protocol); decoding is
  greedy (temperature 0) with a short answer.
- Verdicts are cached in OUT/judge.jsonl, one line per (judge model, prompt version, question, reference, answer)
  hash, appended as they arrive: a rerun, or a resume after a failure, asks only what is not there.
- The report gives the judge's accuracy on open questions with its interval, and its agreement with token recall
  (recall >= 0.5 counted as right): the share of questions where both agree and Cohen's kappa.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from ..errors import UserError
from .items import EvalItem
from .matching import open_recall
from .stats import bootstrap_ci

JUDGE_CACHE = "judge.jsonl"
PROMPT_VERSION = 1
PROMPT = (
    "You grade answers to medical image questions. Given the question, the reference answer and a model's answer, "
    "decide whether the model's answer means the same as the reference (synonyms, paraphrase, another language and "
    "extra correct detail are fine; a different or contradicting finding is not). Reply with one word: CORRECT or "
    "INCORRECT.\n\nQuestion: {question}\nReference answer: {reference}\nModel answer: {answer}"
)
RECALL_RIGHT = 0.5


def endpoint(url: str) -> str:
    """The chat-completions address for a server's base URL (or the address itself)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def is_local(url: str) -> bool:
    from ..serve.web_guard import is_loopback

    return is_loopback((urlsplit(url).hostname or "").lower())


def http_judge(url: str, model: str, timeout: float = 120) -> Callable[[str], str]:
    """prompt -> the judge's reply text, over an OpenAI-compatible endpoint."""
    address = endpoint(url)
    key = os.environ.get("QILIN_JUDGE_API_KEY")  # for a hosted endpoint; never stored

    def ask(prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                           "max_tokens": 8}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(address, body, headers), timeout=timeout) as r:
                reply = json.loads(r.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            raise UserError(f"--judge {address}: HTTP {e.code} ({e.reason}); check the URL and --judge-model "
                            "(verdicts so far are kept)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"--judge {address}: cannot reach the judge ({reason}); start it, or drop --judge "
                            "(verdicts so far are kept)") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"--judge {address}: the reply is not an OpenAI-style chat completion") from None

    return ask


def verdict(reply: str) -> bool | None:
    words = reply.strip().upper().replace("*", "").split()
    if not words:
        return None
    first = words[0].strip(".:,!")
    return True if first == "CORRECT" else False if first == "INCORRECT" else None


def judge_open(items: Sequence[EvalItem], predictions: Sequence[str], ask: Callable[[str], str], model: str,
               cache_path: Path) -> dict:
    """Judge every open item (cached), then summarise against token recall."""
    cache = _read_cache(cache_path)
    verdicts, recalls = [], []
    with open(cache_path, "a", encoding="utf-8") as f:
        for it, answer in zip(items, predictions):
            if it.kind != "open":
                continue
            prompt = PROMPT.format(question=it.question, reference=it.reference, answer=answer)
            key = hashlib.sha256(json.dumps([model, PROMPT_VERSION, prompt], ensure_ascii=False).encode()).hexdigest()
            if key not in cache:
                reply = ask(prompt)
                cache[key] = {"key": key, "id": it.id, "reply": reply, "correct": verdict(reply)}
                f.write(json.dumps(cache[key], ensure_ascii=False) + "\n")
                f.flush()
            verdicts.append(cache[key]["correct"])
            recalls.append(open_recall(answer, it.reference))
    return summarise(verdicts, recalls) | {"model": model, "prompt_version": PROMPT_VERSION}


def summarise(verdicts: Sequence[bool | None], recalls: Sequence[float]) -> dict:
    """Judge accuracy (an unreadable verdict counts wrong), its interval, and agreement with recall >= 0.5."""
    n = len(verdicts)
    if n == 0:
        return {"n_open": 0}
    judged = [1.0 if v else 0.0 for v in verdicts]
    by_recall = [1.0 if r >= RECALL_RIGHT else 0.0 for r in recalls]
    agree = sum(a == b for a, b in zip(judged, by_recall)) / n
    p_j, p_r = sum(judged) / n, sum(by_recall) / n
    expected = p_j * p_r + (1 - p_j) * (1 - p_r)
    kappa = (agree - expected) / (1 - expected) if expected < 1 else 1.0
    return {"n_open": n, "accuracy": round(p_j, 6), "ci95": bootstrap_ci(judged), "unreadable": sum(v is None for v in verdicts),
            "agreement_with_recall": round(agree, 6), "kappa_with_recall": round(kappa, 6)}


def _read_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                cache[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash: that verdict is asked again
    return cache
