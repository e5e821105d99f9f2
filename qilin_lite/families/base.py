"""What a model family must answer, and the pieces every family shares.

A family is one kind of checkpoint (the paper's LLaVA, HuatuoGPT-Vision, a Qwen2 chat LLM behind a Llava tower, ...):
- `Family`: how a checkpoint or output directory is recognised (`template_for`), the transformers class it loads
  as, which modules are vision, projector and language model, and what LoRA targets;
- `Template`: the chat format(s) it speaks, named in recipes as `data.template`. A template turns messages into one
  prompt string plus the character spans the loss may see (`render`), places images (`place_images`), says what a
  typed tag becomes (`typed_text`), how many images a question may have (`image_count_problem`), how its text is
  tokenized (`prompt_ids`, `ids_and_labels`), and its exports: the chat template servers render
  (`chat_template_jinja`), the GGUF chat template for llama.cpp (`gguf_chat_template`) and the Ollama template
  (`ollama`).
Each family is one module beside this one; `families/__init__.py` lists them. Nothing outside this package asks a
template's or family's name to decide what to do: it asks the template.

In:  messages `{"role": "user"|"assistant"|"system", "content": str}` whose user text may hold `<image>`.
Out: `Rendered(text, supervised, breaks)`; ids and labels (-100 where not supervised), images not yet expanded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

IMAGE_TOKEN = "<image>"
IGNORE = -100  # the label of a token the loss does not see
# A composite of more is unreadably small, and ChiMed-VL drops records with more: the one limit for composites
COMPOSITE_MAX_IMAGES = 4
MARKER = "<__media__>"  # llama.cpp's (mtmd's) default image marker in prompt text
MULTI_IMAGE = ("composite", "separate")
# A `<` that starts no tag. Typed text, or the text around a record's tags once they are taken out, may still spell
# a tag (`<<image>image>` loses its `<image>` and is `<image>` again): `as_text` marks the `<` of each such spelling,
# so no later step places an image there or deletes it again, and `text_ids` tokenizes it as the plain `<` it is.
# A Unicode private-use character: nothing a tokenizer knows, one character as `<` is, so offsets hold.
TEXT_LT = "\ue000"


def as_text(text: str, tags=(IMAGE_TOKEN,)) -> str:
    """`text` with every spelling of `tags` in it kept as text (its `<` marked), never a tag."""
    for tag in tags:
        text = text.replace(tag, TEXT_LT + tag[1:])
    return text


@dataclass
class Rendered:
    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)
    # character offsets where the template's own code tokenizes a new piece (HuatuoGPT-Vision tokenizes each round's
    # user and assistant text separately); empty: the text is tokenized whole
    breaks: list[int] = field(default_factory=list)
    # character spans of the special tokens the template itself wrote (`special`); where a template lists them, the
    # text between is tokenized with special tokens split, so a typed one stays text (`positioned_ids`)
    specials: list[tuple[int, int]] = field(default_factory=list)

    def special(self, token: str) -> None:
        """Append one of the template's own special tokens."""
        self.specials.append((len(self.text), len(self.text) + len(token)))
        self.text += token


def positioned_ids(r: Rendered, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of a text whose special tokens are known by position (`Rendered.specials`): those
    become their ids, the text between is tokenized on its own, special tokens split (a `<` `as_text` marked is a
    `<`). The tokenizer splits at special tokens before anything else, so this equals tokenizing the whole text
    wherever no special token was typed."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for s, e in [*r.specials, (len(r.text), len(r.text))]:
        if s > pos:
            enc = tokenizer(r.text[pos:s].replace(TEXT_LT, "<"), add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            ids.extend(enc["input_ids"])
            offsets.extend((pos + a, pos + b) for a, b in enc["offset_mapping"])
        if e > s:
            ids.append(tokenizer.convert_tokens_to_ids(r.text[s:e]))
            offsets.append((s, e))
        pos = e
    return ids, offsets


@dataclass(frozen=True)
class Ollama:
    """What a Modelfile needs from a template: its Go TEMPLATE, SYSTEM, stop strings and PARAMETERs."""

    template: str
    system: str
    stops: tuple[str, ...]
    parameters: tuple[tuple[str, object], ...] = ()


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


def image_count(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE_TOKEN) for m in messages)


def one_tag(messages: list[dict]) -> list[dict]:
    """Several images joined into one composite (ChiMed-VL's way): the first `<image>` stays, the others go."""
    if image_count(messages) < 2:
        return messages
    out, seen = [], False
    for m in messages:
        parts = m["content"].split(IMAGE_TOKEN)
        if len(parts) == 1:
            text = parts[0]
        elif seen:  # the text around the tags taken out may spell a tag: kept as text
            text = as_text("".join(parts))
        else:
            text, seen = parts[0] + IMAGE_TOKEN + as_text("".join(parts[1:])), True
        out.append({**m, "content": text})
    return out


def images_in_front(messages: list[dict], clean) -> list[dict]:
    """Each user turn's images as `<image>\\n` in front of its text, the tags taken out of the text by `clean`
    (HuatuoGPT-Vision's cli.py placement; LLaVA-OneVision's for ChatML)."""
    out = []
    for m in messages:
        if m["role"] == "user":
            n = m["content"].count(IMAGE_TOKEN)
            # the tag with the newline that placement (ours, LLaVA data's `<image>\n` prefix) put after it
            text = as_text(clean(m["content"].replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN)))  # a spelt tag: text
            m = {**m, "content": f"{IMAGE_TOKEN}\n" * n + text}
        out.append(m)
    return out


def labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans) -> np.ndarray:
    """A token is supervised when it starts inside a span `render` marked."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = off[:, 0], off[:, 1]
    sup = np.zeros(len(ids_arr), dtype=bool)
    for s, e in spans:
        sup |= (starts >= s) & (starts < e) & (ends > starts)  # zero-width tokens (BOS) are never supervised
    return np.where(sup, ids_arr, IGNORE)


def text_ids(tokenizer, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """`tokenizer(text)`'s ids and character offsets, a `<` that `as_text` marked read as `<`: a tag it spells is
    tokenized as the text it is (the tokenizer's added `<image>` or `</s>` would take it whole: an image slot, an
    end token)."""
    plain = text.replace(TEXT_LT, "<")
    enc = tokenizer(plain, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if plain == text:
        return ids, offsets
    marked = {i for i, c in enumerate(text) if c == TEXT_LT}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    for t, (a, b) in zip(ids, offsets):
        if a in marked and b > a and t in added:  # an added token where the text spelt a tag: its characters
            sub = tokenizer(plain[a:b], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            out_ids.extend(sub["input_ids"])
            out_offsets.extend((a + x, a + y) for x, y in sub["offset_mapping"])
        else:
            out_ids.append(t)
            out_offsets.append((a, b))
    return out_ids, out_offsets


def plain_lt(encode):
    """A text encoder that splits at no tag itself (SentencePiece's, tokens.py) reading a marked `<` as `<`."""
    return lambda t: encode(t.replace(TEXT_LT, "<"))


def piece_ids(text: str, breaks, tokenizer, image_token_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of a text whose template tokenizes pieces on their own (`Rendered.breaks`), each
    piece split at `<image>` as LLaVA's `tokenizer_image_token` does, no special tokens added (HuatuoGPT-Vision's
    cli.py)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = list(breaks) + [len(text)]
    if bounds[0] != 0:
        bounds = [0] + bounds
    for lo, hi in zip(bounds, bounds[1:]):
        pos = lo
        for k, chunk in enumerate(text[lo:hi].split(IMAGE_TOKEN)):
            if k:
                ids.append(image_token_id)
                offsets.append((pos, pos + len(IMAGE_TOKEN)))
                pos += len(IMAGE_TOKEN)
            if chunk:
                chunk_ids, chunk_offsets = text_ids(tokenizer, chunk, add_special_tokens=False)
                ids.extend(chunk_ids)
                offsets.extend((pos + a, pos + b) for a, b in chunk_offsets)
            pos += len(chunk)
    return ids, offsets


# Jinja pieces the separate-image templates share: a message's content is a string (with `<image>` tags) or a list
# of {"type": "image"} / {"type": "text"} parts; either way the images go in front, one `<image>\n` each, as
# training placed them. REMOVE: the template's own cleaning of the text.
JINJA_USER_TEXT = (
    "{% if m['content'] is string %}{% set n = m['content'].count('<image>') %}"
    "{% set t = m['content'].replace('<image>\n', '').replace('<image>', '')REMOVE %}"
    "{% else %}{% set n = (m['content'] | selectattr('type', 'equalto', 'image') | list | length) %}"
    "{% set t = namespace(s='') %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
    "{% set t.s = t.s + p['text'] %}{% endif %}{% endfor %}{% set t = t.s REMOVE %}{% endif %}"
)
JINJA_ASSISTANT_TEXT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}"
                        "{% endif %}")
