"""Jinja -> Ollama Go template translation, checked byte for byte with Go's own text/template.

Each family's published chat template (tests/manifests/data/templates, sources in SOURCES.md) is
probed, translated, rendered by the Go program on the data Ollama passes, and compared with
transformers' apply_chat_template. Templates Go text/template cannot reproduce -- message text trimmed,
today's date, whitespace after the reasoning end marker -- must fail the check, never pass it.
"""

from __future__ import annotations

import re

import pytest

from grpoctl.manifests.gorender import check_fidelity, infer_reasoning_tags, render_go
from grpoctl.manifests.templates import (
    UntranslatableTemplate,
    probe_chat_format,
    to_go_template,
)
from tests.manifests.conftest import family_tokenizer

# Published templates whose Go translation reproduces them on every probe conversation.
FAITHFUL = ("smollm2", "qwen2", "qwen2.5", "deepseek-v3.2")


def _translate(tok, markers=None):
    fmt = probe_chat_format(tok, markers)
    return fmt, to_go_template(fmt)


def _check(base_tokenizer_dir, family):
    tok = family_tokenizer(base_tokenizer_dir, family)
    fmt, go = _translate(tok)
    return check_fidelity(tok, fmt, go, "Be brief.")


@pytest.mark.parametrize("family", FAITHFUL)
def test_published_template_renders_identically_in_go(family, base_tokenizer_dir, go_renderer):
    report = _check(base_tokenizer_dir, family)
    assert report.passed, report.failures
    names = {c["name"] for c in report.cases}
    assert {"system+user", "multi-turn", "prefill-assistant", "user", "whitespace", "think-on-user",
            "think-off-multi-turn", "user@2031-11-05"} <= names


@pytest.mark.parametrize("family", ["llama-3.1", "llama-3.2", "gemma-2"])
def test_template_trimming_message_text_fails_the_check(family, base_tokenizer_dir, go_renderer):
    """Llama 3.x and Gemma 2 trim message text in Jinja (`| trim`); Go cannot, so a message ending in a line
    break or starting with spaces renders differently and the check must say so."""
    report = _check(base_tokenizer_dir, family)
    assert not report.passed
    ws = [c for c in report.failures if c["name"].startswith("whitespace")]
    assert ws and "  What is 12 * 7?" not in ws[0]["expected"] and "  What is 12 * 7?" in ws[0]["got"]


@pytest.mark.parametrize("family", ["llama-3.2", "granite-3.3", "mistral-small-3.2"])
def test_template_writing_todays_date_fails_the_check(family, base_tokenizer_dir, go_renderer):
    """strftime_now dates would be frozen into the TEMPLATE at export; the check renders on two other days."""
    report = _check(base_tokenizer_dir, family)
    assert not report.passed
    dated = [c for c in report.failures if "@" in c["name"]]
    assert {c["name"].split("@")[1] for c in dated} == {"2024-02-29", "2031-11-05"}
    assert all(c["expected"] != c["got"] for c in dated)


@pytest.mark.parametrize("family", ["deepseek-r1-distill-qwen", "deepseek-r1-0528-qwen3", "qwen3"])
def test_whitespace_after_reasoning_end_marker_fails_the_check(family, base_tokenizer_dir, go_renderer):
    """`</think>\\n\\n answer`: the chat template keeps what follows the end marker as written, but Ollama
    hands the template the answer its response parser split off (leading whitespace gone), so the Go
    template cannot render it the same (DeepSeek-R1 drops reasoning from history, Qwen3 keeps it on the
    last turn)."""
    report = _check(base_tokenizer_dir, family)
    assert not report.passed
    assert any(c["name"].startswith("reasoning-") and c["name"].endswith("whitespace-after-end")
               for c in report.failures)
    assert report.failed_shapes == ["reasoning"]


