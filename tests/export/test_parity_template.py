"""The parity check's chat template check: the GGUF's template in llama.cpp's own engine (llama-server's
``POST /apply-template``, built from the installed llama-cpp-python's sdist) against the trained tokenizer's
in transformers, on the hard conversations of the Ollama template check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl import llamacpp_tools
from grpoctl.export import gguf as gg
from grpoctl.export.converter import find_converter
from grpoctl.export.parity.llamacpp import template_check
from grpoctl.export.parity.measure import measure
from grpoctl.export.parity.reference import prepare_reference
from grpoctl.export.parity.report import format_table, report, template_lines
from grpoctl.export.parity.scoring import DEFAULT_FLOORS
from tests.export.gguf_support import read_gguf
from tests.tinymodels import CHAT_TEMPLATE

# Two ways a chat template goes wrong in an edited or regenerated GGUF that the easy conversations (a system
# prompt, one question, one plain answer) render identically: the whitespace kept after the reasoning end
# marker, and message text trimmed.
BROKEN = {
    "whitespace after the reasoning end marker dropped": (
        CHAT_TEMPLATE.replace(".lstrip('\\n')", ".lstrip()"), {"reasoning-in-history-whitespace-after-end"}),
    "message text trimmed": (
        CHAT_TEMPLATE.replace("{{- message['content'] }}", "{{- message['content'] | trim }}"),
        {"whitespace", "whitespace-no-system"}),
}


@pytest.fixture(scope="module")
def converter():
    return find_converter(fetch=True)


@pytest.fixture(scope="module")
def good_gguf(converter, tiny_models, tmp_path_factory) -> Path:
    model = tiny_models["qwen3"]
    out = tmp_path_factory.mktemp("template") / "good.gguf"
    gg.convert(converter, model, None, out, "f16", name="tiny", eot_ids=gg.end_of_turn_ids(model),
               metadata=gg.gguf_metadata("tiny", model, None))
    return out


@pytest.fixture(scope="module")
def reference(tiny_models):
    model = tiny_models["qwen3"]
    return prepare_reference(model, None, model, "Be brief.", gg.end_of_turn_ids(model))


def with_template(converter, gguf: Path, template: str, out: Path) -> Path:
    """A copy of ``gguf`` whose ``tokenizer.chat_template`` is ``template``, rewritten by gguf-py's own
    gguf_new_metadata.py from the converter's llama.cpp tree (every tensor and other key unchanged)."""
    script = converter.gguf_py / "gguf" / "scripts" / "gguf_new_metadata.py"
    subprocess.run([sys.executable, str(script), str(gguf), str(out), "--chat-template", template, "--force"],
                   env={**os.environ, "PYTHONPATH": converter.python_path()}, check=True,
                   capture_output=True)
    assert read_gguf(out)[0]["tokenizer.chat_template"] == template
    return out


@pytest.mark.parametrize("broken", list(BROKEN))
def test_gguf_whose_chat_template_departs_fails_parity_naming_the_conversation(converter, llama_tools, good_gguf,
                                                                                reference, tmp_path, broken):
    """The GGUF's template is edited after conversion; its weights are the right ones, so only the template
    check can fail it. It fails the file (the gate), naming exactly the conversations that render differently,
    with both renders; the unedited export passes with no departure at all."""
    template, departing = BROKEN[broken]
    bad_path = with_template(converter, good_gguf, template, tmp_path / "broken.gguf")
    floor = DEFAULT_FLOORS["f16"]
    good = measure(good_gguf, "f16", reference, floor)
    bad = measure(bad_path, "f16", reference, floor)

    check = good.tokenizer["template"]
    assert good.passed and good.tokenizer["template_matches"] is True
    assert check["departures"] == [] and check["engine_departures"] == []
    assert {"whitespace", "reasoning-in-history-whitespace-after-end", "think-on-user", "think-off-multi-turn",
            "system+user"} <= set(check["conversations"])

    check = bad.tokenizer["template"]
    assert not bad.passed and bad.tokenizer["template_matches"] is False and not bad.tokenizer["ok"]
    assert {d["name"] for d in check["departures"]} == departing
    assert all(d["expected"] != d["got"] for d in check["departures"]) and check["engine_departures"] == []
    assert bad.kl < 0.005  # the weights are fine: the template alone fails it
    shown = format_table(report(reference, {"broken.gguf": bad}))
    assert f"chat template departs from transformers on conversation {sorted(departing)[0]!r}" in shown
    assert "departs on " + repr(sorted(departing)[0]) in gg._why(bad)


