"""A disk that fills during an export: on a real small tmpfs (where this machine lets the tests mount one) at
each stage that writes, and by an injected ENOSPC in each writer (anywhere). Always exit 13, one line naming
the export folder, and nothing left behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from tests.conftest import make_run


def _export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def _one_disk_full_line(result, out: Path) -> None:
    assert result.exit_code == 13, result.output
    err = result.stderr.strip().splitlines()
    assert err[-1] == (f"grpoctl: disk full while writing {out}: No space left on device; nothing was kept. Free "
                       "some space and run it again"), result.stderr
    assert "Traceback" not in result.output


def _nothing_left(disk: Path, *keep: str) -> None:
    assert sorted(p.name for p in disk.iterdir()) == sorted(keep)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen3):
    return make_run(tmp_path_factory.mktemp("runs") / "run", tiny_qwen3)


@pytest.fixture(scope="module")
def sizes(run, tmp_path_factory):
    """What each stage writes for this run: the merged folder, the 16-bit GGUF intermediate, the q4_k_m file."""
    out = tmp_path_factory.mktemp("ref") / "out"
    result = _export(run, "--merged", "16bit", "--gguf", "f16,q4_k_m", "-o", out, "-q", "--no-manifests")
    assert result.exit_code == 0, result.output

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    return {"merged": size(out / "merged"), "f16": size(next((out / "gguf").glob("*-F16.gguf"))),
            "q4_k_m": size(next((out / "gguf").glob("*-Q4_K_M.gguf"))), "all": size(out)}


class SmallDisk:
    """A real 8 MiB tmpfs mounted at ``path``; ``fill(free)`` leaves exactly ``free`` bytes on it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self, free: int) -> None:
        st = os.statvfs(self.path)
        with open(self.path / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - free))

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests cover the writers instead")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-ENOSPC tests cover the writers")
    try:
        yield SmallDisk(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("stage", ["merge", "converter", "quantizer"])
def test_disk_filling_up_at_each_stage_is_one_line_and_leaves_nothing(run, sizes, small_disk, monkeypatch, stage,
                                                                     capfd):
    """Another process fills the disk just as a stage starts writing (the check before the export passed): the
    streaming merge, llama.cpp's converter in its subprocess, llama.cpp's quantizer (C++, no errno of its own)."""
    import grpoctl.export.gguf as gguf
    import grpoctl.export.merge as merge

    module, name, leave = {"merge": (merge, "merge_16bit", sizes["merged"] // 2),
                           "converter": (gguf, "convert", sizes["f16"] // 2),
                           "quantizer": (gguf, "quantize", sizes["q4_k_m"] // 2)}[stage]
    real = getattr(module, name)

    def fill_then(*args, **kwargs):
        small_disk.fill(leave)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fill_then)
    out = small_disk / "out"
    result = _export(run, "--merged", "16bit", "--gguf", "q4_k_m", "-o", out)  # the progress lines say how far it got
    _one_disk_full_line(result, out)
    said = result.output + capfd.readouterr().out
    assert ("quantizing ->" in said) == (stage == "quantizer")
    assert ("converting " in said) == (stage != "merge")
    assert "Traceback" not in capfd.readouterr().err  # the converter's own traceback is held back too
    _nothing_left(small_disk.path, "filler")


def test_space_check_lets_a_small_export_that_fits_run(run, sizes, small_disk):
    """A few hundred KiB on a nearly full disk: the margin is proportional, so an export that fits is not
    refused for want of a fixed 64 MiB."""
    small_disk.fill(int(sizes["all"] * 1.6))
    out = small_disk / "out"
    result = _export(run, "--merged", "16bit", "--gguf", "f16,q4_k_m", "-o", out, "-q", "--no-manifests")
    assert result.exit_code == 0, result.output


def test_space_check_refuses_before_writing_with_sizes_a_person_can_read(run, sizes, small_disk):
    small_disk.fill(sizes["merged"] // 4)
    out = small_disk / "out"
    result = _export(run, "--merged", "16bit", "--gguf", "q4_k_m", "-o", out, "-q")
    assert result.exit_code == 13, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"grpoctl: not enough disk space for the export in {out}: about ")
    assert " KiB needed, " in line and " KiB free" in line and "0.00 GiB" not in line
    _nothing_left(small_disk.path, "filler")


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", [
    "grpoctl.export.merge.write_safetensors",  # merged shards and the lora/ adapter
    "grpoctl.export.verify.VerifyReport.save",
    "grpoctl.artifacts.Artifacts.save",
    "grpoctl.manifests.api.staged_file",  # Modelfile, serve.sh, compose, k8s
])
def test_injected_enospc_in_each_writer_is_one_line_and_leaves_nothing(run, tmp_path, monkeypatch, writer):
    module, _, attr = writer.rpartition(".")
    if attr in ("save",):
        module, cls = module.rsplit(".", 1)
        target = getattr(__import__(module, fromlist=[cls]), cls)
    else:
        target = __import__(module, fromlist=[attr])
    monkeypatch.setattr(target, attr, _enospc)
    out = tmp_path / "out"
    result = _export(run, "--merged", "16bit", "--lora", "-o", out, "-q")
    _one_disk_full_line(result, out)
    _nothing_left(tmp_path, "out") if out.exists() else _nothing_left(tmp_path)


def test_injected_enospc_in_manifests_keeps_the_export_as_it_was(run, tmp_path, monkeypatch):
    from grpoctl.artifacts import Artifacts

    out = tmp_path / "out"
    assert _export(run, "--lora", "-o", out, "-q").exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import grpoctl.manifests.api as api

    monkeypatch.setattr(api, "staged_file", _enospc)
    result = CliRunner().invoke(cli, ["manifests", str(out), "--tensor-parallel-size", "2"])
    _one_disk_full_line(result, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert Artifacts.load(out).by_kind("lora")
    _nothing_left(tmp_path, "out")


def test_hub_push_disk_full_is_the_disk_full_answer(tmp_path):
    """huggingface_hub wraps a failed cache write (Xet chunks, HF_HOME) in its own errors; the cause decides."""
    from grpoctl.errors import DiskFullError
    from grpoctl.push.hub import hub_call

    def upload():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "xet" / "chunk"))
        except OSError as err:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from err

    with pytest.raises(DiskFullError) as caught:
        hub_call(upload, "alice/x", "http://127.0.0.1:1", "hf_aliceWriteToken0123456789")
    assert caught.value.exit_code == 13
    assert str(caught.value).startswith(f"disk full while writing {tmp_path / 'xet'}: No space left on device")
