"""The CLI shell: every command answers --help, and bad input is one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["train", "eval", "export", "push", "manifests", "serve", "doctor"]


def grpoctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoctl", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    r = grpoctl(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"Usage: grpoctl {command}" in r.stdout


def test_unknown_option_is_one_line_with_exit_2():
    r = grpoctl("train", "--no-such-option")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-such-option" in lines[0] and "Traceback" not in r.stderr


def test_unknown_command_is_one_line():
    r = grpoctl("frobnicate")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["grpoctl: No such command 'frobnicate'. (see `grpoctl --help`)"]


def test_version():
    from grpoctl import __version__

    r = grpoctl("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_doctor_reports_one_line_per_engine():
    r = grpoctl("doctor")
    names = [line.split("]", 1)[1].split()[0] for line in r.stdout.splitlines() if line.startswith("[")]
    for name in ("torch", "transformers", "trl", "peft", "llama_cpp", "cuda", "unsloth", "gguf-converter", "ollama"):
        assert name in names, r.stdout
    # torch and llama.cpp are installed in any environment that runs these tests
    assert any(line.startswith("[ok  ] torch") for line in r.stdout.splitlines())
    assert r.returncode == 0, r.stdout + r.stderr


def test_grpoctl_lets_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    """Spinning OpenMP threads made a demo step 7x slower on a shared CPU (bench/cpu_threads.md)."""
    import os
    import sys

    from grpoctl.cli import main

    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if preset is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        monkeypatch.setattr(sys, "argv", ["grpoctl", "--version"])
        main()
        assert os.environ["OMP_WAIT_POLICY"] == expected


@pytest.mark.parametrize("command", ["export", "manifests", "train"])
def test_an_output_nothing_can_be_written_to_is_one_line_with_exit_15(command, qwen3_run, tmp_path):
    """`-o /proc/x` (no folder can be made there) used to end in exit 70, "internal error"."""
    import shutil

    args = {"export": ["export", str(qwen3_run), "-o", "/proc/x/out"],
            "manifests": ["manifests", str(tmp_path / "run"), "--output-dir", "/proc/x/out"],
            "train": ["train", "-o", "/proc/x/out", "--max-steps", "1"]}[command]
    if command == "manifests":  # an export to write manifests for
        from tests.manifests.conftest import write_export

        write_export(shutil.copytree(qwen3_run, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "grpoctl", *args], capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 15, proc.stderr
    assert lines[-1].startswith("grpoctl: cannot write to /proc/x/out") and "internal error" not in proc.stderr
    assert "Traceback" not in proc.stderr
