"""The Python API (``grpoctl.api``): the stage functions the command line calls, used here and nowhere else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def exported(qwen3_run, tmp_path_factory) -> tuple[Path, object]:
    from grpoctl.api import ExportOptions, export

    lines: list[str] = []
    out = tmp_path_factory.mktemp("api") / "export"
    artifacts = export(qwen3_run, ExportOptions(gguf="q8_0", lora=True, output_dir=out, progress=False),
                       log=lines.append)
    return out, artifacts, lines


def test_export_takes_gguf_types_as_a_string_and_writes_the_manifests_with_the_export(exported):
    out, artifacts, lines = exported
    assert set(artifacts.ggufs()) == {"q8_0"} and artifacts.by_kind("lora")
    assert artifacts.manifests is not None and artifacts.manifests.ollama.default_quant == "Q8_0"
    assert (out / "gguf" / "Modelfile").is_file() and artifacts.by_kind("manifest")
    assert any(line.startswith("wrote serving manifests:") for line in lines), lines


def test_manifests_and_a_dry_run_push_read_the_export_through_the_api(exported, tmp_path):
    from grpoctl.api import ManifestOptions, push, write_manifests

    out, _, _ = exported
    written = write_manifests(out, ManifestOptions(output_dir=tmp_path / "m", quant="q8"))
    assert {p.name for p in written.files} >= {"Modelfile"} and written.section.ollama.default_quant == "Q8_0"
    report = push(out, "alice/tiny", dry_run=True)
    assert {r.kind for r in report.repos} == {"lora", "gguf"}


def test_export_of_a_base_without_a_tokenizer_lands_and_skips_the_manifests_with_a_note(qwen3_run, tiny_qwen3,
                                                                                         tmp_path):
    """The merge lands; the manifests (which need the chat template) are skipped with one note, not an error."""
    from grpoctl.api import ExportOptions, export
    from grpoctl.models import TOKENIZER_FILES

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_qwen3, base)
    shutil.copytree(qwen3_run / "adapter", adapter)
    for folder in (base, adapter):
        for name in TOKENIZER_FILES:
            (folder / name).unlink(missing_ok=True)
    lines: list[str] = []
    artifacts = export(adapter, ExportOptions(base=str(base), merged="16bit", output_dir=tmp_path / "out",
                                              progress=False), log=lines.append)
    assert artifacts.by_kind("merged") and (tmp_path / "out" / "merged" / "config.json").is_file()
    assert not artifacts.by_kind("manifest") and not artifacts.by_kind("modelfile")
    assert any(line.startswith("note: no tokenizer") for line in lines), lines


def test_export_of_a_base_without_a_chat_template_lands_the_merge_and_says_how_to_add_the_manifests(
        tiny_base_without_template, tmp_path):
    """`grpoctl export ADAPTER --base BASE --merged 16bit` on a base model: the merged model lands, the manifests
    (which need a chat template) are skipped with one note, and the command that note prints writes them."""
    import re
    import shlex

    from click.testing import CliRunner

    from grpoctl.artifacts import Artifacts
    from grpoctl.cli import cli
    from tests.export.adapters import make_adapter
    from tests.tinymodels import CHAT_TEMPLATE

    adapter = make_adapter(tiny_base_without_template, tmp_path / "adapter", save_tokenizer=True)
    out = tmp_path / "my export"
    result = CliRunner().invoke(cli, ["export", str(adapter), "--base", str(tiny_base_without_template),
                                      "--merged", "16bit", "-o", str(out)])
    assert result.exit_code == 0, result.output
    artifacts = Artifacts.load(out)
    assert artifacts.by_kind("merged") and (out / "merged" / "model.safetensors").is_file()
    assert not artifacts.by_kind("manifest") and not artifacts.by_kind("modelfile") and not (out / "vllm").exists()
    notes = [line for line in result.output.splitlines() if "no Modelfile or vLLM manifests" in line]
    assert len(notes) == 1 and notes[0].startswith("note: the tokenizer has no chat template"), result.output
    (command,) = re.findall(r"`(grpoctl manifests [^`]*)`", notes[0])
    assert command == f"grpoctl manifests {shlex.quote(str(out))} --chat-template FILE"

    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    argv = shlex.split(command.replace("FILE", shlex.quote(str(template))))
    later = CliRunner().invoke(cli, argv[1:])  # the command as printed, FILE filled in
    assert later.exit_code == 0, later.output
    assert (out / "vllm" / "chat_template.jinja").read_text() == CHAT_TEMPLATE and (out / "vllm" / "serve.sh").is_file()
    assert Artifacts.load(out).by_kind("manifest")


def test_the_package_names_its_api_and_importing_it_loads_no_torch():
    """``dir(grpoctl)`` shows ``api``, reached lazily, so ``import grpoctl`` stays cheap for the command line."""
    import subprocess
    import sys

    code = ("import sys, grpoctl; assert 'api' in dir(grpoctl); assert 'torch' not in sys.modules; "
            "api = grpoctl.api; assert callable(api.export) and callable(api.train); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
