"""Termination signals and child processes, handled the same way by every command.

SIGTERM (``docker stop``, Kubernetes, CI time-outs) and SIGHUP (a closed terminal) take the path Ctrl-C
takes: they raise KeyboardInterrupt in the main thread, so every ``finally`` and ``except`` that cleans up
after Ctrl-C cleans up after them too, and the CLI exits 128 + the signal's number (130, 143, 129).

Children (the GGUF converter, a launcher, llama.cpp's tools, a server) run in their own process group and
die with grpoctl: when grpoctl is interrupted the whole group gets a signal and, after a grace period,
SIGKILL; when grpoctl is killed outright (SIGKILL leaves it no chance), the kernel's parent-death signal
stops the direct child. Every child starts here: :func:`run_child` runs one to the end (:func:`run_captured`
with its output kept), :func:`start_child` starts a long-lived one (a server) that the caller talks to and
stops with :func:`stop_process_group`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []
_active = [0]  # nesting depth of termination_as_interrupt: the outermost one owns the handlers


def interrupt_exit_code() -> int:
    """128 + the signal that interrupted this process (SIGINT when it was a plain KeyboardInterrupt)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)


def interrupt_name() -> str:
    return signal.Signals(_received[-1]).name if _received else "SIGINT"


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (main thread only; elsewhere a no-op).

    Only the first one raises: a second SIGTERM while ``finally`` blocks clean up must not cut that cleanup
    short (Ctrl-C still does, as a user's explicit second request).
    """
    if threading.current_thread() is not threading.main_thread() or _active[0]:
        yield
        return
    _received.clear()

    def later(signum: int, frame: Any) -> None:
        _received.append(signum)

    def first(signum: int, frame: Any) -> None:
        _received.append(signum)
        for s in TERMINATING:
            signal.signal(s, later)  # a Python handler, unlike SIG_IGN, is not inherited by children
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, first) for s in TERMINATING}
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """Linux only: a preexec hook so the child gets ``sig`` when grpoctl dies, however it dies.

    libc is resolved here, in the parent: the forked child only makes the call, with no dlopen that could
    deadlock on a lock another thread held at fork time. The signal follows the forking thread, so start
    children from the main thread (as the CLI does).
    """
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, sig)  # PR_SET_PDEATHSIG


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (our own exited children are reaped; zombies count as gone)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a recycled pid from its owner."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def stop_process_group(pid: int, grace: float = 10.0, wait: Callable[..., object] | None = None,
                       first: int = signal.SIGTERM) -> None:
    """Signal the process group led by ``pid`` (the child and anything it spawned), then kill it."""
    def signal_group(sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    signal_group(first)
    if wait is not None:
        try:
            wait(timeout=grace)
            signal_group(signal.SIGKILL)  # stragglers in the group, if any
            return
        except subprocess.TimeoutExpired:
            pass
    else:
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    signal_group(signal.SIGKILL)
    if wait is not None:
        wait()


def start_child(cmd: Sequence[str], *, env: dict[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                stdin: Any = subprocess.DEVNULL, cwd: Any = None, pass_fds: Sequence[int] = (),
                on_parent_death: int | None = signal.SIGKILL) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and return it running: for a child that outlives the call (a
    server), which the caller stops with :func:`stop_process_group`. It gets ``on_parent_death`` if grpoctl
    dies outright; None leaves it running then (a detached server)."""
    return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                            start_new_session=True, pass_fds=tuple(pass_fds),
                            preexec_fn=parent_death_signal(on_parent_death) if on_parent_death is not None else None)


def run_child(cmd: Sequence[str], *, env: dict[str, str] | None = None, stdout: Any = None, stderr: Any = None,
              interrupt: int = signal.SIGTERM, grace: float = 10.0, on_parent_death: int = signal.SIGKILL,
              while_running: Callable[[subprocess.Popen], None] | None = None, cwd: Any = None,
              stdin: Any = subprocess.DEVNULL) -> int:
    """Run ``cmd`` to the end in its own process group and return its exit code.

    If anything interrupts the wait (Ctrl-C, SIGTERM, SIGHUP, an error or a time-out in ``while_running``),
    the group gets ``interrupt`` and then SIGKILL after ``grace`` seconds, and the child is reaped before the
    exception goes on: nothing keeps writing into a folder the caller is about to remove. If grpoctl dies
    outright, the child gets ``on_parent_death`` (a launcher that must stop its own workers wants SIGTERM).
    """
    proc = start_child(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                       on_parent_death=on_parent_death)
    try:
        if while_running is not None:
            while_running(proc)
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            stop_process_group(proc.pid, grace, wait=proc.wait, first=interrupt)
        raise


@dataclass(frozen=True)
class Captured:
    """A finished child's exit code and output (decoded as UTF-8, undecodable bytes replaced)."""

    returncode: int
    stdout: str
    stderr: str


def run_captured(cmd: Sequence[str], *, input: str | None = None, timeout: float | None = None,
                 env: dict[str, str] | None = None, cwd: Any = None) -> Captured:
    """:func:`run_child` with ``input`` on its stdin and its stdout and stderr kept: a short command whose answer
    is its output (a version, a rendered template). Past ``timeout`` seconds the group is stopped and
    ``subprocess.TimeoutExpired`` raised; a command that does not exist raises OSError."""
    out: list[bytes] = [b"", b""]

    def talk(proc: subprocess.Popen) -> None:
        out[:] = proc.communicate(None if input is None else input.encode("utf-8"), timeout=timeout)

    code = run_child(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, while_running=talk, grace=5.0)
    return Captured(code, *(b.decode("utf-8", errors="replace") for b in out))
