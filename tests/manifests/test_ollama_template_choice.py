"""Which template Ollama renders a Modelfile's model with, and the TEMPLATE grpoctl writes for it.

Ollama cannot run here; these follow its source (ollama/ollama v0.30.0 to v0.32.15): the registry match
``ollama create`` attaches (server/model.go detectChatTemplate, template/template.go Named), and the
native-or-Go choice (server/routes.go chatModeForModel, server/images.go shouldPreferChatTemplate).
"""

from __future__ import annotations

import random

import pytest

from grpoctl.errors import UsageError, VerificationError
from grpoctl.manifests.ollama import (
    bounded_edit_distance,
    chat_template_capabilities,
    ollama_prompt,
    plan_template,
    registry_template,
)
from tests.manifests.conftest import TEMPLATES, family_tokenizer
from tests.serve.fake_ollama import _levenshtein  # the protocol server's plain restatement of Ollama's


def test_bounded_edit_distance_equals_levenshtein_below_the_bound():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab｜<>") for _ in range(rng.randrange(0, 40)))
        b = "".join(rng.choice("ab｜<>") for _ in range(rng.randrange(0, 40)))
        bound = rng.randrange(1, 30)
        assert bounded_edit_distance(a, b, bound) == min(_levenshtein(a, b), bound), (a, b, bound)


@pytest.mark.parametrize("family, name, distance", [("smollm2", "chatml", 41), ("qwen2", "chatml", 10),
                                                    ("gemma-2", "gemma-instruct", 0),
                                                    ("llama-3.1", "llama3-instruct", 0)])
def test_ollama_create_attaches_the_closest_registry_template(family, name, distance):
    text = (TEMPLATES / f"{family}.jinja").read_text()
    match = registry_template(text)
    assert (match.name, match.distance) == (name, distance)


@pytest.mark.parametrize("family", ["qwen3", "qwen2.5", "deepseek-v3.2", "granite-3.3"])
def test_templates_far_from_every_registry_entry_get_none(family):
    assert registry_template((TEMPLATES / f"{family}.jinja").read_text()) is None


@pytest.mark.parametrize("family, caps, mode", [
    ("smollm2", (), "registry"),  # plain ChatML attached, no more capabilities than it: Go path
    ("gemma-2", (), "registry"),
    ("llama-3.1", ("tools",), "native"),  # llama3-instruct attached, but the chat template also has tools
    ("qwen3", ("tools", "thinking"), "native"),  # nothing attached
])
def test_what_ollama_030_renders_without_a_template(family, caps, mode):
    text = (TEMPLATES / f"{family}.jinja").read_text()
    assert chat_template_capabilities(text) == caps
    assert ollama_prompt(text, None).mode == mode


def test_a_template_with_fewer_capabilities_than_the_chat_template_is_ignored():
    qwen3 = (TEMPLATES / "qwen3.jinja").read_text()
    assert ollama_prompt(qwen3, ("thinking",)).mode == "native"  # tools + thinking beat thinking alone
    smollm2 = (TEMPLATES / "smollm2.jinja").read_text()
    assert ollama_prompt(smollm2, ()).mode == "template"


def test_auto_writes_no_template_where_ollama_renders_natively(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "qwen2.5")
    plan = plan_template(tok, None, "Be brief.")
    assert plan.template is None and plan.go_faithful
    assert plan.section["go_template"] == plan.go_template  # kept for Ollama < 0.30
    assert plan.section["faithful"] == {">=0.30": None, "<0.30": False}  # native: llama.cpp, not checked here
    assert any("--ollama-template go" in n for n in plan.notes)
    go = plan_template(tok, None, "Be brief.", "go")
    assert go.template == plan.go_template and go.section["faithful"]["<0.30"] is True


def test_auto_writes_the_checked_template_where_a_registry_one_would_take_over(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "smollm2")
    plan = plan_template(tok, None, "Be brief.")
    assert plan.template and plan.go_faithful and not plan.notes
    assert plan.section["renders_with"][">=0.30"] == "the Modelfile's TEMPLATE"
    native = plan_template(tok, None, "Be brief.", "native")
    assert native.template is None and "registry template 'chatml'" in native.section["renders_with"][">=0.30"]
    assert any("OLLAMA_GO_TEMPLATE=0" in n for n in native.notes)


def test_go_mode_refuses_a_template_the_check_fails(base_tokenizer_dir, go_renderer):
    tok = family_tokenizer(base_tokenizer_dir, "llama-3.2")
    with pytest.raises(VerificationError, match="current date"):
        plan_template(tok, None, None, "go")
    forced = plan_template(tok, None, None, "go", force=True)
    assert forced.template and any("--force" in n for n in forced.notes)
    assert plan_template(tok, None, None).template is None  # auto: Ollama >= 0.30 renders it natively


def test_unknown_template_mode_is_a_usage_error(base_tokenizer_dir):
    with pytest.raises(UsageError, match="auto, go, native"):
        plan_template(family_tokenizer(base_tokenizer_dir, "qwen2"), None, None, "jinja")


