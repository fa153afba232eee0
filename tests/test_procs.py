"""Termination signals take Ctrl-C's path, and children die with the command that started them."""

from __future__ import annotations

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