def test_enable_thinking_default_off_template_translates(base_tokenizer_dir, go_renderer):
    """DeepSeek-V3.2 thinks only when enable_thinking is passed: unset, on and off are three prompts, read
    from .IsThinkSet/.Think (Ollama's template variables since 0.9.0)."""
    tok = family_tokenizer(base_tokenizer_dir, "deepseek-v3.2")
    fmt, go = _translate(tok)
    assert fmt.uses_think_flag and fmt.variants == {"on": {"gen": "<｜Assistant｜><think>"}}
    assert fmt.gen == "<｜Assistant｜><think></think>"
    out = render_go(go, [{"messages": [{"role": "user", "content": "hi"}], "think": t} for t in (None, True, False)])
    assert [o["output"].rsplit("<｜User｜>hi", 1)[1] for o in out] == [
        "<｜Assistant｜><think></think>", "<｜Assistant｜><think>", "<｜Assistant｜><think></think>"]
    report = check_fidelity(tok, fmt, go)
    assert report.passed, report.failures


def test_template_rejecting_system_refuses_it_in_go_too(base_tokenizer_dir, go_renderer):
    """Gemma raises on a system message; the Go template errors the same way instead of dropping it, and the
    check compares the refusal."""
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = SHAPES["gemma-style"]
    fmt, go = _translate(tok)
    out = render_go(go, [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
                         {"messages": [{"role": "user", "content": "hi"}]}])
    assert not out[0]["output"] and "System role not supported" in out[0].get("error", "")
    assert out[1]["output"].endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert fmt.system_error == "System role not supported"
    report = check_fidelity(tok, fmt, go, "Be brief.")
    assert report.passed, report.failures
    refused = {c["name"] for c in report.cases if c.get("refused")}
    assert {"system+user", "multi-turn"} <= refused


def test_check_fails_a_template_that_drops_the_rejected_system_message(base_tokenizer_dir, go_renderer):
    """The Go template of old, which silently dropped a system message the chat template refuses, fails."""
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = SHAPES["gemma-style"]
    fmt, go = _translate(tok)
    dropping = re.sub(r'\{\{ if \$\.System -\}\}\n\{\{ template "[^"]*" \. -\}\}\n\{\{ end -\}\}\n', "", go)
    assert "$.System" not in dropping
    report = check_fidelity(tok, fmt, dropping, "Be brief.")
    assert not report.passed and "system+user" in {c["name"] for c in report.failures}


def test_chatml_smollm2_keeps_default_system_and_stops(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "smollm2")
    fmt, go = _translate(tok)
    assert fmt.family == "chatml"
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in go
    assert fmt.stops[:2] == ["<|im_end|>", "<|im_start|>"]
    assert fmt.bos == ""  # SmolLM2's tokenizer does not add its BOS


def test_qwen3_thinking_switch_and_reasoning_blocks(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "qwen3")
    fmt, go = _translate(tok)
    assert fmt.think == "last_turn" and fmt.uses_think_flag
    assert "<think>\n\n</think>\n\n" in go and "$.IsThinkSet" in go and ".Thinking" in go
    out = render_go(go, [{"messages": [{"role": "user", "content": "hi"}], "think": False},
                         {"messages": [{"role": "user", "content": "hi"}], "think": True}])
    assert out[0]["output"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert out[1]["output"].endswith("<|im_start|>assistant\n")


def test_generation_prompt_prefilling_think_tiny_fixture(tiny_qwen3, go_renderer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    fmt, go = _translate(tok, ("<think>", "</think>"))
    assert fmt.gen == "<|im_start|>assistant\n<think>\n" and fmt.prefills_think
    assert fmt.think == "drop"
    report = check_fidelity(tok, fmt, go)
    # it strips only line breaks after the end marker (`.lstrip('\\n')`), Ollama's parser every space too
    assert {c["name"] for c in report.failures} == {"reasoning-in-history-whitespace-after-end",
                                                    "reasoning-last-turn-whitespace-after-end"}
    assert {"reasoning-in-history", "reasoning-last-turn"} <= {c["name"] for c in report.cases if c["match"]}


def test_deepseek_fullwidth_tokens_and_bos(base_tokenizer_dir, go_renderer):
    for family in ("deepseek-r1-0528-qwen3", "deepseek-r1-distill-qwen"):
        tok = family_tokenizer(base_tokenizer_dir, family)
        fmt, go = _translate(tok)
        assert fmt.family == "deepseek"
        assert fmt.bos == "<｜begin▁of▁sentence｜>" and fmt.bos not in go  # llama.cpp adds BOS itself
        assert "<｜User｜>" in go and "<｜end▁of▁sentence｜>" in fmt.stops
    # the distill template pre-fills <think>; 0528 opens the assistant turn right after the user's
    assert fmt.gen == "<｜Assistant｜><think>\n"


def test_llama3_system_header_and_eot(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "llama-3.1")
    fmt, go = _translate(tok)
    assert fmt.family == "llama3"
    assert "Cutting Knowledge Date: December 2023" in go
    assert fmt.stops[0] == "<|eot_id|>" and "<|begin_of_text|>" not in go


def test_embedded_smollm2_real_tokenizer(smollm2_dir, go_renderer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    fmt, go = _translate(tok)
    report = check_fidelity(tok, fmt, go, "You solve math problems.")
    assert report.passed, report.failures


def test_mismatch_is_detected(base_tokenizer_dir, go_renderer):
    """The check can fail: a template that drops the newline after the role header is caught."""
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    fmt, go = _translate(tok)
    broken = go.replace("<|im_start|>user\n", "<|im_start|>user")
    report = check_fidelity(tok, fmt, broken)
    assert not report.passed and report.failures[0]["expected"] != report.failures[0]["got"]


def test_go_parse_error_is_reported(go_renderer):
    out = render_go("{{ if .System }}unterminated", [{"messages": []}])
    assert out[0]["error"].startswith("parse:")


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim"),
    ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
     "same way"),
    ("{{ raise_exception('System role not supported') }}", "fails"),
])
def test_untranslatable_templates_raise(template, reason, base_tokenizer_dir):
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = template
    with pytest.raises(UntranslatableTemplate, match=reason):
        probe_chat_format(tok)