# The marker an image arrived as in a message's text `c`, as `mk`. llama-mtmd-cli writes mtmd's default `<__media__>`;
# llama-server, unless LLAMA_MEDIA_MARKER is set, names images with a random marker of its own (`<__media_` + 32
# random characters + `__>`, measured on llama.cpp 0c1e570) so that typed text never becomes an image. The template
# takes whichever marker the message holds (`<__media` up to the next `__>`) and renders that marker, which the server
# then finds; a message without one gets the default, which matches nothing in it.
GGUF_MARK = ("{% set p = c.split('" + MARKER[:8] + "') %}"
             "{% set mk = '" + MARKER[:8] + "' + (p[1].split('__>')[0] if p | length > 1 else '') + '__>' %}")
# The same for llama.cpp's Jinja (GGUF chat templates): images arrive as the marker inside the text; each marker goes
# to the front followed by a newline, as `images_in_front` put `<image>\n` in training.
GGUF_TEXT = ("{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
             + GGUF_MARK +
             "{% set n = c.split(mk) | length - 1 %}{% set t = c.replace(mk + '\\n', mk).replace(mk, '')REMOVE %}"
             "{% set imgs = namespace(s='') %}{% for _ in range(n) %}{% set imgs.s = imgs.s + mk + '\\n' %}{% endfor %}")


def fit_gguf(t: str, name: str) -> str:
    """llama-cpp-python 0.3 reads metadata strings through a 1024-byte buffer: a longer template reaches its jinja
    parser cut off, which fails loading the model."""
    if len(t.encode()) >= 1024:
        from ..errors import UserError

        raise UserError(f"the {name} chat template with this system prompt is {len(t.encode())} bytes; "
                        "llama-cpp-python reads at most 1023: shorten the template's system prompt")
    return t


# Ollama (Go templates; what Ollama hands them: see export/templates.py): a user message's images arrive as
# `[img-N]` tags in front of its text (N counts the conversation's images, so tags are 7-9 characters up to 999).
# Each tag gets the newline training put after `<image>`; Go templates have no string search, so a tag's end is
# found by position. Not done (Go templates cannot): stripping the text.
OLLAMA_USER_TEXT = """\
{{ $r := $m.Content }}
    {{- range $m.Images }}{{ $end := 0 }}
      {{- if and (ge (len $r) 7) (eq (slice $r 0 5) "[img-") }}
        {{- if eq (slice $r 6 7) "]" }}{{ $end = 7 }}
        {{- else if and (ge (len $r) 8) (eq (slice $r 7 8) "]") }}{{ $end = 8 }}
        {{- else if and (ge (len $r) 9) (eq (slice $r 8 9) "]") }}{{ $end = 9 }}
        {{- end }}
      {{- end }}
      {{- if $end }}{{ slice $r 0 $end }}{{ "\\n" }}{{ $r = slice $r $end }}{{ end }}
    {{- end }}{{ $r }}"""


