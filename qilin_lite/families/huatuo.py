"""HuatuoGPT-Vision (FreedomIntelligence): a Qwen2 LLM behind a Llava tower, prompted as its authors' cli.py does,
the only code they published. Template `huatuo`.

- user text loses `<image>`, `<s>` and `</s>` (their `input_moderation`), then gets one `<image>\\n` per image in
  front (`insert_image_placeholder`), and is stripped;
- each past round is two pieces tokenized on their own, `<|user|>\\n{q}\\n` (split at `<image>`, as LLaVA's
  `tokenizer_image_token`) and `<|assistant|>\\n{a} \\n`; the question being answered is one piece,
  `<|user|>\\n{q}\\n<|assistant|>\\n`. No BOS, no system prompt, no end token between rounds.
- Training (they published none): each reply and its ` \\n` are supervised, and the tokenizer's end token after the
  conversation's last reply, so the model learns to stop where their cli.py stops it (at `eos_token_id`). Earlier
  replies carry no end token, as in cli.py's history: the ids before every reply in training are the prompt cli.py
  (and chat) builds for that turn, for the released weights and for runs trained here alike.
A system message in a `huatuo` conversation is dropped (the format has none). Several images: each its own 576
tokens, up to 6 (cli.py's limit).

Where this departs from cli.py: text that still spells a tag after moderation's single pass (`<<image>image>` is
`<image>` once the inner tag goes, `<</s>s>` is `<s>`) stays that text. cli.py keeps `<s>` too, and its ids are
given, but it splits a `<image>` so formed into one more image slot than there are images (two images and
`<<image>image>是什么？` give three slots, and the model fails on the mismatch); here that `<image>` is the text it
spells, its characters tokenized, never an image slot. What a person typed is moderated once (`typed_text`); the
tags it leaves are marked as text (`as_text`), so placement's cleaning, which records' text goes through, takes
nothing more out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    GGUF_TEXT,
    IMAGE_TOKEN,
    JINJA_ASSISTANT_TEXT,
    JINJA_USER_TEXT,
    OLLAMA_USER_TEXT,
    Family,
    Ollama,
    Rendered,
    Template,
    as_text,
    fit_gguf,
    images_in_front,
)

# HuatuoGPT-Vision's cli.py gen_kwargs (do_sample with temperature 0.2 is the Generator's temperature)
HUATUO_GENERATION = (("repetition_penalty", 1.2), ("min_new_tokens", 1))
HUATUO_REMOVED = (IMAGE_TOKEN, "<s>", "</s>")  # cli.py's input_moderation blacklist


def moderate(text: str) -> str:
    """cli.py's input_moderation: the placeholder and LLaMA's BOS/EOS texts deleted from what a user typed, in one
    pass, as cli.py does; a tag that pass leaves spelt (`<</s>s>` -> `<s>`) is kept as text (`as_text`)."""
    for b in HUATUO_REMOVED:
        text = text.replace(b, "")
    return as_text(text, HUATUO_REMOVED)


@dataclass(frozen=True)
class HuatuoTemplate(Template):
    def typed_text(self, text: str) -> str:
        """As cli.py does (`<image>`, `<s>`, `</s>` deleted once, nothing else touched), so its models get their own
        ids; what the pass leaves spelt stays text (the module's note)."""
        return moderate(text)

    def place_images(self, messages: list[dict]) -> list[dict]:
        return images_in_front(messages, moderate)

    def batch_tokenizable(self, tokenizer) -> bool:
        return False  # tokenized piece by piece, as cli.py does

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        text, spans, breaks = "", [], []
        last = len(messages) - 1
        for k, m in enumerate(messages):
            if m["role"] == "system":
                continue
            breaks.append(len(text))
            if m["role"] == "user":
                text += f"<|user|>\n{m['content'].strip()}\n"
            else:
                text += "<|assistant|>\n"
                start = len(text)
                # the end token after the conversation's last reply only: cli.py's history has none after earlier
                # replies, so every prefix training sees is the prompt cli.py (and chat) builds for that turn
                text += f"{m['content']} \n{eos if k == last else ''}"
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += "<|assistant|>\n"  # the same piece as the question, as cli.py tokenizes it
        return Rendered(text, spans, breaks)

    def chat_template_jinja(self) -> str:
        # a typed `<image>` inside a text part goes too (cli.py's moderation); in string content every tag is an image
        user = JINJA_USER_TEXT.replace("REMOVE", ".replace('<image>', '').replace('<s>', '').replace('</s>', '')")
        return (
            "{% for m in messages %}{% if m['role'] == 'user' %}" + user
            + "<|user|>\n{{ ('<image>\n' * n + t) | trim }}\n"
            "{% elif m['role'] == 'assistant' %}<|assistant|>\n" + JINJA_ASSISTANT_TEXT + " \n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )

    def gguf_chat_template(self) -> str:
        t = (
            "{% for x in messages if x['role'] != 'system' %}"
            + GGUF_TEXT.replace("REMOVE", ".replace('<image>', '').replace('<s>', '').replace('</s>', '')")
            + "{% if x['role'] == 'user' %}{{ '<|user|>\\n' + (imgs.s + t).strip() + '\\n' }}"
            "{% else %}{{ '<|assistant|>\\n' + c + ' \\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
        )
        return fit_gguf(t, self.name)

    def ollama(self) -> Ollama:
        gen = dict(self.generation)
        return Ollama(OLLAMA_HUATUO, "", ("<|endoftext|>", "<|user|>"),
                      (("repeat_penalty", gen.get("repetition_penalty")),))


OLLAMA_HUATUO = """\
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}<|user|>
""" + OLLAMA_USER_TEXT + """
<|assistant|>
{{ else if eq $m.Role "assistant" }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}{{ " " }}
{{ end }}
  {{- end }}
{{- end }}"""


HUATUO = HuatuoTemplate(name="huatuo", multi_image="separate", max_images=6, generation=HUATUO_GENERATION)


@dataclass(frozen=True)
class HuatuoFamily(Family):
    def template_for(self, source: str, config: dict) -> str | None:
        # by its name, as its own cli.py tells its models apart
        return "huatuo" if "huatuogpt-vision" in source.lower() else None


HUATUO_VISION = HuatuoFamily(name="huatuogpt-vision", templates=(HUATUO,))
