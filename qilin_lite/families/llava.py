"""The paper's family: LLaVA (CLIP + projector + LLaMA), as Qilin-Med-VL trained it. Templates `plain` (stage 1) and
`vicuna_v1` (stage 2), and the authors' tokenization.

Templates follow LLaVA's conversation formats (see ../shared/REFERENCE.md):
- `plain` (stage 1): `<image>` + caption + "\\n"; only the caption and the newline are supervised.
- `vicuna_v1` (stage 2): `SYSTEM USER: <image>\\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`; each reply, the
  space that precedes it and its `</s>` are supervised. The space is supervised because at inference the prompt
  ends at `ASSISTANT:`, so the model itself must produce the separator.
Both follow the authors' `preprocess_multimodal` (`place_images`): a record's single `<image>` moves to the front
of its turn, followed by a newline (`问题\\n<image>` -> `<image>\\n问题`), and `plain` takes exactly one caption per
record. Several images become one composite (ChiMed-VL's way).

The authors' encoding (their templates on a LLaMA SentencePiece tokenizer): text tokenized piece by piece between
images with transformers 4.31's slow-tokenizer rules (tokens.py), labels from their round-by-round token counts
(`preprocess_plain` / `preprocess_v1`). Equal, id for id, to their code (tests/test_paper_fidelity.py). Any other
tokenizer: the whole prompt tokenized at once, a token supervised when it starts inside a reply span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..tokens import image_split_ids, slow_llama
from .base import GGUF_MARK, IGNORE, IMAGE_TOKEN, Family, Ollama, Rendered, Template, as_text, fit_gguf, plain_lt

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class LlavaTemplate(Template):
    """What the authors' two templates share: their image placement and their tokenization."""

    user: ClassVar[str] = "USER"
    assistant: ClassVar[str] = "ASSISTANT"
    user_end: ClassVar[str] = " "  # text between a user turn and the assistant tag
    reply_end: ClassVar[str] = "</s>"  # text after each assistant reply

    def place_images(self, messages: list[dict]) -> list[dict]:
        """The authors' `preprocess_multimodal`: a conversation's one `<image>` goes to the front of the turn that
        holds it, then a newline, and that turn's text is stripped. Records with several images (a qilin-lite
        extension) keep their placement: the authors' code has no rule for them."""
        messages = super().place_images(messages)
        if sum(m["content"].count(IMAGE_TOKEN) for m in messages) != 1:
            return messages
        out = []
        for m in messages:
            if IMAGE_TOKEN in m["content"]:
                text = as_text(m["content"].replace(IMAGE_TOKEN, "")).strip()  # `<<image>image>`: text
                m = {**m, "content": (IMAGE_TOKEN + "\n" + text).strip()}
            out.append(m)
        return out

    def batch_tokenizable(self, tokenizer) -> bool:
        return slow_llama(tokenizer) is None  # the authors' encoding goes piece by piece

    def prompt_ids(self, r: Rendered, tokenizer, image_token_id: int) -> list[int]:
        sp = slow_llama(tokenizer)
        if sp is None:
            return super().prompt_ids(r, tokenizer, image_token_id)
        return image_split_ids(r.text, plain_lt(sp), image_token_id, sp.bos_id)

    def ids_and_labels(self, r: Rendered, tokenizer, image_token_id: int, max_length: int):
        sp = slow_llama(tokenizer)
        if sp is None:
            return super().ids_and_labels(r, tokenizer, image_token_id, max_length)
        return self._authors_labels(r.text, sp, image_token_id, max_length)

    def _authors_labels(self, text: str, sp, image_token_id: int, max_length: int):
        """(ids, labels) as the authors' `preprocess_plain` / `preprocess_v1` compute them: ids tokenized between
        images, labels masked by the token counts of each round tokenized on its own. Raises ValueError where their
        count does not match the whole (their code then masks the whole record and trains nothing on it)."""
        enc = lambda t: image_split_ids(t, plain_lt(sp), image_token_id, sp.bos_id)  # noqa: E731
        ids = np.asarray(enc(text), dtype=np.int64)
        labels = ids.copy()
        sep = self.user_end + self.assistant + ": "
        cur = 1  # BOS
        labels[:cur] = IGNORE
        for rnd in text.split(self.reply_end):
            parts = rnd.split(sep)
            if rnd == "" or len(parts) != 2:
                break
            # the instruction's own trailing space token and BOS are not in the whole: hence -2
            instruction = len(enc(parts[0] + sep)) - 2
            labels[cur : cur + instruction] = IGNORE
            cur += len(enc(rnd))  # BOS of the round stands for the `</s>` that ends it in the whole
        labels[cur:] = IGNORE
        unk = sp.unk_id  # the authors pad with <unk> and count the non-pad ids
        total = int((ids != unk).sum())
        if cur < max_length and cur != total:
            raise ValueError(
                f"its turns tokenize to {cur} ids one by one but {total} as a whole (the authors' code masks such a "
                "record and trains nothing on it); usually text that runs into '</s>', a reply containing "
                f"'{sep.strip()}', or characters outside the tokenizer; fix the text or drop the record"
            )
        return ids, labels


