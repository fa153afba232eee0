"""An export made before the run trained further (``--resume``) is detected: push refuses it without
``--allow-stale``, serve warns, and an export in step with its run passes silently."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from grpoctl.artifacts import Artifacts
from grpoctl.cli import cli
from grpoctl.errors import VerificationError
from grpoctl.rundir import RunDir
from tests.export.adapters import make_adapter


@pytest.fixture
def exported_run(qwen3_run, tmp_path, monkeypatch):
    """A copy of the run with a real ``grpoctl export --lora`` of its adapter."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a dry run never needs the Hub
    run = tmp_path / "run"
    shutil.copytree(qwen3_run, run, ignore=shutil.ignore_patterns("export"))
    res = CliRunner().invoke(cli, ["export", str(run), "--lora", "-q", "--no-manifests"])
    assert res.exit_code == 0, res.output
    return run


def _train_further(run, tiny_qwen3):
    """What `grpoctl train --resume` does to the run: a new RUN/adapter with other weights."""
    shutil.rmtree(run / "adapter")
    make_adapter(tiny_qwen3, run / "adapter", seed=7, save_tokenizer=True)


def test_an_export_in_step_with_its_run_is_not_stale(exported_run):
    run = RunDir(exported_run)
    assert Artifacts.load(run.export_dir).stale() is None
    res = CliRunner().invoke(cli, ["push", str(exported_run), "--repo", "alice/tiny", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "stale" not in res.output


def test_push_refuses_an_export_older_than_the_runs_adapter(exported_run, tiny_qwen3):
    _train_further(exported_run, tiny_qwen3)
    res = CliRunner().invoke(cli, ["push", str(exported_run), "--repo", "alice/tiny", "--dry-run"])
    assert res.exit_code == VerificationError.exit_code, res.output
    err = res.stderr
    assert err.startswith("grpoctl: the export in ") and "is stale" in err and err.count("\n") == 1
    recorded = Artifacts.load(exported_run / "export").provenance.adapter.sha256
    assert recorded[:12] in err and "--allow-stale" in err
    assert f"grpoctl export {exported_run} --lora --force" in err  # what rebuilds this export


def test_allow_stale_pushes_the_old_export_with_a_warning(exported_run, tiny_qwen3):
    _train_further(exported_run, tiny_qwen3)
    res = CliRunner().invoke(cli, ["push", str(exported_run), "--repo", "alice/tiny", "--dry-run", "--allow-stale"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("warning: the export in ") and "alice/tiny-lora" in res.output


def test_serve_warns_about_a_stale_export_before_serving_it(exported_run, tiny_qwen3, smol_gguf_export):
    """serve reads artifacts.json, so the check runs on a GGUF export; the daemon here is unreachable on
    purpose: the warning must come before anything is started."""
    export = smol_gguf_export(exported_run)
    _train_further(exported_run, tiny_qwen3)
    res = CliRunner().invoke(cli, ["serve", str(export), "--engine", "ollama", "--host", "127.0.0.1:9"])
    assert res.exit_code != 0
    out = res.output
    assert "warning: the export in " in out and "is stale" in out and "serving the old export anyway" in out


@pytest.fixture
def smol_gguf_export(monkeypatch):
    """Adds the embedded SmolLM2 GGUF to a run's export as its q4_1 file, as an export with --gguf would."""
    from grpoctl.models import embedded_gguf_path
    from tests.serve.exports import make_export

    monkeypatch.delenv("OLLAMA_HOST", raising=False)

    def add(run):
        make_export(run / "export", {"q4_1": embedded_gguf_path()})
        return run / "export"

    return add
