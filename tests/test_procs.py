"""Termination signals take Ctrl-C's path, and children die with the command that started them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpoctl.procs import interrupt_exit_code, run_child, termination_as_interrupt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_signal_raises_keyboard_interrupt_with_its_exit_code(sig):
    cleaned = []
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        with termination_as_interrupt():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler interrupts this
            finally:
                os.kill(os.getpid(), sig)  # a second one during cleanup does not cut the cleanup short
                cleaned.append(True)
    assert cleaned == [True]
    assert interrupt_exit_code() == 128 + sig
    assert signal.getsignal(sig) == before  # restored for whoever runs next in this process


# A child that starts a grandchild in its own group, reports both pids and waits.
FAMILY = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(g.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_interrupted_run_child_stops_the_whole_process_group():
    """grpoctl's own SIGTERM while it waits: the child and the grandchild it started are both stopped."""
    script = f"""
import os, signal, subprocess, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from grpoctl.procs import run_child, termination_as_interrupt
def report(proc):
    print(proc.pid, proc.stdout.readline().decode().strip(), flush=True)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    proc.wait()
try:
    with termination_as_interrupt():
        run_child([sys.executable, "-c", {FAMILY!r}], stdout=subprocess.PIPE, grace=5,
                  while_running=report)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child, grandchild, last = out.stdout.split()
    assert last == "interrupted", out.stderr
    deadline = time.monotonic() + 10
    while not (_gone(int(child)) and _gone(int(grandchild))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(int(child)) and _gone(int(grandchild))


def test_child_does_not_outlive_a_killed_parent():
    """kill -9 leaves the parent no chance to clean up; the parent-death signal stops the child anyway."""
    script = f"""
import subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from grpoctl.procs import run_child
run_child([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(600)"])
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_run_child_returns_the_exit_code():
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_run_captured_feeds_stdin_and_keeps_both_streams():
    from grpoctl.procs import run_captured

    code = "import sys; print(sys.stdin.read().upper()); print('note', file=sys.stderr); raise SystemExit(2)"
    ran = run_captured([sys.executable, "-c", code], input="héllo")
    assert (ran.returncode, ran.stdout, ran.stderr) == (2, "HÉLLO\n", "note\n")


def test_run_captured_past_its_timeout_stops_the_whole_process_group(tmp_path):
    """A short command that hangs (a Go build, a tool's --version) is stopped with everything it started."""
    from grpoctl.procs import run_captured

    pids = tmp_path / "pids"
    code = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{p.pid}}'); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_captured([sys.executable, "-c", code], timeout=3)
    child, grandchild = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10
    while not (_gone(child) and _gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child) and _gone(grandchild)


def test_started_child_has_its_own_group_and_dies_with_a_killed_parent_unless_detached():
    """A server started with start_child: its own process group (stop_process_group reaches what it spawns), the
    parent-death signal when attached, none when detached (a server meant to outlive grpoctl)."""
    script = f"""
import subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from grpoctl.procs import start_child
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
attached, detached = start_child(sleeper), start_child(sleeper, on_parent_death=None)
print(attached.pid, detached.pid, flush=True)
sys.stdin.read()
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    attached, detached = map(int, parent.stdout.readline().split())
    try:
        assert os.getpgid(attached) == attached and os.getpgid(detached) == detached
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(attached) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(attached)
        time.sleep(0.5)
        assert not _gone(detached)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(detached, signal.SIGKILL)
