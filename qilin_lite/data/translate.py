"""Opt-in translation for `data build --translate`: an OpenAI-compatible endpoint, with a sqlite cache so a rerun
sends nothing already translated. Nothing leaves the machine unless the user names an endpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

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
