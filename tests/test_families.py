"""The families package is the one place that knows a family: the contract every template keeps, and that nothing
outside the package asks a template's or family's name to decide what to do."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from qilin_lite.families import FAMILIES, IMAGE_TOKEN, TEMPLATES, Template, family_of, get_template, guess_template

PKG = Path(__file__).resolve().parents[1] / "qilin_lite"
NAMES = set(TEMPLATES) | {f.name for f in FAMILIES}


def _compared_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each template / family name a comparison or `match` tests against."""
    hits = []

    def consts(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for e in node.elts:
                yield from consts(e)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                hits += [(node.lineno, v) for v in consts(side) if v in NAMES]
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue):
            hits += [(node.pattern.lineno, v) for v in consts(node.pattern.value) if v in NAMES]
        elif isinstance(node, ast.Attribute) and node.attr == "style":
            hits.append((node.lineno, ".style"))
    return hits


def test_no_template_or_family_name_is_compared_outside_the_families_package():
    found = []
    for f in sorted(PKG.rglob("*.py")):
        if f.is_relative_to(PKG / "families"):
            continue
        found += [f"{f.relative_to(PKG.parent)}:{line}: {name!r}" for line, name in _compared_names(ast.parse(f.read_text()))]
    assert not found, "ask the template (families/base.py) instead of comparing its name:\n" + "\n".join(found)


def test_the_scan_finds_a_comparison():
    """The scan above can fail: it sees the forms a name comparison takes."""
    src = "if t.name == 'huatuo': pass\nif name in ('chatml', 'x'): pass\nif t.style: pass\n"
    assert [n for _, n in _compared_names(ast.parse(src))] == ["huatuo", "chatml", ".style"]


def test_every_template_belongs_to_one_family_and_every_name_resolves():
    for name, t in TEMPLATES.items():
        assert isinstance(t, Template) and get_template(name) is t
        assert sum(t in f.templates for f in FAMILIES) == 1
        assert family_of(t).templates
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "huatuo", "chatml", "qwen2-vl", "qwen3-vl", "gemma3"}


HISTORY = [{"role": "user", "content": f"{IMAGE_TOKEN}\n左肺有什么异常？"}, {"role": "assistant", "content": "可见结节。"},
           {"role": "user", "content": "结节多大？"}]


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t.dialog])
def test_a_dialog_template_keeps_the_contract(name):
    """Every dialog template: training's text of a first question is chat's prompt plus the reply, the spans are
    the replies, its saved Jinja renders chat's prompt text for a history, its GGUF template fits llama-cpp-python's
    buffer, and its Ollama template exists. (Over several rounds `huatuo` differs: training closes each past reply
    with the end token, chat's history as HuatuoGPT-Vision's cli.py sends it has none; issue 35 settles it.)"""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = get_template(name)
    first = t.place_images(HISTORY[:1])
    prompt = t.render(first, add_generation_prompt=True)
    whole = t.render([*first, {"role": "assistant", "content": "约5毫米。"}], eos="</s>")
    assert whole.text.startswith(prompt.text) and prompt.text.count(t.image_text) == 1
    placed = t.place_images(HISTORY)
    spans = t.render([*placed, {"role": "assistant", "content": "约5毫米。"}], eos="</s>")
    if t.supervises == "replies":
        (start, end), = whole.supervised
        assert start >= len(prompt.text) - 1 and whole.text[start:end].strip().startswith("约5毫米。")
        assert ["可见结节。" in spans.text[s:e] for s, e in spans.supervised] == [True, False]
    else:  # the whole text but the image: the question and both replies
        covered = "".join(spans.text[s:e] for s, e in spans.supervised)
        assert all(x in covered for x in ("左肺有什么异常？", "可见结节。", "约5毫米。")) and t.image_text not in covered
    prompt = t.render(placed, add_generation_prompt=True)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja = env.from_string(t.chat_template_jinja()).render(messages=HISTORY, add_generation_prompt=True)
    assert jinja == prompt.text
    from qilin_lite.errors import UserError
    from qilin_lite.families.base import MARKER

    for exported, export in ((t.exports_gguf, t.gguf_chat_template), (t.exports_gguf and t.exports_ollama, t.ollama)):
        if not exported:  # said in one line, not half-written
            with pytest.raises(UserError, match="does not write"):
                export()
    if t.exports_gguf:  # llama.cpp's prompt over the history: training's text, each marker where an image is
        gguf = t.gguf_chat_template()
        assert len(gguf.encode()) < 1024
        marked = [{**m, "content": m["content"].replace(IMAGE_TOKEN, MARKER)} for m in HISTORY]
        text = env.from_string(gguf).render(messages=marked, add_generation_prompt=True, bos_token="<s>")
        shown, image = prompt, t.image_text
        if hasattr(t, "expanded"):  # Gemma 3: compared with what its processor tokenizes; mtmd adds BOI / EOI
            from qilin_lite.families.gemma3 import BOI, EOI, SOFT

            shown, image = t.expanded(prompt), BOI + SOFT + EOI
        bos = ("<s>", "<bos>")  # llama.cpp adds the tokenizer's BOS itself

        def unbos(x: str) -> str:
            return next((x[len(b):] for b in bos if x.startswith(b)), x)

        assert unbos(text.replace(MARKER, image)) == unbos(shown.text)
    if t.exports_gguf and t.exports_ollama:
        assert t.ollama().template and t.ollama().stops


