"""What a GGUF export needs beyond LLaMA for the newer LLaVA family (Qwen2 LLMs: HuatuoGPT-Vision, ChatML runs).

In:  a model directory whose LLM is Qwen2 (tokenizer.json: byte-level BPE), the run's template.
Out: GGUF tokenizer metadata as llama.cpp's own converter writes it for Qwen2 (`gpt2` model, `qwen2` pre-tokenizer,
     the vocabulary's byte-level strings, merges, added special tokens as CONTROL, padding rows UNUSED, no BOS), and
     the GGUF chat template for `chatml` / `huatuo` with llama.cpp's image marker placed as training placed images
     (one `marker\\n` per image in front of the question; huatuo's text moderation as its cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .templates import MARKER


def tokenizer_kv_bpe(w, model_dir: Path, tok, vocab_rows: int) -> None:
    import gguf

    f = model_dir / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; a Qwen2 model's tokenizer is exported from it")
    data = json.loads(f.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise UserError(f"{model_dir}: tokenizer.json is not a BPE tokenizer; Qwen2's is")
    vocab = tok.get_vocab()
    added = tok.added_tokens_decoder  # id -> AddedToken
    if max(vocab.values()) >= vocab_rows:
        raise UserError(f"{model_dir}: the tokenizer has ids past the model's {vocab_rows} embedding rows; the "
                        "tokenizer does not belong to these weights")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, tid in ((w.add_eos_token_id, tok.eos_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    if tok.bos_token_id is not None:
        w.add_bos_token_id(int(tok.bos_token_id))
    w.add_add_bos_token(False)  # Qwen2 prompts start without one, as training's did


# Jinja for llama.cpp (and llama-cpp-python, which reads metadata strings through a 1024-byte buffer): messages
# whose images arrive as the marker inside the text; each marker goes to the front followed by a newline, as
# conversation.place_image put `<image>\n` in training.
_TEXT = ("{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
         "{% set n = c.split('M') | length - 1 %}{% set t = c.replace('M\\n', 'M').replace('M', '')REMOVE %}"
         "{% set imgs = namespace(s='') %}{% for _ in range(n) %}{% set imgs.s = imgs.s + 'M\\n' %}{% endfor %}")


def gguf_family_template(template) -> str:
    if template.style == "chatml":
        sys = template.system.replace("'", "\\'")
        t = (
            f"{{% set ns = namespace(i=0, s='{sys}') %}}"
            "{% if messages[0]['role'] == 'system' %}{% set ns.s = messages[0]['content'] %}{% set ns.i = 1 %}{% endif %}"
            "{% if ns.s %}{{ '<|im_start|>system\\n' + ns.s + '<|im_end|>\\n' }}{% endif %}"
            "{% for x in messages[ns.i:] %}" + _TEXT.replace("REMOVE", ".strip()")
            + "{% if x['role'] == 'user' %}{{ '<|im_start|>user\\n' + imgs.s + t + '<|im_end|>\\n' }}"
            "{% else %}{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
    elif template.style == "huatuo":
        t = (
            "{% for x in messages if x['role'] != 'system' %}"
            + _TEXT.replace("REMOVE", ".replace('<image>', '').replace('<s>', '').replace('</s>', '')")
            + "{% if x['role'] == 'user' %}{{ '<|user|>\\n' + (imgs.s + t).strip() + '\\n' }}"
            "{% else %}{{ '<|assistant|>\\n' + c + ' \\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
        )
    else:
        raise UserError(f"no GGUF chat template for the '{template.name}' template")
    t = t.replace("'M", "'" + MARKER).replace("M'", MARKER + "'").replace("M\\n", MARKER + "\\n")
    if len(t.encode()) >= 1024:
        raise UserError(f"the {template.name} chat template with this system prompt is {len(t.encode())} bytes; "
                        "llama-cpp-python reads at most 1023: shorten the template's system prompt")
    return t


# Ollama (Go templates; what Ollama hands them: see export/templates.py): a user message's images arrive as
# `[img-N]` tags in front of its text (N counts the conversation's images, so tags are 7-9 characters up to 999).
# Each tag gets the newline training put after `<image>`; Go templates have no string search, so a tag's end is
# found by position, as the vicuna template does. Not done (Go templates cannot): stripping the text.
_OLLAMA_USER_TEXT = """\
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
OLLAMA_CHATML = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}<|im_start|>user
""" + _OLLAMA_USER_TEXT + """<|im_end|>
<|im_start|>assistant
{{ else if eq $m.Role "assistant" }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}<|im_end|>
{{ end }}
  {{- end }}
{{- end }}"""
OLLAMA_HUATUO = """\
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}<|user|>
""" + _OLLAMA_USER_TEXT + """
<|assistant|>
{{ else if eq $m.Role "assistant" }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}{{ " " }}
{{ end }}
  {{- end }}
{{- end }}"""


def ollama_family(template) -> tuple[str, str, list[str], dict]:
    """(TEMPLATE, SYSTEM, stop strings, PARAMETERs) of the Modelfile for a chatml / huatuo run."""
    if template.style == "chatml":
        return OLLAMA_CHATML, template.system, ["<|im_end|>"], {}
    if template.style == "huatuo":
        gen = dict(template.generation)
        return OLLAMA_HUATUO, "", ["<|endoftext|>", "<|user|>"], {"repeat_penalty": gen.get("repetition_penalty")}
    raise UserError(f"no Ollama template for the '{template.name}' template")
