"""A base whose tokenizer has no chat template: ``train --chat-template FILE`` trains it, the run carries the
template, and export, manifests and report use that run without being told again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.errors import DataError, InputNotFoundError
from tests.tinymodels import CHAT_TEMPLATE

pytestmark = pytest.mark.integration

FAST = ["--max-steps", "2", "--set", "trainer.num_generations=2", "--set", "trainer.max_completion_length=8",
        "--set", "trainer.learning_rate=1e-3", "--set", "tracking.sample_completions=1",
        "--set", 'rewards.functions=["format_exact", "format_approx", "answer", "numbers", "language", '
                 '"tests.train.recording:varied"]']


def run_cli(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chatml.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def trained(tiny_base_without_template, template_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base-run") / "run"
    result = run_cli("train", "-m", tiny_base_without_template, "-o", out, "--chat-template", template_file, *FAST)
    assert result.exit_code == 0, result.output
    assert f"chat template from {template_file}" in result.output
    return out


def test_without_a_template_train_says_which_flag_adds_one(tiny_base_without_template, tmp_path):
    result = run_cli("train", "-m", tiny_base_without_template, "-o", tmp_path / "run", *FAST)
    assert result.exit_code == DataError.exit_code
    err = result.stderr.strip()
    assert "\n" not in err and "has no chat template" in err and "--chat-template FILE" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_or_broken_template_file_fails_before_any_model_loads(tiny_base_without_template, tmp_path):
    result = run_cli("train", "-m", tiny_base_without_template, "-o", tmp_path / "run", "--chat-template",
                     tmp_path / "nope.jinja", *FAST)
    assert result.exit_code == InputNotFoundError.exit_code and "nope.jinja does not exist" in result.stderr
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")  # an unclosed tag
    result = run_cli("train", "-m", tiny_base_without_template, "-o", tmp_path / "run", "--chat-template", broken,
                     *FAST)
    assert result.exit_code == DataError.exit_code and "does not render a system + user conversation" in result.stderr
    assert "\n" not in result.stderr.strip() and not (tmp_path / "run").exists()


def test_the_run_records_the_template_and_its_adapter_tokenizer_carries_it(trained, template_file):
    meta = json.loads((trained / "run.json").read_text())
    assert meta["config"]["model"]["chat_template"] == str(template_file)
    assert meta["chat_template"] == {"source": "file", "file": str(template_file),
                                     "sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()}
    assert (trained / "adapter" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_training_keeps_the_configured_number_of_completions_a_step(trained):
    rows = [json.loads(line) for line in (trained / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        (sample,) = r["samples"]  # tracking.sample_completions=1 of the 2 completions each step trained on
        assert sample["prompt"] and isinstance(sample["completion"], str)
        assert set(sample["rewards"]) == {"format_exact", "format_approx", "answer", "numbers", "language", "varied"}


def test_export_and_manifests_use_the_runs_template_without_asking(trained, template_file):
    result = run_cli("export", trained, "--merged", "16bit", "-q")
    assert result.exit_code == 0, result.output
    export = trained / "export"
    assert (export / "merged" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert (export / "vllm" / "serve.sh").is_file() and not (export / "vllm" / "chat_template.jinja").exists()
    again = run_cli("manifests", trained, "--force")
    assert again.exit_code == 0, again.output

    report = run_cli("report", trained)
    assert report.exit_code == 0, report.output
    html = (trained / "report.html").read_text()
    assert f"from {template_file}" in html and "merged/chat_template.jinja" in html
    assert report.stdout.splitlines()[0].split()[:2] == ["step", "reward"]


def test_the_gguf_converted_from_the_run_carries_the_template(trained, tiny_base_without_template, tmp_path):
    """export's GGUF conversion reads the tokenizer from the base with the run's tokenizer files over it; the
    template the run was trained with lands in the GGUF's metadata (read back by the gguf package)."""
    from gguf import GGUFReader

    from grpoctl.export import gguf as gg
    from tests.conftest import convert_tiny

    view = gg.model_view(tiny_base_without_template, trained / "adapter", tmp_path / "view")
    reader = GGUFReader(convert_tiny(view, tmp_path / "run.gguf", "f16"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE


def test_a_template_that_drops_the_users_message_is_refused(tiny_base_without_template):
    from transformers import AutoTokenizer

    from grpoctl.train.data import use_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_base_without_template)
    with pytest.raises(DataError, match="leaves the user's message out"):
        use_chat_template(tok, "{{ '<|im_start|>assistant\\n' }}", "fixed.jinja")
    use_chat_template(tok, CHAT_TEMPLATE, "chatml.jinja")  # the fixture's own template passes
    assert tok.chat_template == CHAT_TEMPLATE
