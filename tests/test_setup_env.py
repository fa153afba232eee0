"""`make setup` (tools/setup_env.py) runs pip only when what decides the install changed: the stamp of the
last install, pyproject.toml, the constraints, the Python, or a pinned package's installed version."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_env(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("setup_env", ROOT / "tools" / "setup_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "STAMP", tmp_path / ".setup-stamp-test")
    return mod


@pytest.fixture
def constraints(tmp_path) -> Path:
    """Pins of packages installed here, at their installed versions (a local label like +cpu dropped)."""
    path = tmp_path / "cpu.txt"
    lines = ["# comment", *(f"{n}=={metadata.version(n).split('+')[0]}" for n in ("click", "numpy", "gguf"))]
    path.write_text("\n".join(lines) + "\n")
    return path


def _installed(mod, constraints: Path) -> None:
    mod.STAMP.write_text(mod.key(constraints) + "\n")  # what a finished install writes


def test_nothing_to_do_when_the_stamp_and_every_pin_match(setup_env, constraints):
    assert setup_env.stale(constraints) == "no earlier install recorded in this checkout"
    _installed(setup_env, constraints)
    assert setup_env.stale(constraints) is None


def test_edited_constraints_or_another_python_need_pip(setup_env, constraints, monkeypatch):
    _installed(setup_env, constraints)
    constraints.write_text(constraints.read_text() + "pyyaml\n")  # even a line without a pin changes the set
    assert "changed since the last install" in setup_env.stale(constraints)
    _installed(setup_env, constraints)
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert "changed since the last install" in setup_env.stale(constraints)


def test_a_drifted_or_missing_pinned_package_needs_pip_even_with_a_matching_stamp(setup_env, constraints):
    text = constraints.read_text()
    constraints.write_text(text.replace(f"numpy=={metadata.version('numpy')}", "numpy==0.0.1"))
    _installed(setup_env, constraints)
    assert setup_env.stale(constraints) == f"numpy is {metadata.version('numpy')}, the constraints pin 0.0.1"
    constraints.write_text(text + "no-such-package-grpoctl==1.0\n")
    _installed(setup_env, constraints)
    assert setup_env.stale(constraints) == "no-such-package-grpoctl is not installed"


def test_pins_read_name_and_version_and_ignore_comments_and_ranges(setup_env, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# header\nTorch==2.13.0\nllama_cpp_python==0.3.36  # built here\nhttpx>=0.28\n\n")
    assert setup_env.pins(path) == {"torch": "2.13.0", "llama-cpp-python": "0.3.36"}
