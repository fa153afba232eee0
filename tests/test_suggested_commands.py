"""Every command a message suggests runs as printed.

The commands are collected from the messages themselves (`grpoctl ...` between backticks), parsed by the real
command line (click) and checked the way the command would check them before any work (export's own option
validation and source resolution); the cheap ones are run, and what they were to fix is fixed after.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.api import ExportOptions, export
from grpoctl.artifacts import Artifacts
from grpoctl.cli import cli
from grpoctl.errors import InputNotFoundError, UsageError
from grpoctl.serve.source import resolve_target
from tests.export.adapters import make_adapter

COMMAND = re.compile(r"`(grpoctl [^`]+)`")


def suggested(text: str) -> list[str]:
    found = COMMAND.findall(text)
    assert found, f"no command suggested in: {text}"
    return found


def parse(command: str) -> tuple[str, dict]:
    """``command`` parsed by grpoctl's own command line: (subcommand, its parameters). Raises what click raises."""
    args = shlex.split(command)
    assert args[0] == "grpoctl"
    group = cli.make_context("grpoctl", args[1:])
    sub = cli.get_command(group, args[1])
    assert sub is not None, f"no such command: {args[1]}"
    return args[1], sub.make_context(args[1], args[2:], parent=group).params


def check_export_command(command: str) -> dict:
    """What `grpoctl export` checks before any work: its options, and that the source resolves."""
    from grpoctl.export.pipeline import _validate, resolve_source

    name, params = parse(command)
    assert name == "export"
    _validate(ExportOptions(gguf=params["gguf"] or [], lora=params["lora"], merged=params["merged"],
                            imatrix=params["imatrix"]))
    resolve_source(params["source"], params["base"])
    return params


def run_as_printed(command: str) -> None:
    res = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert res.exit_code == 0, (command, res.output)


@pytest.fixture
def run(qwen3_run, tmp_path) -> Path:
    copy = tmp_path / "my run"
    shutil.copytree(qwen3_run, copy, ignore=shutil.ignore_patterns("export"))
    return copy


def test_serving_a_lora_only_export_suggests_the_export_command_with_its_output_folder(run, tmp_path):
    out = tmp_path / "elsewhere" / "lora only"
    export(run, ExportOptions(lora=True, output_dir=out, progress=False), manifests=False)
    with pytest.raises(InputNotFoundError) as err:
        resolve_target(out)
    (command,) = suggested(str(err.value))
    params = check_export_command(command)
    assert params["output_dir"] == out and params["gguf"] == "q4_k_m" and Path(params["source"]) == run


def test_serve_refuses_a_quant_name_export_would_refuse_instead_of_suggesting_it(run, tmp_path):
    out = tmp_path / "out"
    export(run, ExportOptions(lora=True, output_dir=out, progress=False), manifests=False)
    with pytest.raises(UsageError, match="unknown GGUF type 'q4km'; valid types: "):
        resolve_target(out, "q4km")
    with pytest.raises(InputNotFoundError) as err:  # an alias export takes is suggested in export's spelling
        resolve_target(out, "Q4-K")
    (command,) = suggested(str(err.value))
    assert check_export_command(command)["gguf"] == "q4_k_m"


def test_an_export_suggested_by_a_run_without_export_parses(run):
    with pytest.raises(InputNotFoundError) as err:
        resolve_target(run, "q8_0")
    (command,) = suggested(str(err.value))
    assert check_export_command(command)["gguf"] == "q8_0"


def _summary(run: Path, steps: int, resumed: bool) -> None:
    (run / "summary.json").write_text(json.dumps({"steps": steps, "resumed_from": str(run / "checkpoints" / "x")
                                                  if resumed else None}))


def test_the_stale_message_says_the_run_was_trained_further_and_its_command_rebuilds_the_export(run, tmp_path,
                                                                                             tiny_qwen3):
    out = tmp_path / "exported"
    _summary(run, 10, resumed=False)
    export(run, ExportOptions(lora=True, output_dir=out, progress=False), manifests=False)
    assert Artifacts.load(out).provenance.run_step == 10
    shutil.rmtree(run / "adapter")  # what `grpoctl train --resume` leaves: a new adapter, more steps
    make_adapter(tiny_qwen3, run / "adapter", seed=7, save_tokenizer=True)
    _summary(run, 20, resumed=True)
    why = Artifacts.load(out).stale()
    assert "the run was trained further after this export (step 10 then, step 20 now: --resume)" in why
    (command,) = suggested(why)
    check_export_command(command)
    run_as_printed(command)
    assert Artifacts.load(out).stale() is None


def test_the_no_vllm_manifests_note_names_lora_and_its_command_adds_what_vllm_serves(run, tmp_path):
    """An export of GGUF files only: vLLM has nothing to serve, and the note's command adds the adapter."""
    out = tmp_path / "gguf only"
    lines: list[str] = []
    export(run, ExportOptions(gguf="q8_0", output_dir=out, progress=False), log=lines.append)
    note = next(line for line in lines if "no vLLM manifests written" in line)
    (command,) = suggested(note)
    assert check_export_command(command)["lora"] is True
    run_as_printed(command)
    written = Artifacts.load(out)
    assert written.by_kind("lora") and (out / "vllm" / "serve.sh").is_file()

    # and serving a type it lacks suggests the export that adds it, which runs as printed too
    with pytest.raises(InputNotFoundError) as err:
        resolve_target(out, "q4_k_m")
    (command,) = suggested(str(err.value))
    check_export_command(command)
    run_as_printed(command)
    assert resolve_target(out, "q4_k_m").gguf.is_file()
