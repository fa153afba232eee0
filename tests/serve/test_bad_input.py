"""Bad input through the CLI: one clear line on stderr, a non-zero exit code, never a traceback."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.serve.llamacpp import free_port
from tests.serve.fake_ollama import FakeOllama


def run_cli(*args: str):
    result = CliRunner().invoke(cli, ["serve", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("grpoctl: "), result.stderr
    return lines[0]


@pytest.fixture
def bogus_arch_gguf(tmp_path):
    """A well-formed GGUF that llama.cpp refuses: an architecture it does not know."""
    import gguf

    path = tmp_path / "bogus.gguf"
    w = gguf.GGUFWriter(str(path), "bogusarch")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_port_in_use_is_refused_before_starting(smol_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(run_cli(smol_run, "--port", port), 11)
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert "--port" in line


def test_missing_gguf(tmp_path):
    line = one_line_error(run_cli(tmp_path / "gone.gguf"), 3)
    assert "does not exist" in line


def test_truncated_gguf_is_not_loadable(tmp_path, smol_gguf):
    path = tmp_path / "half.gguf"
    data = smol_gguf.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = one_line_error(run_cli(path, "--port", free_port()), 11)
    assert "is truncated" in line and "re-run `grpoctl export`" in line


def _nested_arrays_gguf(path, depth: int):
    """A GGUF header whose one metadata value is an array of an array of ... ``depth`` levels deep."""
    import struct

    key = b"general.nested"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)
    path.write_bytes(data + bytes(-len(data) % 32))  # the (empty) tensor data starts 32-byte aligned
    return path


def test_gguf_nesting_arrays_deeply_is_one_line_not_a_recursion_error(tmp_path):
    path = _nested_arrays_gguf(tmp_path / "deep.gguf", 100_000)
    line = one_line_error(run_cli(path, "--port", free_port()), 11)
    assert "nests arrays more than 8 levels deep" in line and "RecursionError" not in line


def test_gguf_nesting_arrays_a_few_levels_is_read(tmp_path):
    from grpoctl.serve.gguf_info import read_gguf_info

    assert read_gguf_info(_nested_arrays_gguf(tmp_path / "two.gguf", 2)).architecture == "unknown"


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    assert "is not a GGUF file" in one_line_error(run_cli(path), 11)


def test_server_that_dies_while_loading_says_why(bogus_arch_gguf):
    line = one_line_error(run_cli(bogus_arch_gguf, "--port", free_port(), "--smoke"), 11)
    assert "llama.cpp server exited" in line
    assert "unknown model architecture: 'bogusarch'" in line


def test_quant_not_exported_lists_the_exported_ones(smol_run):
    line = one_line_error(run_cli(smol_run, "--quant", "q4_k_m"), 3)
    assert "q4_k_m was not exported" in line and "exported: q4_1" in line


def test_no_ollama_daemon_says_how_to_start_one(smol_run, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    line = one_line_error(run_cli(smol_run, "--engine", "ollama"), 11)
    assert "no Ollama daemon answers" in line and "`ollama serve`" in line


def test_rejected_ollama_name_before_any_upload(smol_run, tmp_path, monkeypatch):
    with FakeOllama(tmp_path / "blobs") as fake:
        monkeypatch.setenv("OLLAMA_HOST", fake.host)
        line = one_line_error(run_cli(smol_run, "--engine", "ollama", "--name", "My Model"), 2)
        assert fake.requests == []
    assert "Ollama would reject the model name 'My Model'" in line


def test_stop_with_nothing_detached():
    assert "no detached grpoctl server" in one_line_error(run_cli("--stop"), 11)


@pytest.mark.parametrize(("args", "match"), [
    (["--engine", "ollama", "--detach"], "--detach applies to --engine llamacpp"),
    (["--smoke", "--detach"], "cannot be combined"),
    (["--engine", "ollama", "--port", "9000"], "--port applies to --engine llamacpp"),
    (["--modelfile", "Modelfile"], "--modelfile applies to --engine ollama"),
])
def test_conflicting_options(smol_run, args, match):
    assert match in one_line_error(run_cli(smol_run, *args), 2)


def test_missing_source():
    assert "missing SOURCE" in one_line_error(run_cli(), 2)


@pytest.mark.parametrize(("log", "reason"), [
    ("llama_model_loader: loaded meta data\nllama_model_load: error loading model: tensor 'x' data is not "
     "within the file bounds\nTraceback (most recent call last):\nValueError: Failed to load model from file",
     "llama.cpp: tensor 'x' data is not within the file bounds"),
    ("INFO:     Started server process [1]\nERROR:    [Errno 98] error while attempting to bind on address "
     "('127.0.0.1', 8080): address already in use\nINFO:     Waiting for application shutdown.",
     "[Errno 98] error while attempting to bind on address ('127.0.0.1', 8080): address already in use"),
    ("Traceback (most recent call last):\n  File \"x\", line 1\nModuleNotFoundError: No module named 'uvicorn'",
     "ModuleNotFoundError: No module named 'uvicorn'"),
    ("", "no output"),
])
def test_death_reason_picks_the_line_that_says_why(log, reason):
    from grpoctl.serve.llamacpp import death_reason

    assert death_reason(log) == reason


def test_server_that_never_answers_times_out_with_its_log_tail_and_is_stopped(tmp_path):
    import sys

    from grpoctl.errors import ServeError
    from grpoctl.serve.llamacpp import LlamaCppServer

    class Hung(LlamaCppServer):
        def command(self) -> list[str]:  # a process that never listens, like a model stuck loading
            return [sys.executable, "-c", "import time; print('loading tensors 1/2', flush=True); time.sleep(120)"]

    server = Hung(gguf=tmp_path / "x.gguf", port=free_port(), log_path=tmp_path / "hung.log")
    server.start()
    with pytest.raises(ServeError, match=r"did not answer .* within 1s .*raise --ready-timeout.*loading tensors 1/2"):
        server.wait_ready(timeout=1)
    assert server.proc.poll() is not None  # stopped, not left behind


def _hold_port_lock(port: int, pid_in_file: int | None):
    """Another process holding ``port``'s lock, having written ``pid_in_file`` into it (None: nothing yet)."""
    import json
    import subprocess
    import sys

    from grpoctl.serve.llamacpp import port_lock

    path = port_lock(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"pid": pid_in_file}) if pid_in_file else ""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    if text:
        path.write_text(text)
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("case", ["stale pid", "live pid"])
def test_refused_claim_names_only_a_live_owner(tmp_path, monkeypatch, case):
    import subprocess

    from grpoctl.errors import ServeError
    from grpoctl.serve.llamacpp import claim_port

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    port = free_port()
    dead = subprocess.Popen(["true"])
    dead.wait()  # the previous server on this port, long stopped: its pid is still in the lock file
    holder = _hold_port_lock(port, dead.pid)
    try:
        if case == "live pid":  # the holder has written its own pid, as a claimer does
            from grpoctl.serve.llamacpp import port_lock

            port_lock(port).write_text(f'{{"pid": {holder.pid}}}')
        with pytest.raises(ServeError) as info:
            claim_port(port)
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert f"pid {dead.pid}" not in message
    assert (f"(pid {holder.pid})" in message) == (case == "live pid")


def test_a_port_another_server_holds_is_refused_before_starting_is_printed(tmp_path, monkeypatch):
    from grpoctl.errors import ServeError
    from grpoctl.serve.api import ServeOptions, serve

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    port = free_port()
    gguf = _nested_arrays_gguf(tmp_path / "m.gguf", 1)
    holder = _hold_port_lock(port, None)
    lines: list[str] = []
    try:
        with pytest.raises(ServeError, match="already runs on port"):
            serve(ServeOptions(source=gguf, port=port, detach=True), echo=lines.append)
    finally:
        holder.kill()
        holder.wait()
    assert not any("starting" in ln for ln in lines), lines
