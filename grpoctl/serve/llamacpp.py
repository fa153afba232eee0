"""Serve a GGUF through llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``).

The server runs as a child process in its own process group so that stopping it (Ctrl-C, SIGTERM,
``grpoctl serve --stop``) takes down everything it started, and so that a crash in llama.cpp cannot
take grpoctl with it. Its output goes to a log file; when it dies before answering, the one line of
that log that says why is shown.

One server per port, whatever its engine: the server process holds an flock on ``port-PORT.lock`` for its
whole life (grpoctl takes it, the child inherits it), so a second ``serve`` on that port fails at once; the
pid file (``ENGINE-PORT.pid``) names exactly that process, and ``serve --stop`` trusts a pid file only while
the port's lock is held. Each server has its own log, ``ENGINE-PORT.log``, written by no other (the previous
server's log on that port is kept as ``ENGINE-PORT.log.1``). :mod:`grpoctl.serve.vllm` runs vLLM's server
through the same class.

The GGUF's own chat template is used: llama-cpp-python would otherwise swap a template that merely
equals a built-in one (ChatML, Llama-3, Mistral) for its hand-written formatter, or fall back to the
Llama-2 format when it cannot guess; ``--chat_format chat_template.default`` pins the embedded one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from grpoctl.errors import ServeError
from grpoctl.fsutil import cache_dir, lock_owner, staged_file, try_lock, write_lock_owner
from grpoctl.procs import alive, start_child, stop_process_group
from grpoctl.serve.common import RecordedAnswer, SmokeResult, chat_messages

# The chat handler llama-cpp-python registers for the GGUF's tokenizer.chat_template.
GGUF_TEMPLATE_FORMAT = "chat_template.default"
# Environment variables that llama_cpp.server reads in preference to its command line.
_OVERRIDING_ENV = ("HOST", "PORT", "CONFIG_FILE")
READY_PATH = "/v1/models"
# what each engine's server process has on its command line (``python -m MODULE``), and its name in messages
SERVER_MODULES = {"llamacpp": "llama_cpp.server", "vllm": "vllm.entrypoints.cli.main"}
ENGINE_LABELS = {"llamacpp": "llama.cpp server", "vllm": "vLLM server"}


def state_dir() -> Path:
    """Where detached servers leave their pid and log files."""
    return cache_dir() / "serve"


def pid_file(port: int, engine: str = "llamacpp") -> Path:
    return state_dir() / f"{engine}-{port}.pid"


def log_file(port: int, engine: str = "llamacpp") -> Path:
    return state_dir() / f"{engine}-{port}.log"


def port_lock(port: int) -> Path:
    return state_dir() / f"port-{port}.lock"


def claim_port(port: int) -> int:
    """The fd of this port's lock, for the server to inherit; ServeError when a grpoctl server holds it.

    The lock file keeps the last holder's pid until the new one writes its own, so the claimer writes its pid at
    once (the server's replaces it once started), and a refused claimer names only a holder that is alive.
    """
    fd = try_lock(port_lock(port))
    if fd is None:
        owner = _live_owner(port)
        what = lock_owner(port_lock(port)).get("what")
        raise ServeError(f"a grpoctl {what if what in ENGINE_LABELS.values() else 'server'} already runs on port {port}"
                         + (f" (pid {owner})" if owner else "")
                         + f"; stop it with `grpoctl serve --stop --port {port}` or pick another --port")
    write_lock_owner(fd, pid=os.getpid(), what="grpoctl serve")
    return fd


def _live_owner(port: int, wait: float = 1.0) -> int | None:
    """The pid the port's lock file names, once it names a live process (the holder may not have written its own
    yet); None if it does not within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        pid = lock_owner(port_lock(port)).get("pid")
        if isinstance(pid, int) and pid > 0 and alive(pid):
            return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def port_in_use_by_grpoctl(port: int) -> bool:
    fd = try_lock(port_lock(port))
    if fd is None:
        return True
    os.close(fd)
    return False


