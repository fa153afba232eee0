"""The server's life as a user sees it: `grpoctl serve` in a real process, stopped by signals or --stop,
leaving no llama.cpp process and no pid file behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from grpoctl.serve.llamacpp import free_port

ROOT = Path(__file__).resolve().parents[2]


def grpoctl(*args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grpoctl", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "GRPOCTL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}


def server_pids(port: int) -> list[int]:
    """Live llama_cpp.server processes listening on ``port`` (by command line)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"llama_cpp.server" in args and str(port).encode() in args and state != "Z":
            pids.append(int(d.name))
    return pids


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None or proc.returncode == 0, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server never answered")


def read_until(proc: subprocess.Popen, marker: str) -> str:
    """grpoctl's output up to the line starting with ``marker`` (EOF if it exits first)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    return "".join(seen)


def wait_gone(port: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while server_pids(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not server_pids(port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_foreground_server_stops_cleanly_on_signal(smol_export, env, sig):
    port = free_port()
    proc = grpoctl("serve", smol_export, "--port", port, env=env)
    try:
        out = read_until(proc, "serving;")
        assert len(server_pids(port)) == 1, out
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200
        out += read_until(proc, "  127.0.0.1:")  # the request shows up in grpoctl's output
        assert '"POST /v1/chat/completions HTTP/1.1" 200' in out.splitlines()[-1]
        proc.send_signal(sig)  # only grpoctl: the server sits in its own process group
        rest, _ = proc.communicate(timeout=30)
        out += rest
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "ready: http://127.0.0.1:" in out and "curl http://127.0.0.1:" in out
    assert "stopped" in out
    assert wait_gone(port)


def test_sigterm_while_the_model_loads_leaves_no_server(smol_export, env):
    port = free_port()
    proc = grpoctl("serve", smol_export, "--port", port, env=env)
    try:
        deadline = time.monotonic() + 60
        while not server_pids(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server_pids(port)
        proc.send_signal(signal.SIGTERM)  # grpoctl is still waiting for /v1/models
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # handled as Ctrl-C is (not the signal's default action), and reported as what it was
    assert proc.returncode == 143, out
    assert out.strip().splitlines()[-1] == "grpoctl: interrupted (SIGTERM)"
    assert wait_gone(port)


def test_server_does_not_outlive_a_killed_grpoctl(smol_export, env):
    """SIGKILL gives grpoctl no chance to clean up; the kernel's parent-death signal stops the server."""
    port = free_port()
    proc = grpoctl("serve", smol_export, "--port", port, env=env)
    try:
        wait_ready(port, proc)
        proc.kill()
        proc.wait(10)
        assert wait_gone(port)
    finally:
        for pid in server_pids(port):
            os.kill(pid, signal.SIGKILL)


def test_detach_writes_pid_file_and_stop_stops_it(smol_run, env, tmp_path):
    port = free_port()
    started = grpoctl("serve", smol_run, "--port", port, "--detach", env=env)
    out, _ = started.communicate(timeout=120)
    pid_file = tmp_path / "cache" / "serve" / f"llamacpp-{port}.pid"
    try:
        assert started.returncode == 0, out
        assert f"stop it with `grpoctl serve --stop --port {port}`" in out
        pid = int(pid_file.read_text())
        assert server_pids(port) == [pid]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200

        stopped = grpoctl("serve", "--stop", "--port", port, env=env)
        out, _ = stopped.communicate(timeout=60)
        assert stopped.returncode == 0, out
        assert f"stopped llama.cpp server on port {port} (pid {pid})" in out
        assert wait_gone(port)
        assert not pid_file.exists()
    finally:
        for p in server_pids(port):
            os.kill(p, signal.SIGKILL)


def test_cli_smoke_prints_the_answer_and_exits_zero(smol_run, env):
    proc = grpoctl("serve", smol_run, "--port", "0", "--smoke", "--max-tokens", "24", env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "smoke chat (llama.cpp, model smollm2-135m-instruct:q4_1)" in out
    assert "answer: " in out and "smoke: ok" in out


def test_two_detached_servers_on_one_port_one_wins_and_stop_stops_it(smol_run, env, tmp_path):
    """Both started at once: one owns the port and its pid file names it; the other fails at once, one line."""
    port = free_port()
    both = [grpoctl("serve", smol_run, "--port", port, "--detach", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in both]
    state = tmp_path / "cache" / "serve"
    try:
        assert sorted(p.returncode for p in both) == [0, 11], outs
        loser = outs[[p.returncode for p in both].index(11)]
        last = loser.strip().splitlines()[-1]
        assert last.startswith("grpoctl: ") and "Traceback" not in loser, loser
        assert f"port {port}" in last and f"grpoctl serve --stop --port {port}" in last, last
        assert "starting llama.cpp server" not in loser  # refused before anything was announced
        pid = int((state / f"llamacpp-{port}.pid").read_text())
        winner = both[[p.returncode for p in both].index(0)].pid
        named = re.search(r"\(pid (\d+)\)", last)
        assert named is None or int(named.group(1)) in (pid, winner), last  # the owner then, never a stopped one
        assert server_pids(port) == [pid]  # the pid file names the process that owns the port
        log = (state / f"llamacpp-{port}.log").read_text()
        assert "address already in use" not in log.lower()  # the loser never started a server into this log

        stopped = grpoctl("serve", "--stop", "--port", port, env=env)
        out, _ = stopped.communicate(timeout=60)
        assert stopped.returncode == 0 and f"stopped llama.cpp server on port {port} (pid {pid})" in out, out
        assert wait_gone(port) and not (state / f"llamacpp-{port}.pid").exists()
    finally:
        for p in server_pids(port):
            os.kill(p, signal.SIGKILL)


def test_stop_never_signals_a_process_a_stale_pid_file_names(env, tmp_path):
    """After a crash the pid may name another process, even one that looks like a llama.cpp server on that port
    (here a sleeper with that command line); only the process holding the port's lock is ever stopped."""
    port = free_port()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "llama_cpp.server", str(port)])
    try:
        state = tmp_path / "cache" / "serve"
        state.mkdir(parents=True)
        (state / f"llamacpp-{port}.pid").write_text(f"{bystander.pid}\n")
        stopped = grpoctl("serve", "--stop", "--port", port, env=env)
        out, _ = stopped.communicate(timeout=60)
        assert stopped.returncode == 0, out
        assert f"server on port {port} (pid {bystander.pid}) was not running; removed its pid file" in out
        assert bystander.poll() is None and not (state / f"llamacpp-{port}.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