def dated(template: str, line: str) -> str:
    """``template`` writing ``line`` (a Jinja expression) before the conversation."""
    loop = "{%- for message in messages %}"
    return template.replace(loop, "{{- " + line + " + '\\n' }}" + loop, 1)


def tokenizer_with(model: Path, template: str):
    """The fixture's trained tokenizer, its chat template replaced (as a tokenizer trained with it loads)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template
    return tok


def test_gguf_whose_template_dropped_the_date_fails_naming_the_conversations(converter, llama_tools, good_gguf,
                                                                            tiny_models, tmp_path):
    """A template that writes today's date (``strftime_now``, as Llama 3.2 or Granite do), and a GGUF whose
    template lost that line: every conversation departs and is named; the file with the line passes."""
    with_date = dated(CHAT_TEMPLATE, "'Today: ' + strftime_now('%d %b %Y')")
    tok = tokenizer_with(tiny_models["qwen3"], with_date)
    right = template_check(with_template(converter, good_gguf, with_date, tmp_path / "right.gguf"), tok,
                                  "Be brief.", add_bos=False)
    wrong = template_check(with_template(converter, good_gguf, CHAT_TEMPLATE, tmp_path / "wrong.gguf"), tok,
                                  "Be brief.", add_bos=False)
    assert right["passed"] is True and right["departures"] == right["engine_departures"] == []
    assert wrong["passed"] is False and wrong["engine_departures"] == []
    assert {d["name"] for d in wrong["departures"]} == set(wrong["conversations"])
    assert all(d["expected"].startswith("Today: ") and not d["got"].startswith("Today: ")
               for d in wrong["departures"])


def test_llama_cpp_departure_for_the_trained_template_too_is_reported_not_failed(converter, llama_tools, good_gguf,
                                                                                 tiny_models, tmp_path):
    """llama.cpp's chat layer sets ``date_string`` to today where transformers leaves it undefined (its
    common_chat_extra_context), for any copy of such a template: the GGUF renders what the trained template
    renders in llama.cpp, so the file is right and passes, and the departure is named for the user."""
    template = dated(CHAT_TEMPLATE, "'Date: ' + (date_string if date_string is defined else 'unknown')")
    tok = tokenizer_with(tiny_models["qwen3"], template)
    path = with_template(converter, good_gguf, template, tmp_path / "dated.gguf")
    check = template_check(path, tok, "Be brief.", add_bos=False)
    assert check["passed"] is True and check["departures"] == []
    assert {d["name"] for d in check["engine_departures"]} == set(check["conversations"])
    assert all("Date: unknown" in d["expected"] and "Date: unknown" not in d["got"]
               for d in check["engine_departures"])
    shown = template_lines(check)
    assert shown and all("for the trained template too" in line for line in shown)


def test_template_check_says_it_was_skipped_when_llama_tools_are_not_built(good_gguf, reference, tmp_path,
                                                                         monkeypatch):
    """Without llama.cpp's tools (none in the cache, no $GRPOCTL_LLAMA_CPP_BIN) the chat template cannot be
    rendered by llama.cpp's engine: the report says so by name and why, rather than counting it as a match."""
    monkeypatch.delenv(llamacpp_tools.ENV_BIN, raising=False)
    monkeypatch.setattr(llamacpp_tools, "cached_root", lambda version=None: tmp_path / "no-tools")
    result = measure(good_gguf, "f16", reference, DEFAULT_FLOORS["f16"])
    check = result.tokenizer["template"]
    assert result.tokenizer["template_matches"] is None and "departures" not in check
    assert "not built" in check["skipped"] and "grpoctl doctor --build-llama-tools" in check["skipped"]
    shown = format_table(report(reference, {"good.gguf": result}))
    assert "good.gguf: chat template not rendered by llama.cpp's engine: llama.cpp's tools are not built" in shown
    assert "not checked" in shown