def test_a_caption_template_refuses_dialogs_and_exports():
    from qilin_lite.errors import UserError

    t = get_template("plain")
    assert not t.dialog
    with pytest.raises(ValueError, match="one caption per record"):
        t.check_record([*HISTORY, {"role": "assistant", "content": "约5毫米。"}])
    with pytest.raises(UserError, match="no GGUF chat template"):
        t.gguf_chat_template()


def test_the_image_count_rule_is_one_rule():
    """Training (a BadRecord), chat and the web page (a UserError) ask the same template method."""
    from qilin_lite.errors import UserError
    from qilin_lite.serve.chat_session import check_image_count

    composite, separate = get_template("vicuna_v1"), get_template("huatuo")
    assert composite.image_count_problem(4) is None and separate.image_count_problem(6) is None
    assert "takes at most 4 images (joined into one composite)" in composite.image_count_problem(5)
    assert "takes at most 6 images (each its own image tokens)" in separate.image_count_problem(7)
    with pytest.raises(UserError, match="7 images; the huatuo template takes at most 6 images"):
        check_image_count(7, separate)
    with pytest.raises(UserError, match="no image"):
        check_image_count(0, composite)


@pytest.mark.parametrize("source, config, want", [
    ("FreedomIntelligence/HuatuoGPT-Vision-7B", {"text_config": {"model_type": "qwen2"}}, "huatuo"),
    ("someone/llava-qwen", {"text_config": {"model_type": "qwen2"}}, "chatml"),
    ("Qwen/Qwen2.5-7B-Instruct", {"model_type": "qwen2"}, "chatml"),
    ("lingshu-medical-mllm/Lingshu-7B", {"model_type": "qwen2_5_vl"}, "qwen2-vl"),
    ("Qwen/Qwen3-VL-8B-Instruct", {"model_type": "qwen3_vl"}, "qwen3-vl"),
    ("williamliujl/Qilin-Med-VL-Chat", {"text_config": {"model_type": "llama"}}, "vicuna_v1"),
    ("anything", {}, "vicuna_v1"),
])
def test_a_checkpoint_is_recognised_by_the_first_family_that_claims_it(tmp_path, source, config, want):
    d = tmp_path / source.replace("/", "--")
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    assert guess_template(str(d)) == want


def test_contributing_lists_every_family_module():
    text = (PKG.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for f in sorted((PKG / "families").glob("[!_]*.py")):
        assert f.name in text, f"CONTRIBUTING.md's map does not name families/{f.name}"