def connect_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def http_base(host: str, port: int) -> str:
    h = connect_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when ``host:port`` cannot be bound."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                hint = (f"; a grpoctl server holds it: stop it with `grpoctl serve --stop --port {port}`"
                        if port_in_use_by_grpoctl(port)
                        else "; pick another with --port (or --port 0 for any free port)")
                raise ServeError(f"port {port} on {host} is already in use{hint}") from None
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _urlopen(req: urllib.request.Request | str, timeout: float):
    """urlopen that ignores http_proxy/https_proxy: the server is on this machine."""
    return _NO_PROXY.open(req, timeout=timeout)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def death_reason(log_text: str) -> str:
    """The one line of a server log that says why it stopped."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in lines:
        if "error loading model:" in ln:
            return "llama.cpp: " + ln.split("error loading model:", 1)[1].strip()
    for ln in reversed(lines):
        if ln.startswith("ERROR:"):
            return ln[len("ERROR:"):].strip()
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else "no output"


def log_tail(log_text: str, lines: int = 3) -> str:
    tail = [ln.strip() for ln in log_text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "no output"


@dataclass
class LlamaCppServer:
    """One ``llama_cpp.server`` process serving one GGUF."""

    ENGINE: ClassVar[str] = "llamacpp"  # the state files' prefix, a key of SERVER_MODULES

    gguf: Path
    host: str = "127.0.0.1"
    port: int = 8080
    n_ctx: int = 2048
    alias: str | None = None
    use_gguf_template: bool = True
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    _lock: int | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return http_base(self.host, self.port)

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", self.host,
               "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        if self.alias:
            cmd += [f"--model_alias={self.alias}"]  # one token: an alias starting with '-' is not an option
        if self.use_gguf_template:
            cmd += ["--chat_format", GGUF_TEMPLATE_FORMAT]
        if _gpu_offload():
            cmd += ["--n_gpu_layers", "-1"]
        return cmd + list(self.extra_args)

    def claim(self) -> None:
        """Make the port this server's (free, and its lock held) before anything is announced; ``start`` uses the
        claim, or makes it."""
        if self._lock is None:
            check_port_free(self.host, self.port)
            self._lock = claim_port(self.port)

    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """``claim`` for the work before ``start`` (announcing, preparing): given up if that work fails."""
        self.claim()
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up a claim that will not be started."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def start(self, detached: bool = False) -> subprocess.Popen:
        """Spawn the server in a new process group, holding this port's lock; ``detached`` servers outlive
        grpoctl and get a pid file."""
        self.claim()
        lock, self._lock = self._lock, None
        try:
            if self.log_path is None:
                self.log_path = log_file(self.port, self.ENGINE)
                if self.log_path.exists():
                    self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k.upper() not in _OVERRIDING_ENV}
            with open(self.log_path, "wb") as log:
                self.proc = start_child(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        pass_fds=(lock,), on_parent_death=None if detached else signal.SIGTERM)
            write_lock_owner(lock, pid=self.proc.pid, what=ENGINE_LABELS[self.ENGINE])
            if detached:
                write_pid_file(self)
        finally:
            os.close(lock)  # the server's inherited copy keeps the port claimed for as long as it runs
        return self.proc

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll ``/v1/models`` until the model is loaded and answering; fail with the reason if it dies."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServeError(f"{ENGINE_LABELS[self.ENGINE]} exited (code {code}) before answering: "
                                 f"{death_reason(self.log_text())} (full log: {self.log_path})")
            try:
                if self.answers():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"{ENGINE_LABELS[self.ENGINE]} did not answer on {self.base_url}{READY_PATH} within "
                                 f"{timeout:.0f}s (raise --ready-timeout for large models); log tail: "
                                 f"{log_tail(self.log_text())} (full log: {self.log_path})")
            time.sleep(0.2)

    def answers(self) -> bool:
        """Whether the model is loaded and this server (not another one on the port) answers."""
        with _urlopen(self.base_url + READY_PATH, timeout=2) as r:
            return r.status == 200 and self._answers_as_us(r.read())

    def _answers_as_us(self, body: bytes) -> bool:
        """Whether the /v1/models answer comes from this server (its alias), not another one on the port."""
        if not self.alias:
            return True
        try:
            models = json.loads(body).get("data") or []
        except (ValueError, AttributeError):
            return False
        return any(isinstance(m, dict) and m.get("id") == self.alias for m in models)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            stop_process_group(self.proc.pid, grace, wait=self.proc.wait)
        code = self.proc.wait()
        _forget_pid_file(pid_file(self.port, self.ENGINE), self.proc.pid)
        return code

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _gpu_offload() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


# --- talking to it ---------------------------------------------------------------------------------
def chat_completion(base_url: str, messages: list[dict], model: str | None = None, max_tokens: int = 256,
                    temperature: float = 0.0, timeout: float = 300.0, **sampling: float) -> dict:
    """One non-streaming OpenAI-style chat completion; returns the parsed response. ``sampling``: more of
    llama_cpp.server's request fields (top_k, repeat_penalty)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, **sampling}
    if model:
        body["model"] = model
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise ServeError(f"chat request to {base_url} failed: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServeError(f"chat request to {base_url} failed: {getattr(e, 'reason', e)}") from None


def smoke_chat(server: LlamaCppServer, system_prompt: str | None, question: str, max_tokens: int,
               reasoning_markers: tuple[str, str] | None = None, recorded: RecordedAnswer | None = None) -> SmokeResult:
    """The probe chat (shown), and with ``recorded`` the export's parity question asked greedily, whose answer
    must be the one the export recorded for this file."""
    resp = chat_completion(server.base_url, chat_messages(system_prompt, question), model=server.alias,
                           max_tokens=max_tokens)
    choice = (resp.get("choices") or [{}])[0]
    answer = (choice.get("message") or {}).get("content") or ""
    greedy = None
    if recorded is not None:
        # as parity's llama.cpp side decodes it: the most likely token each step, no repeat penalty
        again = chat_completion(server.base_url, chat_messages(recorded.system_prompt, recorded.question),
                                model=server.alias, max_tokens=recorded.max_tokens, top_k=1, repeat_penalty=1.0)
        greedy = ((again.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
    return SmokeResult(engine="llama.cpp", model=server.alias or server.gguf.name, system_prompt=system_prompt,
                       question=question, answer=answer, finish_reason=choice.get("finish_reason"),
                       reasoning_markers=reasoning_markers, recorded=recorded, greedy=greedy)


def curl_example(base_url: str, model: str | None, system_prompt: str | None, question: str) -> str:
    body: dict = {"messages": chat_messages(system_prompt, question), "max_tokens": 256}
    if model:
        body = {"model": model, **body}
    return (f"curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body, ensure_ascii=False))}")


# --- detached servers ------------------------------------------------------------------------------
def write_pid_file(server: LlamaCppServer) -> Path:
    """Written while grpoctl holds the port's lock, naming the child that inherits it."""
    assert server.proc is not None
    p = pid_file(server.port, server.ENGINE)
    with staged_file(p) as tmp:
        tmp.write_text(f"{server.proc.pid}\n")
    return p


def _forget_pid_file(p: Path, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(p.read_text().split()[0]) == pid:
            p.unlink()


def _is_our_server(pid: int, port: int, engine: str = "llamacpp") -> bool:
    """Guard against a recycled pid: the process must be that engine's server on that port."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return alive(pid)  # no /proc (macOS): trust the pid file
    args = [a.decode(errors="replace") for a in argv]
    return SERVER_MODULES.get(engine, "?") in args and str(port) in args


def stop_detached(port: int | None = None, grace: float = 10.0) -> list[str]:
    """Stop the detached server on ``port`` (every recorded one when None); returns what was done."""
    pattern = f"*-{port}.pid" if port is not None else "*-*.pid"
    files = [f for f in sorted(state_dir().glob(pattern)) if f.is_file() and f.stem.split("-")[0] in SERVER_MODULES]
    if not files:
        where = f" on port {port}" if port is not None else ""
        raise ServeError(f"no detached grpoctl server{where} is recorded in {state_dir()}; "
                         "start one with `grpoctl serve SOURCE --detach`")
    done = []
    for f in files:
        engine, _, fport_text = f.stem.partition("-")
        fport = int(fport_text)
        try:
            pid = int(f.read_text().split()[0])
        except (ValueError, IndexError):
            f.unlink(missing_ok=True)
            done.append(f"removed unreadable pid file {f}")
            continue
        # the port's lock is held exactly while the server the pid file names runs
        if not port_in_use_by_grpoctl(fport) or not alive(pid) or not _is_our_server(pid, fport, engine):
            f.unlink(missing_ok=True)
            done.append(f"server on port {fport} (pid {pid}) was not running; removed its pid file")
            continue
        stop_process_group(pid, grace)
        f.unlink(missing_ok=True)
        done.append(f"stopped {ENGINE_LABELS[engine]} on port {fport} (pid {pid})")
    return done
