"""Text -> token ids exactly as the Qilin-Med-VL authors' tokenizer produced them.

In:  a LLaMA-family LLM (or run) directory or hub id whose tokenizer is a SentencePiece `tokenizer.model`.
Out: `SlowLlamaText`, a callable `text -> ids` equal to transformers 4.31's slow `LlamaTokenizer` (what the authors'
     LLaVA fork loaded with `use_fast=False`), and `image_split_ids`, their way of tokenizing around `<image>`.

Why not the tokenizer transformers 5 loads: it is a converted fast tokenizer whose ids differ from the slow one in
places the training data hits (text right after `</s>` when `legacy` is false, a leading space, `▁` in text), and it
defaults `legacy` to false where 4.31 defaulted to true. Measured on the real LLaMA-2 vocabulary: 4 of 8 short
strings differ. So for these tokenizers qilin-lite encodes with sentencepiece itself, following the 4.31 rules:
- the text is split at special tokens (`<s>`, `</s>`, `<unk>`, other added tokens), which map to their ids;
- `legacy: true` (4.31's default when the tokenizer config has no `legacy`): every piece of text between special
  tokens is encoded by SentencePiece as is, so it gets the dummy prefix `▁` (`</s>USER` -> `</s>`, `▁US`, `ER`);
- `legacy: false`: the text gets one leading `▁` and a piece after a special token loses the prefix unless it
  starts with a space (`</s>USER` -> `</s>`, `US`, `ER`).
Other tokenizers (tokenizer.json only: Qwen, the demo's BPE) keep transformers' own encoding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SP_FILE = "tokenizer.model"
UNDERLINE = "\u2581"  # SentencePiece's word-boundary mark


@dataclass
class SlowLlamaText:
    """`text -> ids` as transformers 4.31's slow LlamaTokenizer (`use_fast=False`), on the same `tokenizer.model`."""

    model_proto: bytes
    legacy: bool
    special: dict[str, tuple[int, bool, bool]]  # token text -> (id, lstrip, rstrip)
    bos_id: int | None
    eos_id: int | None
    add_bos: bool = True
    add_eos: bool = False
    _sp: object = field(default=None, repr=False, compare=False)
    _split: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        # longest first, as 4.31's trie matches the longest token starting at a position
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def __getstate__(self):  # DataLoader workers receive a copy; the C++ processor is rebuilt there
        return {k: v for k, v in self.__dict__.items() if k not in ("_sp", "_split")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def tokens(self, text: str) -> list[int]:
        """Ids without BOS / EOS (4.31's `tokenize` + `convert_tokens_to_ids`)."""
        if not self.legacy:
            text = UNDERLINE + text.replace(UNDERLINE, " ")
        parts = [p for p in self._split.split(text)] if self._split else [text]
        # strip around special tokens only where the token says so (4.31 wraps LLaMA's specials in AddedToken
        # with lstrip = rstrip = False, so normally nothing is stripped)
        for i, p in enumerate(parts):
            if p in self.special:
                _, lstrip, rstrip = self.special[p]
                if rstrip and i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
        ids: list[int] = []
        for p in parts:
            if not p:
                continue
            if p in self.special:
                ids.append(self.special[p][0])
            else:
                ids.extend(self._piece_ids(p))
        return ids

    def _piece_ids(self, text: str) -> list[int]:
        if self.legacy:
            return self._sp.encode(text)
        first = text.startswith(UNDERLINE)
        if first:
            text = text[1:]
        pieces = self._sp.encode(text, out_type=str)
        if not first and not text.startswith(" ") and pieces and pieces[0].startswith(UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [self._sp.piece_to_id(p) for p in pieces]  # a piece outside the vocabulary becomes <unk>, as in 4.31

    def __call__(self, text: str) -> list[int]:
        """`tokenizer(text).input_ids` of 4.31: BOS (and EOS when the config adds it) around the tokens."""
        ids = self.tokens(text)
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids


def image_split_ids(text: str, encode, image_id: int, bos_id: int | None, image_text: str = "<image>") -> list[int]:
    """The authors' `tokenizer_image_token`: the text between images is tokenized piece by piece (each piece gets
    SentencePiece's prefix space), BOS kept once at the start, one `image_id` where each image goes."""
    chunks = [encode(c) for c in text.split(image_text)]
    skip = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = chunks[0][:skip]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_id)
        ids.extend(chunk[skip:])
    return ids


def _config(source: str) -> dict:
    from transformers.utils import cached_file

    path = cached_file(source, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def find_sentencepiece(source: str) -> str | None:
    """The `tokenizer.model` of a directory or hub id (the same lookup for both), or None."""
    from transformers.utils import cached_file

    try:
        return cached_file(source, SP_FILE, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def slow_llama_text(source: str, tokenizer) -> SlowLlamaText | None:
    """The 4.31-equal encoder for a LLaMA SentencePiece tokenizer (None for any other kind).

    `legacy` is read as 4.31 read it: the config's value, true when the config has none."""
    cfg = _config(source)
    cls = str(cfg.get("tokenizer_class") or type(tokenizer).__name__)
    sp_path = find_sentencepiece(source)
    if not sp_path:
        return None
    # Directories saved before keep_sentencepiece named the class carry transformers 5's generic class name; the
    # tokenizer.model and `legacy` that keep_sentencepiece wrote beside it still say what it is.
    if "Llama" not in cls and not (cls == "TokenizersBackend" and "legacy" in cfg):
        return None
    legacy = cfg.get("legacy")
    special = {}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if tok.content == "<image>":
            continue  # the image placeholder never reaches the text encoder: text is split at it first
        special[tok.content] = (int(tid), bool(getattr(tok, "lstrip", False)), bool(getattr(tok, "rstrip", False)))
    return SlowLlamaText(
        model_proto=Path(sp_path).read_bytes(),
        legacy=True if legacy is None else bool(legacy),
        special=special,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        add_bos=bool(cfg.get("add_bos_token", True)),
        add_eos=bool(cfg.get("add_eos_token", False)),
    )


def keep_sentencepiece(text: SlowLlamaText | None, out_dir: Path) -> None:
    """Write `tokenizer.model` and the resolved `legacy` beside a saved tokenizer: transformers 5 saves neither,
    and without them a run would lose the authors' encoding (and `legacy` would flip to 5.x's default)."""
    if text is None:
        return
    out_dir = Path(out_dir)
    (out_dir / SP_FILE).write_bytes(text.model_proto)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    # the class too: transformers 5 saves a loaded LLaMA tokenizer as its generic "TokenizersBackend", and a run
    # saved that way (every align and tune run) lost the authors' encoding in chat, eval, merge and export
    cfg.update({"tokenizer_class": "LlamaTokenizer", "legacy": text.legacy, "add_bos_token": text.add_bos,
                "add_eos_token": text.add_eos})
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def attach(tokenizer, source: str):
    """Load-time hook: give a LLaMA SentencePiece tokenizer its 4.31-equal encoder as `tokenizer.slow_llama`."""
    tokenizer.slow_llama = slow_llama_text(source, tokenizer)
    return tokenizer


def slow_llama(tokenizer) -> SlowLlamaText | None:
    return getattr(tokenizer, "slow_llama", None)
