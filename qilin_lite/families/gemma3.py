"""Gemma 3 (MedGemma-4B, gemma-3-4b-it): the native transformers class `Gemma3ForConditionalGeneration`, each image
squashed to the tower's size (896 px) and `mm_tokens_per_image` (256) soft tokens. Template `gemma3`.

As the model's processor prompts it (its chat template, then `Gemma3Processor`) and as Google-Health's MedGemma
fine-tuning notebook (`notebooks/fine_tune_with_hugging_face.ipynb`) trains it:
- `<bos>`, then per message `<start_of_turn>user|model\\n` ... `<end_of_turn>\\n`; a system message has no turn of
  its own: its text and a blank line open the first user turn; text parts are trimmed, an image part is
  `<start_of_image>`, which the processor replaces by `\\n\\n<start_of_image>` + the soft tokens + `<end_of_image>\\n\\n`
  (in the text, before tokenizing: the newlines join the text around them);
- supervised: what the notebook's collator leaves in its labels, which is everything but padding, `<start_of_image>`
  and the soft tokens: the prompt as well as the replies (it trains on the whole text), `<end_of_image>` included.
  Two departures, both where the notebook's text differs from its processor's prompt: it renders with
  `tokenize=False` and `.strip()`s, so its sequences lack the final `\\n`, and tokenizing that text adds a second
  `<bos>` where the tokenizer adds one; here the ids are the processor's `apply_chat_template(tokenize=True)` (one
  `<bos>`, the final `\\n`), the notebook's masking rule applied to them.
- image-token marks (`token_type_ids`, 1 on the soft tokens) go with every batch: Gemma 3 attends bidirectionally
  within an image from them.
Typed text stays text (special tokens known by position, `Rendered.specials`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .base import GGUF_MARK, IMAGE_TOKEN, Family, Rendered, Template, fit_gguf, positioned_ids

BOI, SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"


def _parts(text: str) -> str:
    """A turn's string content as the template's list of parts: images where the tags stand, each text piece
    trimmed (its `| trim`), empty pieces dropped."""
    pieces = re.split(f"({re.escape(IMAGE_TOKEN)})", text)
    return "".join(p if p == IMAGE_TOKEN else p.strip() for p in pieces)


def _all_but(r: Rendered, tokens: tuple[str, ...]) -> list[tuple[int, int]]:
    """Spans covering the whole text but the template's own `tokens` (the notebook's labels)."""
    edges = [0] + [x for s, e in r.specials if r.text[s:e] in tokens for x in (s, e)] + [len(r.text)]
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a]


@dataclass(frozen=True)
class Gemma3Template(Template):
    image_text: ClassVar[str] = BOI
    supervises: ClassVar[str] = "text"
    # Ollama runs Gemma 3 on its own engine from safetensors, not from a GGUF pair with a Modelfile template
    exports_ollama: ClassVar[bool] = False

    def gguf_chat_template(self) -> str:
        """llama.cpp's Jinja over messages whose images are markers in the text (mtmd puts `<start_of_image>` and
        `<end_of_image>` around each itself): the processor's blank line on each side of every image, the text pieces
        trimmed, a system message's text and a blank line opening the first turn, no `<bos>` (llama.cpp adds it)."""
        return fit_gguf(
            "{% set ns = namespace(p='', first=0) %}{% if messages[0]['role'] == 'system' %}"
            "{% set c = messages[0]['content'] %}"
            "{% set ns.p = (c if c is string else c | map(attribute='text') | join('')) + '\\n\\n' %}"
            "{% set ns.first = 1 %}{% endif %}{% for x in messages[ns.first:] %}"
            "{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
            + GGUF_MARK +
            "{{ '<start_of_turn>' + ('model' if x['role'] == 'assistant' else 'user') + '\\n' "
            "+ (ns.p if loop.first else '') }}{% for p in c.split(mk) %}"
            "{% if not loop.first %}{{ '\\n\\n' + mk + '\\n\\n' }}{% endif %}{{ p.strip() }}{% endfor %}"
            "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
            self.name)

    def ollama(self):
        from ..errors import UserError

        raise UserError(f"export gguf does not write an Ollama Modelfile for {self.name} models: Ollama runs Gemma 3 "
                        "on its own engine; `ollama create` from a `qilin-lite merge` directory")

    def place_images(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": _parts(m["content"])} if m["role"] != "system" else m for m in messages]

    def check_record(self, messages: list[dict]) -> None:
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if any(IMAGE_TOKEN in m["content"] for m in body if m["role"] == "assistant"):
            raise ValueError("an image in a reply; the gemma3 template takes images in user turns only")

    def batch_tokenizable(self, tokenizer) -> bool:
        return False  # special tokens by position, images expanded in the text as the processor does

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        """The chat template's text: one `<start_of_image>` an image (the processor's expansion is `expanded`)."""
        r = Rendered("")
        r.special("<bos>")
        prefix = ""
        if messages and messages[0]["role"] == "system":
            prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
        for i, m in enumerate(messages):
            r.special("<start_of_turn>")
            r.text += ("model" if m["role"] == "assistant" else "user") + "\n" + (prefix if i == 0 else "")
            for k, piece in enumerate(m["content"].split(IMAGE_TOKEN)):
                if k:
                    r.special(BOI)
                r.text += piece
            r.special("<end_of_turn>")
            r.text += "\n"
        if add_generation_prompt:
            r.special("<start_of_turn>")
            r.text += "model\n"
        r.supervised = _all_but(r, (BOI,))
        return r

    @staticmethod
    def expanded(r: Rendered) -> Rendered:
        """What Gemma3Processor tokenizes: each `<start_of_image>` as `\\n\\n<start_of_image><image_soft_token>
        <end_of_image>\\n\\n` (one soft token here; `encoding.expand_images` repeats it), and the notebook's labels:
        everything but `<start_of_image>` and the soft tokens."""
        out, pos, masked = Rendered(""), 0, []
        for s, e in r.specials:
            out.text += r.text[pos:s]
            if r.text[s:e] == BOI:
                out.text += "\n\n"
                start = len(out.text)
                out.special(BOI)
                out.special(SOFT)
                masked.append((start, len(out.text)))
                out.special(EOI)
                out.text += "\n\n"
            else:
                out.special(r.text[s:e])
            pos = e
        out.text += r.text[pos:]
        out.supervised = _all_but(out, (BOI, SOFT))
        return out

    def prompt_ids(self, r: Rendered, tokenizer, image_token_id: int) -> list[int]:
        return positioned_ids(self.expanded(r), tokenizer)[0]

    def ids_and_labels(self, r: Rendered, tokenizer, image_token_id: int, max_length: int):
        return super().ids_and_labels(self.expanded(r), tokenizer, image_token_id, max_length)

    def chat_template_jinja(self) -> str:
        """The released chat template's prompts, also for string content with `<image>` tags (records' and chat's
        form): each tag an image part where it stands, the text between trimmed."""
        return (
            "<bos>{% if messages[0]['role'] == 'system' %}"  # the released one's {{ bos_token }}: Gemma's is <bos>
            "{% set c = messages[0]['content'] %}"
            "{% set prefix = (c if c is string else c[0]['text']) + '\n\n' %}{% set loop_messages = messages[1:] %}"
            "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
            "{% for m in loop_messages %}"
            "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' "
            "+ (prefix if loop.first else '') }}"
            "{% if m['content'] is string %}{% for p in m['content'].split('<image>') %}"
            "{% if not loop.first %}<start_of_image>{% endif %}{{ p | trim }}{% endfor %}"
            "{% else %}{% for item in m['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
            "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        )


GEMMA3_CHAT = Gemma3Template(name="gemma3", system="", multi_image="separate", max_images=6, stop=("<end_of_turn>",))


@dataclass(frozen=True)
class Gemma3Family(Family):
    def template_for(self, source: str, config: dict) -> str | None:
        return "gemma3" if config.get("model_type") in self.model_types else None

    def tokens_per_image(self, config) -> int:
        return int(config.mm_tokens_per_image)  # the projector pools the tower's patches to this many


GEMMA3 = Gemma3Family(
    name="gemma3",
    templates=(GEMMA3_CHAT,),
    model_class="Gemma3ForConditionalGeneration",
    model_types=("gemma3",),
    image_mode="crop",  # the processor's own resize: Gemma 3 squashes every image to 896 x 896, as the notebook
    align_template="gemma3",  # no captioning format: stage 1 trains the projector on captions as replies
    image_marks="token_type_ids",
)
