"""Messages -> one prompt string plus the character spans the loss may see.

In:  a list of `{"role": "user"|"assistant"|"system", "content": str}` whose user text may hold `<image>`.
Out: `Rendered(text, supervised)` where `supervised` lists `(start, end)` character spans of `text`: exactly the
     assistant replies and the end token that closes each of them. Tokens are assigned to spans later
     (processing.py), so one function owns "what is supervised" and it is testable on strings alone.

Templates follow LLaVA's conversation formats (see ../shared/REFERENCE.md):
- `plain` (stage 1): `<image>` + caption + "\n"; only the caption and the newline are supervised.
- `vicuna_v1` (stage 2): `SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`; each reply, the
  space that precedes it and its `</s>` are supervised. The space is supervised because at inference the prompt
  ends at `ASSISTANT:`, so the model itself must produce the separator.

Both are the authors' formats, so both follow their `preprocess_multimodal` (`place_image`): a record's single
`<image>` moves to the front of its turn, followed by a newline (`问题\n<image>` -> `<image>\n问题`), and `plain`
takes exactly one caption per record. Several images become one composite (ChiMed-VL's way).

Newer LLaVA-family models (see chatformats.py for their rules):
- `huatuo` (HuatuoGPT-Vision, its authors' cli.py): `<|user|>\n{q}\n` `<|assistant|>\n{a} \n` per round, each piece
  tokenized on its own (`Rendered.breaks`); one `<image>\n` per image in front of the question, each image its own
  576 tokens; the reply, its ` \n` and the tokenizer's end token are supervised.
- `chatml` (Qwen2 / Qwen2.5 chat models): `<|im_start|>role\n...<|im_end|>\n`; the reply and its `<|im_end|>` are
  supervised; images as in `huatuo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TOKEN = "<image>"


def typed_text(text: str, template: "Template | None" = None) -> str:
    """What a person typed, as text only: a literal `<image>` (people who know LLaVA prompts type it) is removed,
    since the program places the image itself; HuatuoGPT-Vision's cli.py removes it from user text the same way.
    Left in, it would become a second image placeholder with no image behind it. For the `huatuo` template exactly
    as its cli.py does (`<image>`, `<s>`, `</s>` deleted, nothing else touched), so its models get their own ids."""
    if template is not None and template.style == "huatuo":
        from .chatformats import moderate

        return moderate(text)
    return " ".join(part.strip() for part in text.split(IMAGE_TOKEN) if part.strip()) if IMAGE_TOKEN in text else text

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


MULTI_IMAGE = ("composite", "separate")


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    # text between a user turn and the assistant tag, and after each assistant reply
    user_end: str = " "
    reply_end: str = "</s>"
    style: str = "roles"  # roles (vicuna) | plain (LLaVA align) | huatuo | chatml: which renderer
    llava: bool = False  # the authors' LLaVA rules: image first, text tokenized between images (processing.py)
    # several images of one question: "composite" (ChiMed-VL: joined into one image, one <image>) or "separate"
    # (HuatuoGPT-Vision, LLaVA-1.5 multi-image: each image its own tokens)
    multi_image: str = "composite"
    max_images: int = 4  # a composite of more is unreadably small; HuatuoGPT-Vision's cli.py takes 6
    # the model's own decoding defaults (generate() keyword arguments), applied unless the user sets them
    generation: tuple = ()
    # token texts that also end an answer, besides the tokenizer's end token (ChatML's <|im_end|>)
    stop: tuple = ()

    @property
    def plain(self) -> bool:  # LLaVA "plain": no roles, no system, one caption per image
        return self.style == "plain"


@dataclass
class Rendered:
    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)
    # character offsets where the template's own code tokenizes a new piece (HuatuoGPT-Vision tokenizes each round's
    # user and assistant text separately); empty: the text is tokenized whole
    breaks: list[int] = field(default_factory=list)


TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain", reply_end="\n", style="plain", llava=True),
    "vicuna_v1": Template(name="vicuna_v1", system=VICUNA_SYSTEM, llava=True),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        from .errors import UserError

        raise UserError(f"unknown template '{name}'; choose one of: {', '.join(TEMPLATES)}") from None


def check_roles(messages: list[dict]) -> None:
    """Roles must alternate user, assistant, ... after an optional leading system message; raises ValueError."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("no user/assistant turns")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"turn {i + 1} is '{m['role']}' where '{want}' was expected (roles must alternate)")
    if body[-1]["role"] != "assistant":
        raise ValueError("the last turn is a user turn with no reply to learn from")


