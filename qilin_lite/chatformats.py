"""The newer LLaVA-family prompt formats: HuatuoGPT-Vision's (`huatuo`) and Qwen2's ChatML (`chatml`).

In:  messages as conversation.py takes them (user text may hold `<image>` tags, one per image).
Out: `Rendered` text, supervised spans and tokenization breaks; the Jinja chat template that renders the same text.

`huatuo` follows its authors' cli.py (FreedomIntelligence/HuatuoGPT-Vision), the only code they published:
- user text loses `<image>`, `<s>` and `</s>` (their `input_moderation`), then gets one `<image>\\n` per image in
  front (`insert_image_placeholder`), and is stripped;
- each past round is two pieces tokenized on their own, `<|user|>\\n{q}\\n` (split at `<image>`, as LLaVA's
  `tokenizer_image_token`) and `<|assistant|>\\n{a} \\n`; the question being answered is one piece,
  `<|user|>\\n{q}\\n<|assistant|>\\n`. No BOS, no system prompt, no end token between rounds.
- Training (they published none): the reply, its ` \\n` and the tokenizer's end token are supervised, so the model
  learns to stop where their cli.py stops it (at `eos_token_id`). Past rounds in a prompt carry no end token, as in
  cli.py.
`chatml` is Qwen2/Qwen2.5-Instruct's own format: `<|im_start|>role\\ntext<|im_end|>\\n`, the default system prompt
Qwen2's, images as `<image>\\n` in front of the question, the reply and its `<|im_end|>` supervised, and answers end
at `<|im_end|>`.
A system message in a `huatuo` conversation is dropped (the format has none).
"""

from __future__ import annotations

from .conversation import IMAGE_TOKEN, TEMPLATES, Rendered, Template

QWEN_SYSTEM = "You are a helpful assistant."
# HuatuoGPT-Vision's cli.py gen_kwargs (do_sample with temperature 0.2 is the Generator's temperature)
HUATUO_GENERATION = (("repetition_penalty", 1.2), ("min_new_tokens", 1))
HUATUO_REMOVED = (IMAGE_TOKEN, "<s>", "</s>")  # cli.py's input_moderation blacklist

TEMPLATES["huatuo"] = Template(name="huatuo", style="huatuo", user="<|user|>", assistant="<|assistant|>",
                               multi_image="separate", max_images=6, generation=HUATUO_GENERATION)
TEMPLATES["chatml"] = Template(name="chatml", style="chatml", system=QWEN_SYSTEM, multi_image="separate",
                               max_images=6, stop=("<|im_end|>",))


def moderate(text: str) -> str:
    """cli.py's input_moderation: the placeholder and LLaMA's BOS/EOS texts deleted from what a user typed."""
    for b in HUATUO_REMOVED:
        text = text.replace(b, "")
    return text


def images_in_front(messages: list[dict], template: Template) -> list[dict]:
    """Each user turn's images as `<image>\\n` in front of its text, the tags taken out of the text (cli.py's
    input_moderation + insert_image_placeholder; for chatml, LLaVA-OneVision's placement)."""
    out = []
    for m in messages:
        if m["role"] == "user":
            n = m["content"].count(IMAGE_TOKEN)
            # the tag with the newline that placement (ours, LLaVA data's `<image>\n` prefix) put after it
            text = m["content"].replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN)
            if template.style == "huatuo":
                text = moderate(text)
            else:
                text = text.replace(IMAGE_TOKEN, "").strip()
            m = {**m, "content": f"{IMAGE_TOKEN}\n" * n + text}
        out.append(m)
    return out


def render_family(messages: list[dict], template: Template, add_generation_prompt: bool, eos: str) -> Rendered:
    if template.style == "huatuo":
        return _render_huatuo(messages, add_generation_prompt, eos)
    if template.style == "chatml":
        return _render_chatml(messages, template, add_generation_prompt)
    raise ValueError(f"no renderer for template style {template.style!r}")


def _render_huatuo(messages: list[dict], add_generation_prompt: bool, eos: str) -> Rendered:
    text, spans, breaks = "", [], []
    for m in messages:
        if m["role"] == "system":
            continue
        breaks.append(len(text))
        if m["role"] == "user":
            text += f"<|user|>\n{m['content'].strip()}\n"
        else:
            text += "<|assistant|>\n"
            start = len(text)
            text += f"{m['content']} \n{eos}"
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += "<|assistant|>\n"  # the same piece as the question, as cli.py tokenizes it
    return Rendered(text, spans, breaks)


def _render_chatml(messages: list[dict], template: Template, add_generation_prompt: bool) -> Rendered:
    system = template.system
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


# Jinja: a message's content is a string (with `<image>` tags) or a list of {"type": "image"} / {"type": "text"}
# parts; either way the images go in front, one `<image>\n` each, as training placed them.
_USER_TEXT = (
    "{% if m['content'] is string %}{% set n = m['content'].count('<image>') %}"
    "{% set t = m['content'].replace('<image>\n', '').replace('<image>', '')REMOVE %}"
    "{% else %}{% set n = (m['content'] | selectattr('type', 'equalto', 'image') | list | length) %}"
    "{% set t = namespace(s='') %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
    "{% set t.s = t.s + p['text'] %}{% endif %}{% endfor %}{% set t = t.s REMOVE %}{% endif %}"
)
_ASSISTANT_TEXT = "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}"


def family_jinja(template: Template) -> str:
    if template.style == "huatuo":
        # a typed `<image>` inside a text part goes too (cli.py's moderation); in string content every tag is an image
        user = _USER_TEXT.replace("REMOVE", ".replace('<image>', '').replace('<s>', '').replace('</s>', '')")
        return (
            "{% for m in messages %}{% if m['role'] == 'user' %}" + user
            + "<|user|>\n{{ ('<image>\n' * n + t) | trim }}\n"
            "{% elif m['role'] == 'assistant' %}<|assistant|>\n" + _ASSISTANT_TEXT + " \n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    if template.style == "chatml":
        user = _USER_TEXT.replace("REMOVE", " | trim")
        sys = template.system.replace("'", "\\'")
        return (
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}{% else %}{% set system = '" + sys + "' %}{% endif %}"
            "{% if system %}<|im_start|>system\n{{ system }}<|im_end|>\n{% endif %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}" + user
            + "<|im_start|>user\n{{ '<image>\n' * n + t }}<|im_end|>\n"
            "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n" + _ASSISTANT_TEXT + "<|im_end|>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    raise ValueError(f"no chat template for style {template.style!r}")
