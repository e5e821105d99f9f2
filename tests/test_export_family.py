"""The exported prompt formats of the newer family (chatml, huatuo): the GGUF's jinja chat template (as llama.cpp's
llama-mtmd-cli and llama-server hand it the image marker) and the Ollama Modelfile's Go template render the text
training rendered. The llama.cpp run of a Qwen2 export is in test_qwen.py."""

from __future__ import annotations

import pytest
from test_gguf import go_render, modelfile_value

from qilin_lite.families import IMAGE_TOKEN, get_template, place_image, render
from qilin_lite.families import MARKER

Q1, A1, Q2 = "两张图有何不同？", "第二张图可见积液。", "积液多吗？"


def trained(messages: list[dict], name: str, image_text: str) -> str:
    t = get_template(name)
    return render(place_image(messages, t), t, add_generation_prompt=True).text.replace(IMAGE_TOKEN, image_text)


def jinja(template: str, messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers / llama-cpp-python
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["chatml", "huatuo"])
@pytest.mark.parametrize("images", [0, 1, 2, 6])
@pytest.mark.parametrize("where", ["after", "before"])  # llama-mtmd-cli appends markers; llama-server puts parts first
def test_gguf_template_renders_what_training_did(name, images, where):
    t = get_template(name).gguf_chat_template()
    assert len(t.encode()) < 1024  # llama-cpp-python's metadata buffer
    marks = MARKER * images
    content = Q1 + marks if where == "after" else marks + Q1
    history = [{"role": "user", "content": content}, {"role": "assistant", "content": A1},
               {"role": "user", "content": Q2}]
    want = trained([{"role": "user", "content": f"{IMAGE_TOKEN}\n" * images + Q1},
                    {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}], name, MARKER)
    assert jinja(t, history) == want
    assert jinja(t, history[:1]) == trained([{"role": "user", "content": f"{IMAGE_TOKEN}\n" * images + Q1}], name,
                                            MARKER)


@pytest.mark.parametrize("name", ["chatml", "huatuo"])
def test_ollama_templates_render_what_training_did(name, tmp_path):
    """Ollama's prompt is training's text with each image's `[img-N]` tag where training put `<image>` (its newline
    after it), for 0, 1, 2 and 6 images, tags counted past 9, and a second turn."""
    from qilin_lite.export import ollama_modelfile

    modelfile = ollama_modelfile("m.gguf", "mmproj.gguf", get_template(name))
    template = modelfile_value(modelfile, "TEMPLATE")
    system = modelfile_value(modelfile, "SYSTEM") if 'SYSTEM """' in modelfile else ""
    cases, wants = [], []
    for first, n in ((0, 0), (0, 1), (0, 2), (0, 6), (9, 2)):
        tags = "".join(f"[img-{first + k}]" for k in range(n))
        ours = [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * n + Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}]
        want = trained(ours, name, "<<IMG>>")
        for k in range(n):  # each placeholder, in order, becomes its tag
            want = want.replace("<<IMG>>", f"[img-{first + k}]", 1)
        msgs = [{"Role": "user", "Content": tags + Q1, "Images": n}, {"Role": "assistant", "Content": A1, "Images": 0},
                {"Role": "user", "Content": Q2, "Images": 0}]
        lead = [{"Role": "system", "Content": system, "Images": 0}] if system else []
        cases.append({"System": system, "Messages": lead + msgs})
        wants.append(want)
    assert go_render(template, cases, tmp_path) == wants