def place_image(messages: list[dict], template: Template) -> list[dict]:
    """The authors' `preprocess_multimodal` for their templates: a conversation's one `<image>` goes to the front of
    the turn that holds it, then a newline, and that turn's text is stripped. Records with several images (a
    qilin-lite extension) keep their placement: the authors' code has no rule for them."""
    if template.style in ("huatuo", "chatml"):
        from .chatformats import images_in_front

        return images_in_front(messages, template)
    if template.multi_image == "composite":
        messages = one_tag(messages)
    if not template.llava or sum(m["content"].count(IMAGE_TOKEN) for m in messages) != 1:
        return messages
    out = []
    for m in messages:
        if IMAGE_TOKEN in m["content"]:
            text = m["content"].replace(IMAGE_TOKEN, "").strip()
            m = {**m, "content": (IMAGE_TOKEN + "\n" + text).strip()}
        out.append(m)
    return out


def one_tag(messages: list[dict]) -> list[dict]:
    """Several images joined into one composite (ChiMed-VL's way): the first `<image>` stays, the others go."""
    if sum(m["content"].count(IMAGE_TOKEN) for m in messages) < 2:
        return messages
    out, seen = [], False
    for m in messages:
        parts = m["content"].split(IMAGE_TOKEN)
        text = parts[0]
        for part in parts[1:]:
            text += ("" if seen else IMAGE_TOKEN) + part
            seen = True
        out.append({**m, "content": text})
    return out


def check_plain(messages: list[dict]) -> None:
    """`plain` is image -> one caption: exactly one user turn holding the image and one reply (ValueError)."""
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


def render(messages: list[dict], template: Template, *, add_generation_prompt: bool = False,
           eos: str = "") -> Rendered:
    """Render a whole conversation (training) or a prompt ending where the assistant speaks (inference).

    For training, `messages` ends with an assistant turn; for inference it ends with a user turn and
    `add_generation_prompt=True` appends the assistant tag, giving exactly the prefix training saw. `eos`: the
    tokenizer's end token text, for templates that close a reply with it (huatuo).
    """
    if template.plain:
        return _render_plain(messages, add_generation_prompt)
    if template.style != "roles":
        from .chatformats import render_family

        return render_family(messages, template, add_generation_prompt, eos)
    system = template.system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = system + " " if system else ""
    spans: list[tuple[int, int]] = []
    for m in messages:
        if m["role"] == "user":
            text += f"{template.user}: {m['content']}{template.user_end}"
        else:
            text += f"{template.assistant}:"
            start = len(text)
            text += " " + m["content"] + template.reply_end
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += f"{template.assistant}:"
    return Rendered(text, spans)


def _render_plain(messages: list[dict], add_generation_prompt: bool) -> Rendered:
    # LLaVA's plain format ignores the user text except for the image: the prompt is the image alone.
    user = next((m for m in messages if m["role"] == "user"), None)
    images = user["content"].count(IMAGE_TOKEN) if user else 0
    text = IMAGE_TOKEN * images
    if add_generation_prompt:
        return Rendered(text, [])
    reply = next(m for m in messages if m["role"] == "assistant")["content"]
    start = len(text)
    text += reply + "\n"
    return Rendered(text, [(start, len(text))])


def chat_template_jinja(template: Template) -> str:
    """A Jinja chat template giving the same prompt string, saved with the processor so servers and
    `apply_chat_template` users (vLLM, transformers pipelines) prompt the model exactly as it was trained."""
    if template.style not in ("roles", "plain"):
        from .chatformats import family_jinja

        return family_jinja(template)
    if template.plain:
        return (
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            "{% if m['content'] is string %}{{ '<image>' * (m['content'].count('<image>')) }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        )
    sys = template.system.replace("'", "\\'")
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + sys + "' %}{% endif %}"
        "{% if system %}{{ system }} {% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '" + template.user + ": ' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}"
        "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '" + template.user_end + "' }}"
        "{% else %}{{ '" + template.assistant + ": ' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}"
        "{{ '" + template.reply_end + "' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + template.assistant + ":' }}{% endif %}"
    )


from . import chatformats  # noqa: E402,F401 - registers the newer families' templates (it imports this module)