def test_coverage_script_runs_on_the_shipped_templates(capsys, go_renderer):
    from tests.manifests.template_coverage import main

    assert main([str(TEMPLATES)]) == 0
    out = capsys.readouterr().out
    assert "templates: 12" in out and "Go TEMPLATE faithful: 4, refused: 8" in out and "refused, by class" in out


def test_where_llamacpp_departs_from_transformers_the_checked_template_is_preferred(base_tokenizer_dir,
                                                                                   go_renderer):
    """llama.cpp folds a system message into the first user turn where a Gemma-style template raises
    (common/chat.cpp workaround::system_message_not_supported); the checked Go template refuses it as
    transformers does, so auto writes it."""
    from tests.manifests.test_templates import SHAPES

    tok = family_tokenizer(base_tokenizer_dir, "qwen2")
    tok.chat_template = SHAPES["gemma-style"]
    assert ollama_prompt(tok.chat_template, None).mode == "native"
    plan = plan_template(tok, None, None)
    assert plan.template == plan.go_template and plan.go_faithful
    assert plan.section["renders_with"][">=0.30"] == "the Modelfile's TEMPLATE"


def test_llama31_native_render_is_said_to_differ_by_its_date(base_tokenizer_dir, go_renderer):
    """No Modelfile reproduces Llama 3.1 exactly: Go cannot trim, and llama.cpp sets date_string to today
    where transformers keeps the template's "26 Jul 2024"; the step says both."""
    plan = plan_template(family_tokenizer(base_tokenizer_dir, "llama-3.1"), None, None)
    assert plan.template is None and plan.section["faithful"] == {">=0.30": False, "<0.30": False}
    assert any("date_string" in d for d in plan.section["llama_cpp_departures"])
    assert any("llama.cpp, which differs from transformers here" in n for n in plan.notes)


# --- the native render, checked with llama.cpp's own engine --------------------------------------------

@pytest.fixture(scope="module")
def smol_tokenizer_dir(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def template_ggufs(tmp_path_factory, llama_tools):
    """The embedded SmolLM2 GGUF carrying other chat templates, built on demand."""
    from grpoctl.models import embedded_gguf_path
    from tests.manifests.conftest import gguf_with_template

    root = tmp_path_factory.mktemp("ggufs")
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            made[family] = gguf_with_template(embedded_gguf_path(), TEMPLATES / f"{family}.jinja",
                                              root / f"{family}.gguf")
        return made[family]
    return get


def _tok(smollm2_dir, family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tok


def test_native_render_is_checked_with_llamacpps_engine(template_ggufs, smollm2_dir, go_renderer):
    """Qwen2.5's template: Ollama >= 0.30 renders it natively; llama-server's /apply-template on the GGUF
    renders every check conversation as transformers does, so no TEMPLATE is written and the render is
    marked faithful."""
    plan = plan_template(_tok(smollm2_dir, "qwen2.5"), None, "Be brief.", gguf=template_ggufs("qwen2.5"))
    assert plan.template is None
    assert plan.section["native_check"]["passed"] is True and len(plan.section["native_check"]["conversations"]) >= 10
    assert plan.section["faithful"][">=0.30"] is True
    assert "checked byte for byte with llama.cpp's engine" in plan.section["summary"]


def test_native_check_fails_a_gguf_whose_template_is_not_the_tokenizers(template_ggufs, smollm2_dir, go_renderer):
    """A GGUF that carries another template than the tokenizer (here Qwen2.5's, with the tokenizer's default
    system prompt changed) fails the native check. The checked Go template is written, which Ollama < 0.30
    renders; Ollama >= 0.30 still prefers the GGUF's template (it names tools, the Go template does not:
    server/images.go shouldPreferChatTemplate), and the step says that render is not the chat template."""
    tok = _tok(smollm2_dir, "qwen2.5")
    tok.chat_template = tok.chat_template.replace("You are Qwen, created by Alibaba Cloud.", "You are a tutor.")
    plan = plan_template(tok, None, "Be brief.", gguf=template_ggufs("qwen2.5"))
    check = plan.section["native_check"]
    assert check["passed"] is False and "user" in {c["name"] for c in check["failures"]}
    assert "You are a tutor." in check["failures"][0]["expected"] and "Qwen" in check["failures"][0]["got"]
    assert plan.template == plan.go_template and "native" in plan.section["renders_with"][">=0.30"]
    assert plan.section["faithful"] == {">=0.30": False, "<0.30": True}
    assert any("llama.cpp renders user" in n for n in plan.notes)


def test_native_check_finds_llamacpps_date_string_in_llama31(template_ggufs, smollm2_dir, go_renderer):
    """llama.cpp sets date_string to today; transformers leaves Llama 3.1's "26 Jul 2024". No Modelfile
    reproduces this template (Go cannot trim), and the step says so instead of certifying it."""
    plan = plan_template(_tok(smollm2_dir, "llama-3.1"), None, "Be brief.", gguf=template_ggufs("llama-3.1"))
    failures = plan.section["native_check"]["failures"]
    assert failures and all("26 Jul 2024" in c["expected"] and "26 Jul 2024" not in c["got"] for c in failures)
    assert plan.template is None and plan.section["faithful"] == {">=0.30": False, "<0.30": False}