@dataclass(frozen=True)
class Template:
    """A chat format. Subclasses (one per format, in their family's module) override what differs."""

    name: str
    system: str = ""
    # several images of one question: "composite" (ChiMed-VL: joined into one image, one <image>) or "separate"
    # (HuatuoGPT-Vision, LLaVA-1.5 multi-image: each image its own tokens)
    multi_image: str = "composite"
    max_images: int = COMPOSITE_MAX_IMAGES
    # the model's own decoding defaults (generate() keyword arguments), applied unless the user sets them
    generation: tuple = ()
    # token texts that also end an answer, besides the tokenizer's end token (ChatML's <|im_end|>)
    stop: tuple = ()

    # a dialog format (chat, GGUF and Ollama templates) or an image-captioning one (LLaVA's align stage)
    dialog: ClassVar[bool] = True
    # what one image is in the rendered text, before its tokens are expanded
    image_text: ClassVar[str] = IMAGE_TOKEN
    # whether `export gguf` (llama.cpp, Ollama) serves this format's models yet
    exports_gguf: ClassVar[bool] = True
    exports_ollama: ClassVar[bool] = True  # a Modelfile beside the GGUF pair
    # what the model's own fine-tuning code supervises: "replies" (each reply and the token ending it: LLaVA, Qwen)
    # or "text" (the whole text but the image tokens: MedGemma's notebook)
    supervises: ClassVar[str] = "replies"

    @property
    def separate_images(self) -> bool:
        return self.multi_image == "separate"

    # --- messages -> prompt text -----------------------------------------------------------------------------

    def typed_text(self, text: str) -> str:
        """What a person typed, as text only: a literal `<image>` (people who know LLaVA prompts type it) is
        removed, since the program places the image itself. Left in, it would become a second image placeholder
        with no image behind it."""
        if IMAGE_TOKEN not in text:
            return text
        return " ".join(part.strip() for part in text.split(IMAGE_TOKEN) if part.strip())

    def image_count_problem(self, n: int) -> str | None:
        """The one rule for how many images a question may have: None when `n` is allowed, else why not."""
        if n <= self.max_images:
            return None
        how = "each its own image tokens" if self.separate_images else "joined into one composite"
        return f"{n} images; the {self.name} template takes at most {self.max_images} images ({how})"

    def place_images(self, messages: list[dict]) -> list[dict]:
        """Where the image tags go before rendering; a composite keeps one tag."""
        return messages if self.separate_images else one_tag(messages)

    def check_record(self, messages: list[dict]) -> None:
        """Raise ValueError (one line: what and the fix) when this format cannot express the conversation."""

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        """A whole conversation (training) or a prompt ending where the assistant speaks (inference:
        `add_generation_prompt=True` appends the assistant tag, giving exactly the prefix training saw). `eos`: the
        tokenizer's end token text, for formats that close a reply with it."""
        raise NotImplementedError

    # --- prompt text -> ids ----------------------------------------------------------------------------------

    def batch_tokenizable(self, tokenizer) -> bool:
        """Whether the whole rendered text is tokenized at once by `tokenizer` (so `sample_lengths` may batch)."""
        return True

    def prompt_ids(self, r: Rendered, tokenizer, image_token_id: int) -> list[int]:
        """A rendered prompt -> ids with one image id per image (not yet expanded)."""
        if r.specials:
            return positioned_ids(r, tokenizer)[0]
        if r.breaks:
            return piece_ids(r.text, r.breaks, tokenizer, image_token_id)[0]
        return text_ids(tokenizer, r.text)[0]

    def ids_and_labels(self, r: Rendered, tokenizer, image_token_id: int, max_length: int):
        """(ids, labels) of a rendered conversation: a token is supervised when it starts inside a reply span."""
        if r.specials:
            ids, offsets = positioned_ids(r, tokenizer)
        elif r.breaks:
            ids, offsets = piece_ids(r.text, r.breaks, tokenizer, image_token_id)
        else:
            ids, offsets = text_ids(tokenizer, r.text)
        return np.asarray(ids, dtype=np.int64), labels_from_offsets(ids, offsets, r.supervised)

    # --- exports ---------------------------------------------------------------------------------------------

    def chat_template_jinja(self) -> str:
        """A Jinja chat template giving the same prompt string, saved with the processor so servers and
        `apply_chat_template` users (vLLM, transformers pipelines) prompt the model exactly as it was trained."""
        raise NotImplementedError

    def gguf_chat_template(self) -> str:
        """The chat template llama.cpp renders from the GGUF (images as its marker inside the text)."""
        from ..errors import UserError

        raise UserError(f"no GGUF chat template for the '{self.name}' template")

    def ollama(self) -> Ollama:
        from ..errors import UserError

        raise UserError(f"no Ollama template for the '{self.name}' template")


@dataclass(frozen=True)
class Family:
    """One kind of checkpoint: how it is recognised, what class it loads as, where its parts sit."""

    name: str
    templates: tuple[Template, ...]
    model_class: str = "LlavaForConditionalGeneration"  # transformers class the checkpoint loads as
    model_types: tuple[str, ...] = ("llava",)  # config.json model_type(s) of that class
    # "pad" / "crop": images squared and resized to the tower's one size (LLaVA); "native": each at its own size,
    # its token count following it (Qwen2.5-VL)
    image_mode: str = "pad"
    # the template stage 1 (align) trains in: LLaVA's captioning `plain`; a family without one aligns in its own
    align_template: str = "plain"
    # the batch key marking which tokens are image tokens, where the model computes positions or attention from
    # it (Qwen2.5-VL's M-RoPE: mm_token_type_ids; Gemma 3's bidirectional image attention: token_type_ids)
    image_marks: str | None = None
    # module paths in the loaded model (transformers 5's layout); skip lists match from the start of the path
    vision: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    llm: str = "model.language_model"
    # the LLM's linear layers LoRA adapts (a regex over module names)
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def template_for(self, source: str, config: dict) -> str | None:
        """The template a checkpoint qilin-lite did not write is prompted with, when it is of this family; None when
        it is not. `config`: its config.json (possibly empty)."""
        return None

    def tokens_per_image(self, config) -> int:
        """Tokens one image expands to in a loaded config; 0 where the count follows each image's size. LLaVA's:
        the tower's patches (CLS dropped unless the strategy is `full`)."""
        if self.image_mode == "native":
            return 0
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if config.vision_feature_select_strategy == "full" else 0)
