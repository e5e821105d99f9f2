"""Qwen2 / Qwen2.5 chat LLMs behind a Llava tower, prompted in their own ChatML. Template `chatml`.

`<|im_start|>role\\ntext<|im_end|>\\n`, the default system prompt Qwen2's, images as `<image>\\n` in front of the
question (LLaVA-OneVision's placement), each its own tokens; the reply and its `<|im_end|>` supervised, and answers
end at `<|im_end|>`.
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
    fit_gguf,
    images_in_front,
)

QWEN_SYSTEM = "You are a helpful assistant."


def _untagged(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


@dataclass(frozen=True)
class ChatMLTemplate(Template):
    def place_images(self, messages: list[dict]) -> list[dict]:
        return images_in_front(messages, _untagged)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        system = self.system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        spans = []
        for m in messages:
            if m["role"] == "user":
                text += f"<|im_start|>user\n{m['content']}<|im_end|>\n"
            else:
                text += "<|im_start|>assistant\n"
                start = len(text)
                text += m["content"] + "<|im_end|>"
                spans.append((start, len(text)))
                text += "\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return Rendered(text, spans)

    def chat_template_jinja(self) -> str:
        user = JINJA_USER_TEXT.replace("REMOVE", " | trim")
        sys = self.system.replace("'", "\\'")
        return (
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}{% else %}{% set system = '" + sys + "' %}{% endif %}"
            "{% if system %}<|im_start|>system\n{{ system }}<|im_end|>\n{% endif %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}" + user
            + "<|im_start|>user\n{{ '<image>\n' * n + t }}<|im_end|>\n"
            "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n" + JINJA_ASSISTANT_TEXT + "<|im_end|>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )

    def gguf_chat_template(self) -> str:
        sys = self.system.replace("'", "\\'")
        t = (
            f"{{% set ns = namespace(i=0, s='{sys}') %}}"
            "{% if messages[0]['role'] == 'system' %}{% set ns.s = messages[0]['content'] %}{% set ns.i = 1 %}{% endif %}"
            "{% if ns.s %}{{ '<|im_start|>system\\n' + ns.s + '<|im_end|>\\n' }}{% endif %}"
            "{% for x in messages[ns.i:] %}" + GGUF_TEXT.replace("REMOVE", ".strip()")
            + "{% if x['role'] == 'user' %}{{ '<|im_start|>user\\n' + imgs.s + t + '<|im_end|>\\n' }}"
            "{% else %}{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
        return fit_gguf(t, self.name)

    def ollama(self) -> Ollama:
        return Ollama(OLLAMA_CHATML, self.system, ("<|im_end|>",))


OLLAMA_CHATML = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}<|im_start|>user
""" + OLLAMA_USER_TEXT + """<|im_end|>
<|im_start|>assistant
{{ else if eq $m.Role "assistant" }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}<|im_end|>
{{ end }}
  {{- end }}
{{- end }}"""


CHATML = ChatMLTemplate(name="chatml", system=QWEN_SYSTEM, multi_image="separate", max_images=6,
                        stop=("<|im_end|>",))


@dataclass(frozen=True)
class ChatMLFamily(Family):
    def template_for(self, source: str, config: dict) -> str | None:
        kind = str((config.get("text_config") or config).get("model_type", ""))  # a Llava's LLM, or an LLM's own
        return "chatml" if kind.startswith("qwen2") else None


QWEN2_CHAT = ChatMLFamily(name="qwen2-chat", templates=(CHATML,))
