"""The files written beside an exported model: the Ollama Modelfile (its Go template is the run's template's,
families/) and the README. The GGUF's own chat template is the template's too (`Template.gguf_chat_template`);
tests/test_gguf.py runs both against training's prompt.
"""

from __future__ import annotations

from ..families import Template


NOTICE = "Research model output, not a diagnosis; a clinician must check every answer."


def ollama_modelfile(model: str, mmproj: str, template: Template) -> str:
    """The Modelfile: the template's Go TEMPLATE (families/), SYSTEM, stops and parameters."""
    o = template.ollama()
    lines = [f"# {NOTICE}", "# ollama create NAME -f Modelfile   (then: ollama run NAME \"问题 ./image.png\")",
             f"FROM ./{model}", f"FROM ./{mmproj}", f'TEMPLATE """{o.template}"""']
    if o.system:
        lines.append(f'SYSTEM """{o.system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in o.stops]
    lines += [f"PARAMETER {k} {v}" for k, v in o.parameters if v is not None]
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
