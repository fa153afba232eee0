"""`grpoctl doctor`: each check says what is missing and how to fix it."""

from __future__ import annotations

from grpoctl.doctor import run_checks
from tests.serve.fake_ollama import FakeOllama


def _by_name():
    return {c.name: c for c in run_checks()}


def test_converter_missing_from_an_empty_cache_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GRPOCTL_LLAMA_CPP_DIR", raising=False)
    check = _by_name()["gguf-converter"]
    assert check.status == "warn"
    assert "grpoctl doctor --fetch-converter" in check.hint


def test_ollama_daemon_found_through_ollama_host(monkeypatch, tmp_path):
    """Protocol test against tests/serve/fake_ollama.py (no Ollama binary can run here)."""
    with FakeOllama(tmp_path / "blobs", version="0.12.3") as daemon:
        monkeypatch.setenv("OLLAMA_HOST", daemon.host)
        check = _by_name()["ollama"]
    assert check.status == "ok" and "0.12.3" in check.detail


def test_no_ollama_daemon_is_a_warning_with_the_start_command(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # discard port: nothing answers
    check = _by_name()["ollama"]
    assert check.status == "warn" and "ollama serve" in check.hint


def test_llama_tools_missing_from_an_empty_cache_say_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GRPOCTL_LLAMA_CPP_BIN", raising=False)
    check = _by_name()["llama.cpp-tools"]
    assert check.status == "warn" and "not built" in check.detail
    assert "grpoctl doctor --build-llama-tools" in check.hint and "GRPOCTL_LLAMA_CPP_BIN" in check.hint


def test_llama_tools_built_are_shown_with_their_commit(llama_tools):
    check = _by_name()["llama.cpp-tools"]
    assert check.status == "ok" and str(llama_tools.bin_dir) in check.detail
