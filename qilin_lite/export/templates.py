"""How the exported model is prompted: the GGUF's jinja chat template, the Ollama Modelfile's Go template, and
the README written beside the files. Each renders training's vicuna_v1 prompt (tests/test_gguf.py runs them).
"""

from __future__ import annotations

import logging

from ..errors import UserError

log = logging.getLogger(__name__)


MARKER = "<__media__>"  # llama.cpp's (mtmd's) default image marker in prompt text
NOTICE = "Research model output, not a diagnosis; a clinician must check every answer."



def gguf_chat_template(system: str) -> str:
    """vicuna_v1 as training rendered it, for llama.cpp: images arrive as mtmd's marker in the text (llama-server
    turns image parts into marker text, llama-mtmd-cli appends the marker to the prompt); a turn with one image gets
    it at its front, a newline, and the text stripped: the authors' placement (conversation.place_image). An earlier
    answer that a client sends back with the space the model generated first (llama-server's replies start with it)
    gets no second space after `ASSISTANT:`.

    Kept under 1024 bytes: llama-cpp-python 0.3 reads metadata strings through a 1024-byte buffer, and a longer
    template reaches its jinja parser cut off, which fails loading the model. Literal spaces are expressions, as
    transformers and llama-cpp-python render with trim_blocks / lstrip_blocks."""
    sys_default = system.replace("'", "\\'")
    m = MARKER
    t = (
        f"{{% set ns = namespace(i=0, s='{sys_default}') %}}"
        "{% if messages[0]['role'] == 'system' %}{% set ns.s = messages[0]['content'] %}{% set ns.i = 1 %}{% endif %}"
        "{% if ns.s %}{{ ns.s + ' ' }}{% endif %}"
        "{% for x in messages[ns.i:] %}"
        "{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
        "{% if x['role'] == 'user' %}{{ 'USER: ' }}"
        f"{{% if c.split('{m}') | length == 2 %}}{{{{ ('{m}\\n' + c.replace('{m}', '').strip()).strip() }}}}"
        "{% else %}{{ c }}{% endif %}{{ ' ' }}"
        "{% else %}{{ 'ASSISTANT:' + ('' if c.startswith(' ') else ' ') + c + '</s>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    if len(t.encode()) >= 1024:
        raise UserError(f"the chat template with this system prompt is {len(t.encode())} bytes; llama-cpp-python "
                        "reads at most 1023: shorten the template's system prompt")
    return t


# vicuna_v1 as training rendered it (conversation.render after place_image), in Ollama's Go template language.
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
OLLAMA_TEMPLATE = """\
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


def ollama_modelfile(model: str, mmproj: str, system: str, template=None) -> str:
    """The Modelfile: vicuna_v1's template (`system` its system prompt), or a newer family's (`template`)."""
    go, stops, params = OLLAMA_TEMPLATE, ["</s>"], {}
    if template is not None and template.style in ("chatml", "huatuo"):
        from .family import ollama_family

        go, system, stops, params = ollama_family(template)
    lines = [f"# {NOTICE}", "# ollama create NAME -f Modelfile   (then: ollama run NAME \"问题 ./image.png\")",
             f"FROM ./{model}", f"FROM ./{mmproj}", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items() if v is not None]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def export_readme(model: str, mmproj: str, name: str, image_mode: str) -> str:
    rule = ("padded to a square in the processor's mean colour" if image_mode == "pad"
            else "resized and centre-cropped")
    return f"""# {name}: GGUF export (qilin-lite)

> {NOTICE}

Run on a CPU with llama.cpp. Send images as `qilin-lite image` writes them (the run trained on images {rule};
an image already square at the tower's size passes through llama.cpp's resizing unchanged):

    qilin-lite image scan.dcm --model <the run> --out scan.png
    llama-mtmd-cli -m {model} --mmproj {mmproj} --jinja --image scan.png -p "这张图像显示了什么？" --temp 0

`--jinja` makes llama.cpp use the chat template inside {model} (the run's vicuna_v1, the image at the front of the
turn as in training); without it llama.cpp's built-in "vicuna" format adds newlines training never saw.
llama-server: `llama-server -m {model} --mmproj {mmproj} --jinja --host 127.0.0.1` (OpenAI-compatible API).
Ollama: `ollama create {name} -f Modelfile` (its template renders the prompt as training did; write the question
alone and give the image as a file, and Ollama puts it in front).

Known llama.cpp bug (issue 25814): its LLaVA graph puts CLIP's CLS token last while its inputs assume it first, so
image features are shifted by one patch. Use a llama.cpp built with the fix (PR 25844) for answers equal to
`qilin-lite chat`'s. Other differences: llama.cpp's projector GELU is the tanh approximation (training: exact);
{model} is {'f16' if model.endswith('-f16.gguf') else 'quantized'}.
"""
