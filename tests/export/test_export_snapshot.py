"""An export reads one snapshot of the adapter, and a run that a training process holds is not exported.

`grpoctl train` holds its run (``grpoctl.rundir.training_hold``) for the whole run; an export copies the adapter
under the same lock before reading it and reads only that copy (hashed at the start, checked at the end).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl.api import ExportOptions, export
from grpoctl.artifacts import Artifacts
from grpoctl.errors import OutputBusyError, RunBusyError, VerificationError
from grpoctl.rundir import ADAPTER_WEIGHTS, adapter_sha256
from tests.export.adapters import make_adapter
from tests.export.lifecycle import ROOT, grpoctl, isolated_env

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom grpoctl.rundir import training_hold\n"
        "with training_hold(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def run(qwen3_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(qwen3_run, copy, ignore=shutil.ignore_patterns("export"))
    return copy


@pytest.fixture
def training(run, tmp_path):
    """A process holding the run as `grpoctl train` does while it trains (the same lock, the same function)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, env=isolated_env(tmp_path),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_export_refuses_a_run_that_is_being_trained_with_one_line_and_its_own_code(run, training, tmp_path):
    proc = grpoctl("export", run, "--lora", "-q", "--no-manifests", env=isolated_env(tmp_path))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == RunBusyError.exit_code == 16, out
    assert out.strip().count("\n") == 0 and "Traceback" not in out
    assert out.startswith(f"grpoctl: {run} is being trained right now (grpoctl train, pid {training.pid})")
    assert not (run / "export").exists()


def test_train_holds_its_run_so_a_second_training_of_it_fails_before_anything_else(run, training, tmp_path):
    """Without the lock `train --resume` would stop at the missing checkpoint (exit 2); holding it, train stops
    first, naming the holder."""
    proc = grpoctl("train", "--resume", "-o", run, env=isolated_env(tmp_path))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == OutputBusyError.exit_code, out
    assert f"(train, pid {training.pid})" in out and "Traceback" not in out


def test_a_run_whose_training_has_finished_exports(run, training, tmp_path):
    training.kill()
    training.wait()
    art = export(run, ExportOptions(lora=True, progress=False), manifests=False)
    assert art.provenance.adapter.sha256 == adapter_sha256(run / "adapter")


def test_an_adapter_replaced_mid_export_does_not_reach_the_export(run, tiny_qwen3, tmp_path):
    """Training replaces RUN/adapter while the merge runs: the export holds the adapter it hashed at the start,
    bit for bit the export of that adapter alone, and says that the run changed meanwhile."""
    before = adapter_sha256(run / "adapter")
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    expected = export(alone, ExportOptions(progress=False), manifests=False)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("merging the adapter"):  # what `train --resume` does to the run, mid-export
            shutil.rmtree(run / "adapter")
            make_adapter(tiny_qwen3, run / "adapter", seed=7, save_tokenizer=True)

    art = export(run, ExportOptions(progress=False), manifests=False, log=log)
    assert adapter_sha256(run / "adapter") != before
    assert art.provenance.adapter.sha256 == before and art.provenance.adapter.path == str(run / "adapter")
    assert (art.root / "merged" / "model.safetensors").read_bytes() == \
        (expected.root / "merged" / "model.safetensors").read_bytes()
    assert any("changed while this export ran" in line for line in lines)
    assert "trained further" in Artifacts.load(art.root).stale() or "changed after" in Artifacts.load(art.root).stale()


def test_a_snapshot_changed_during_the_export_fails_it_and_nothing_is_kept(run, tiny_qwen3, tmp_path, monkeypatch):
    """The end-of-export check on the copy: a copy that no longer has the hash taken at the start fails."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again

    def log(line: str) -> None:
        if line.startswith("merging the adapter"):
            snap = next((tmp_path / "tmp").glob("grpoctl-export-*/adapter-snapshot"))
            other = make_adapter(tiny_qwen3, tmp_path / "other", seed=9)
            shutil.copy2(other / ADAPTER_WEIGHTS, snap / ADAPTER_WEIGHTS)

    with pytest.raises(VerificationError, match="changed during the export; nothing was kept"):
        export(run, ExportOptions(progress=False), manifests=False, log=log)
    assert not (run / "export").exists()
