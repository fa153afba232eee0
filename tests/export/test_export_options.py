"""`grpoctl export` options that were environment variables only, --gguf parsed once, and what -q prints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.errors import ConversionError, UsageError
from grpoctl.export import gguf as gg
from grpoctl.export.converter import find_converter
from grpoctl.export.parity import reference, scoring
from grpoctl.export.pipeline import ExportOptions
from tests.conftest import make_run

ROOT = Path(__file__).resolve().parents[2]


def test_gguf_types_are_parsed_once_into_canonical_names_when_the_options_are_built():
    assert ExportOptions(gguf="Q8_0, q4-k,q8_0").gguf == ["q8_0", "q4_k_m"]
    assert ExportOptions(gguf=["q8_0,F16", "bf16"]).gguf == ["q8_0", "f16", "bf16"]
    assert ExportOptions().gguf == []
    with pytest.raises(UsageError, match="unknown GGUF type 'q3_x'"):
        ExportOptions(gguf="q8_0,q3_x")


def test_export_gguf_takes_canonical_names_only(tmp_path):
    """The stage no longer parses what the user typed: an alias reaching it is a caller's mistake, named."""
    from grpoctl.artifacts import Artifacts

    with pytest.raises(UsageError, match="unknown GGUF type 'Q8_0'"):
        gg.export_gguf(tmp_path, None, tmp_path / "gguf", ["Q8_0"], name="m", artifacts=Artifacts(root=tmp_path))


def test_quiet_export_through_the_entry_point_prints_one_line_per_artifact_kind_and_nothing_else(qwen3_run,
                                                                                               tmp_path):
    """-q through the real command (a child process, so the converter's stderr, transformers' bars and
    warnings, and Python warnings all reach the file descriptors they would reach in a terminal): stdout and
    stderr together are the per-kind summary lines and the manifest line, nothing else."""
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "export", str(qwen3_run), "-o", str(out), "--gguf",
                           "q8_0", "--lora", "-q"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    manifest = json.loads((out / "artifacts.json").read_text())
    kinds = sorted({f["kind"] for f in manifest["files"]})
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == kinds, proc.stdout
    assert lines[-1] == f"manifest: {out / 'artifacts.json'}"


def test_without_quiet_the_same_export_shows_its_progress(qwen3_run, tmp_path):
    """The other side of the quiet test: the libraries' output is there to silence (so that test can fail)."""
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "export", str(qwen3_run), "-o", str(out), "--gguf",
                           "q8_0"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() and "parity:" in proc.stdout


@pytest.mark.parametrize("hold_all", [False, True])
def test_quiet_holds_a_childs_stderr_and_releases_it_when_the_child_failed(hold_all, monkeypatch):
    """The converter's stderr relay: passed through as it comes, or (quiet) held and shown only on failure."""
    written: list[bytes] = []
    monkeypatch.setattr(gg, "_write_stderr", written.append)
    relay = gg._HeldTraceback(hold_all=hold_all)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('Writing: 100%|###| 1/1')"],
                            stderr=subprocess.PIPE)
    relay.forward(proc)
    proc.wait()
    assert (b"".join(written) == b"Writing: 100%|###| 1/1") is not hold_all
    relay.release()  # what convert() does when the child failed
    assert b"".join(written) == b"Writing: 100%|###| 1/1"


def test_the_converter_runs_quietly_under_quiet(tiny_models, tmp_path, monkeypatch):
    """Its progress and warnings (the 'Writing' bar, 'Unknown RoPE type') are held, not written, when it succeeds."""
    from grpoctl.quiet import quiet

    written: list[bytes] = []
    monkeypatch.setattr(gg, "_write_stderr", written.append)
    with quiet():
        gg.convert(find_converter(fetch=True), tiny_models["qwen3"], None, tmp_path / "q.gguf", "f16", name="q")
    assert b"".join(written) == b""
    gg.convert(find_converter(fetch=True), tiny_models["qwen3"], None, tmp_path / "l.gguf", "f16", name="l")
    assert b"".join(written)  # not quiet: the same conversion writes to stderr


def test_parity_floors_flag_gates_like_its_environment_variable(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.delenv(scoring.ENV_FLOORS, raising=False)
    run = make_run(tmp_path / "run", tiny_qwen3)
    res = CliRunner().invoke(cli, ["export", str(run), "-o", str(tmp_path / "e"), "--gguf", "f16", "-q",
                                   "--parity-floors", "f16=1.0:0"])  # a floor no converted file meets
    assert res.exit_code == 8, res.output
    assert "below the parity floor" in res.stderr and not (tmp_path / "e").exists()
    res = CliRunner().invoke(cli, ["export", str(run), "-o", str(tmp_path / "e"), "--gguf", "f16", "-q",
                                   "--parity-floors", "f16"])
    assert res.exit_code == 2 and "bad parity floor" in res.stderr


def test_parity_reference_and_device_flags_choose_where_and_how_the_reference_runs(qwen3_run, tmp_path, monkeypatch):
    from grpoctl.api import export

    monkeypatch.setenv(reference.ENV_REFERENCE, "memory")  # the flag wins over the variable
    monkeypatch.setenv(reference.ENV_DEVICE, "cuda:7")  # a device this machine does not have: must not be used
    lines: list[str] = []
    export(qwen3_run, ExportOptions(gguf="f16", output_dir=tmp_path / "e", parity_reference="stream",
                                    parity_device="cpu", progress=False, manifests=False), log=lines.append)
    plan = next(line for line in lines if line.startswith("parity: running"))
    assert "float32 reference on cpu, weights streamed layer by layer" in plan, plan


def test_pre_tokenizer_option_reaches_the_converter(tiny_models, tmp_path, monkeypatch):
    """A tokenizer whose split rules llama.cpp and grpoctl both fail to recognise converts with the type given."""
    from grpoctl.export import pretokenizer

    monkeypatch.delenv(pretokenizer.ENV_OVERRIDE, raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    data = json.loads((model / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|[^\p{L}\p{N}]+"
    (model / "tokenizer.json").write_text(json.dumps(data))
    converter = find_converter(fetch=True)
    with pytest.raises(ConversionError, match="--pre-tokenizer TYPE"):
        gg.convert(converter, model, None, tmp_path / "x.gguf", "f16", name="x")
    info = gg.convert(converter, model, None, tmp_path / "x.gguf", "f16", name="x", pre_tokenizer="llama-bpe")
    assert info["pre_tokenizer"]["type"] == "llama-bpe"


def test_no_parity_cache_flag_computes_the_reference_again_and_the_flag_wins_over_the_variable(qwen3_run, tmp_path,
                                                                                               monkeypatch):
    from grpoctl.api import export
    from grpoctl.export import reference_cache

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(reference_cache.ENV_CACHE, raising=False)

    def reused(n: int, **flags) -> bool:
        lines: list[str] = []
        export(qwen3_run, ExportOptions(gguf="f16", output_dir=tmp_path / f"e{n}", progress=False, manifests=False,
                                        **flags), log=lines.append)
        return any("kept from an earlier export" in line for line in lines)

    assert not reused(1, parity_cache=False) and not reused(2, parity_cache=False)
    monkeypatch.setenv(reference_cache.ENV_CACHE, "0")
    assert not reused(3, parity_cache=True) and reused(4, parity_cache=True)
    assert not reused(5)  # the variable, when no flag is given