def test_template_text_with_braces_and_quotes_is_emitted_as_go_literals(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = ("{% for m in messages %}{{ '[[' + m['role'] + ' \"\"\"{{x}}\"\"\"]]\\n' + m['content'] + "
                         "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '[[assistant \"\"\"{{x}}\"\"\"]]\\n' }}"
                         "{% endif %}")
    fmt, go = _translate(tok)
    assert '"""' not in go and "{{x}}" not in go.replace('"{{x}}', "")
    report = check_fidelity(tok, fmt, go)
    assert report.passed, report.failures


# Template shapes beyond the published families: written in the style of Gemma (no system role,
# "model" role; the published Gemma 2 template also trims, see gemma-2.jinja), Phi-3 (EOS appended when
# no generation prompt follows) and Mistral ([INST] without a generation prompt, no system role). Not
# verbatim copies; they exercise the probe's general cases.
SHAPES = {
    "gemma-style": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
        "message['content'] + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\\n'}}{% endif %}"),
    "phi3-style": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
        "{% endif %}"),
    "mistral-style": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('no system') }}{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_other_template_shapes_translate_exactly(shape, base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = SHAPES[shape]
    fmt, go = _translate(tok)
    report = check_fidelity(tok, fmt, go)
    assert report.passed, report.failures
    if shape in ("gemma-style", "mistral-style"):  # a system message is refused by both renderers
        assert not fmt.system_supported and '{{ template "' in go and "{{ $.System }}" not in go
        assert {c["name"] for c in report.cases if c.get("refused")} >= {"system+user", "multi-turn"}
    if shape == "gemma-style":
        assert "<start_of_turn>model\n" in go
    if shape == "phi3-style":
        assert fmt.trailer == "<|im_end|>" and fmt.gen == "<|assistant|>\n"


@pytest.mark.parametrize("family, tags", [("qwen3", ("<think>", "</think>")),
                                          ("deepseek-r1-0528-qwen3", ("<think>", "</think>")),
                                          ("deepseek-r1-distill-qwen", ("<think>", "</think>")),
                                          ("llama-3.1", ("", "")), ("smollm2", ("", ""))])
def test_ollama_infers_reasoning_tags_for_thinking_models_only(family, tags, base_tokenizer_dir, go_renderer):
    """Ollama marks a model as thinking-capable when its template shows a `.Thinking` field between the
    reasoning tags inside the range over `.Messages`; the Go program applies that rule to the parsed tree."""
    tok = family_tokenizer(base_tokenizer_dir, family)
    _, go = _translate(tok)
    assert infer_reasoning_tags(go) == tags
