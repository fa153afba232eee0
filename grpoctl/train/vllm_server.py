"""The vLLM server TRL's ``vllm_mode="server"`` talks to, on a GPU set aside for it, for the length of a run.

The command is TRL's own (``trl.scripts.vllm_serve.build_command``: vLLM's OpenAI server with the weight
transfer endpoints TRL's client uses), so the server always matches the installed TRL. grpoctl adds the
lifecycle a user would otherwise script by hand: one GPU (``CUDA_VISIBLE_DEVICES``), a free port on
127.0.0.1, a log file in the run directory, waiting for ``/health`` with the reason when the server dies
first, and stopping its whole process group when training ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from grpoctl.errors import DependencyError, ServeError
from grpoctl.procs import start_child, stop_process_group

HEALTH_PATH = "/health"
LOG_NAME = "vllm-server.log"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, gpu_memory_utilization: float, max_model_len: int | None) -> list[str]:
    """TRL's command for its vLLM server (its flags change with TRL's client, so TRL builds it)."""
    try:
        from trl.scripts.vllm_serve import ScriptArguments, build_command
    except ImportError as e:
        raise DependencyError(f"trainer.vllm_mode=server needs TRL's vLLM server script ({e})") from None
    return build_command(ScriptArguments(model=model, host="127.0.0.1", port=port,
                                         gpu_memory_utilization=gpu_memory_utilization,
                                         max_model_len=max_model_len))


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "ERROR" in ln]
    return (errors or lines or ["no output"])[-1][:300]


@contextlib.contextmanager
def running_server(model: str, gpu: str, log: Path, *, gpu_memory_utilization: float,
                   max_model_len: int | None, timeout: float = 900.0,
                   say=print) -> Iterator[str]:
    """Start the server on ``gpu`` (a ``CUDA_VISIBLE_DEVICES`` value), yield its base URL once ``/health``
    answers, and stop it (SIGTERM, then SIGKILL) when the block ends, however it ends."""
    port = free_port()
    cmd = server_command(model, port, gpu_memory_utilization, max_model_len)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "VLLM_SERVER_DEV_MODE": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the server is no rank of the training launch
    base = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"grpoctl: starting the vLLM generation server on GPU {gpu} ({base}, log {log})", flush=True)
    with open(log, "wb") as out:
        proc = start_child(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise ServeError(f"the vLLM generation server exited (code {proc.returncode}) before answering: "
                                 f"{_last_error(log)} (full log: {log})")
            try:
                with _NO_PROXY.open(base + HEALTH_PATH, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > timeout:
                raise ServeError(f"the vLLM generation server did not answer on {base}{HEALTH_PATH} within "
                                 f"{timeout:.0f}s (full log: {log})")
            time.sleep(1.0)
        say(f"grpoctl: vLLM generation server ready in {time.monotonic() - started:.0f}s", flush=True)
        yield base
    finally:
        if proc.poll() is None:
            stop_process_group(proc.pid, 20.0, wait=proc.wait)