@dataclass(frozen=True)
class PlainTemplate(LlavaTemplate):
    """LLaVA's `plain` (align): no roles, no system, one caption per image; the prompt is the image alone."""

    dialog: ClassVar[bool] = False
    reply_end: ClassVar[str] = "\n"

    def check_record(self, messages: list[dict]) -> None:
        """`plain` is image -> one caption: exactly one user turn holding the image and one reply."""
        body = [m for m in messages if m["role"] != "system"]
        replies = sum(m["role"] == "assistant" for m in body)
        if replies != 1 or len(body) != 2:
            raise ValueError(
                f"the plain (align) template takes one caption per record, this one has {replies} replies; "
                "split it into one record per caption, or train it with --template vicuna_v1"
            )
        if IMAGE_TOKEN not in body[0]["content"]:
            raise ValueError("the plain (align) template captions an image, and this record has none; "
                             "add its image or leave it out of the align data")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        # LLaVA's plain format ignores the user text except for the image: the prompt is the image alone.
        user = next((m for m in messages if m["role"] == "user"), None)
        text = IMAGE_TOKEN * (user["content"].count(IMAGE_TOKEN) if user else 0)
        if add_generation_prompt:
            return Rendered(text, [])
        reply = next(m for m in messages if m["role"] == "assistant")["content"]
        start = len(text)
        text += reply + "\n"
        return Rendered(text, [(start, len(text))])

    def _authors_labels(self, text: str, sp, image_token_id: int, max_length: int):
        ids = np.asarray(image_split_ids(text, plain_lt(sp), image_token_id, sp.bos_id), dtype=np.int64)
        labels = ids.copy()  # the prompt is the image alone; the caption and its newline are the target
        labels[: len(image_split_ids(IMAGE_TOKEN, plain_lt(sp), image_token_id, sp.bos_id))] = IGNORE
        return ids, labels

    def chat_template_jinja(self) -> str:
        return (
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            "{% if m['content'] is string %}{{ '<image>' * (m['content'].count('<image>')) }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        )


@dataclass(frozen=True)
class VicunaTemplate(LlavaTemplate):
    """LLaVA's `vicuna_v1` (the authors' "v1" conversation): what Qilin-Med-VL-Chat was tuned with."""

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        system = self.system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = system + " " if system else ""
        spans: list[tuple[int, int]] = []
        for m in messages:
            if m["role"] == "user":
                text += f"{self.user}: {m['content']}{self.user_end}"
            else:
                text += f"{self.assistant}:"
                start = len(text)
                text += " " + m["content"] + self.reply_end
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += f"{self.assistant}:"
        return Rendered(text, spans)

    def chat_template_jinja(self) -> str:
        sys = self.system.replace("'", "\\'")
        return (
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}{% else %}{% set system = '" + sys + "' %}{% endif %}"
            "{% if system %}{{ system }} {% endif %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            "{{ '" + self.user + ": ' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}"
            "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '" + self.user_end + "' }}"
            "{% else %}{{ '" + self.assistant + ": ' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}"
            "{{ '" + self.reply_end + "' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + self.assistant + ":' }}{% endif %}"
        )

    def gguf_chat_template(self) -> str:
        """vicuna_v1 as training rendered it, for llama.cpp: images arrive as mtmd's marker in the text
        (llama-server turns image parts into marker text, llama-mtmd-cli appends the marker to the prompt); a turn
        with one image gets it at its front, a newline, and the text stripped: the authors' placement. An earlier
        answer that a client sends back with the space the model generated first (llama-server's replies start
        with it) gets no second space after `ASSISTANT:`. Literal spaces are expressions, as transformers and
        llama-cpp-python render with trim_blocks / lstrip_blocks."""
        sys_default = self.system.replace("'", "\\'")
        t = (
            f"{{% set ns = namespace(i=0, s='{sys_default}') %}}"
            "{% if messages[0]['role'] == 'system' %}{% set ns.s = messages[0]['content'] %}{% set ns.i = 1 %}{% endif %}"
            "{% if ns.s %}{{ ns.s + ' ' }}{% endif %}"
            "{% for x in messages[ns.i:] %}"
            "{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
            + GGUF_MARK +
            "{% if x['role'] == 'user' %}{{ 'USER: ' }}"
            "{% if c.split(mk) | length == 2 %}{{ (mk + '\\n' + c.replace(mk, '').strip()).strip() }}"
            "{% else %}{{ c }}{% endif %}{{ ' ' }}"
            "{% else %}{{ 'ASSISTANT:' + ('' if c.startswith(' ') else ' ') + c + '</s>' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        )
        return fit_gguf(t, "chat")

    def ollama(self) -> Ollama:
        return Ollama(OLLAMA_VICUNA, self.system, ("</s>",))


# vicuna_v1 as training rendered it (render after place_images), in Ollama's Go template language.
# What Ollama hands a template that names `.Messages` (read in ollama/ollama at fb30760: server/prompt.go,
# template/template.go): `.System`, every system message joined; `.Messages`, each with Role, Content and Images;
# a user message's images are put in front of its text as `[img-N]` tags (N counts the conversation's images)
# unless the text holds `[img]`, and llama-server later swaps each tag for the image. So a message with exactly
# one image that starts with its tag gets the newline training put after the image; Go templates have no string
# search, hence the tag's end found by position (N up to 999). Not done here, as Go templates cannot: stripping
# the text (Ollama's CLI trims it; API clients send it as they like) and moving an `[img]` the user placed inside
# the text to the front. An assistant message: one space after `ASSISTANT:` (none added when the stored reply
# already starts with the space the model generated) and `</s>`, except on a last assistant message, which Ollama
# continues. Only `{{ " " }}`-style literals carry spaces: `{{-` would trim bare ones.
OLLAMA_VICUNA = """\
{{- if .System }}{{ .System }}{{ " " }}{{ end }}
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}{{ "USER: " }}
    {{- $c := $m.Content }}{{ $end := 0 }}
    {{- if and (eq (len $m.Images) 1) (ge (len $c) 7) (eq (slice $c 0 5) "[img-") }}
      {{- if eq (slice $c 6 7) "]" }}{{ $end = 7 }}
      {{- else if and (ge (len $c) 8) (eq (slice $c 7 8) "]") }}{{ $end = 8 }}
      {{- else if and (ge (len $c) 9) (eq (slice $c 8 9) "]") }}{{ $end = 9 }}
      {{- end }}
    {{- end }}
    {{- if and $end (lt $end (len $c)) }}{{ slice $c 0 $end }}{{ "\\n" }}{{ slice $c $end }}
    {{- else }}{{ $c }}
    {{- end }}{{ " ASSISTANT:" }}
  {{- else if eq $m.Role "assistant" }}
    {{- if not (and $m.Content (eq (slice $m.Content 0 1) " ")) }}{{ " " }}{{ end }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}</s>{{ end }}
  {{- end }}
{{- end }}"""


PLAIN = PlainTemplate(name="plain")
VICUNA_V1 = VicunaTemplate(name="vicuna_v1", system=VICUNA_SYSTEM)


@dataclass(frozen=True)
class LlavaFamily(Family):
    def template_for(self, source: str, config: dict) -> str | None:
        return "vicuna_v1"  # the fallback for any Llava checkpoint no other family claims


LLAVA = LlavaFamily(name="llava-1.5", templates=(PLAIN, VICUNA_V1))
