"""``grpoctl serve``: one function per action, called by the CLI, the tests and scripts alike."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpoctl.errors import ServeError, UsageError
from grpoctl.procs import termination_as_interrupt
from grpoctl.serve import llamacpp, ollama
from grpoctl.serve.common import DEFAULT_PROBE, DEFAULT_SMOKE_MAX_TOKENS, default_model_name
from grpoctl.serve.gguf_info import GGUFInfo, read_gguf_info
from grpoctl.serve.source import ServeTarget, resolve_target

ENGINES = ("llamacpp", "ollama")
# Context for a bare GGUF with no run: enough for a chat, without the KV cache of a 128k-token model.
DEFAULT_CTX_CAP = 4096
# uvicorn's access log: 'INFO:     127.0.0.1:54640 - "POST /v1/chat/completions HTTP/1.1" 200 OK'
_ACCESS_LINE = re.compile(r'^INFO:\s+\S+ - "(GET|POST|PUT|DELETE|OPTIONS) ')


@dataclass
class ServeOptions:
    source: Path
    engine: str = "llamacpp"
    quant: str | None = None
    host: str | None = None
    port: int = 8080
    ctx: int | None = None
    smoke: bool = False
    detach: bool = False
    name: str | None = None
    prompt: str = DEFAULT_PROBE
    max_tokens: int = DEFAULT_SMOKE_MAX_TOKENS
    ready_timeout: float = 120.0
    modelfile: Path | None = None


def context_size(target: ServeTarget, info: GGUFInfo, requested: int | None) -> int:
    """--ctx, else the run's max_seq_length, else the GGUF's trained context (capped); never above the GGUF's."""
    if requested:
        return int(requested)
    n = target.max_seq_length or min(info.context_length or 2048, DEFAULT_CTX_CAP)
    return min(n, info.context_length) if info.context_length else n


def serve(opts: ServeOptions, echo: Callable[[str], None] = print) -> int:
    """Serve ``opts.source``; returns the process exit code (0 ok, 1 smoke chat failed)."""
    if opts.engine not in ENGINES:
        raise UsageError(f"unknown engine {opts.engine!r}; choose one of {', '.join(ENGINES)}")
    if opts.engine == "ollama" and opts.detach:
        raise UsageError("--detach applies to --engine llamacpp; an Ollama daemon already runs in the background")
    if opts.modelfile is not None and opts.engine != "ollama":
        raise UsageError("--modelfile applies to --engine ollama; llama.cpp uses the GGUF's own chat template")
    if opts.smoke and opts.detach:
        raise UsageError("--smoke starts, checks and stops a server; it cannot be combined with --detach")
    if opts.name and opts.engine == "ollama":
        ollama.check_model_name(opts.name)  # before reading or hashing anything
    target = resolve_target(opts.source, opts.quant)
    if target.artifacts is not None and (why := target.artifacts.stale()):
        echo(f"warning: {why}; serving the old export anyway")
    info = read_gguf_info(target.gguf)
    n_ctx = context_size(target, info, opts.ctx)
    name = opts.name or default_model_name(target.gguf.stem, target.quant)
    if opts.engine == "ollama":
        return _serve_ollama(opts, target, info, name, n_ctx, echo)
    return _serve_llamacpp(opts, target, info, name, n_ctx, echo)


def _serve_llamacpp(opts: ServeOptions, target: ServeTarget, info: GGUFInfo, name: str, n_ctx: int,
                    echo: Callable[[str], None]) -> int:
    host = opts.host or "127.0.0.1"
    port = llamacpp.free_port(host) if opts.port == 0 else opts.port
    if not info.chat_template:
        echo(f"warning: {target.gguf.name} has no chat template; llama.cpp falls back to its Llama-2 format")
    server = llamacpp.LlamaCppServer(gguf=target.gguf, host=host, port=port, n_ctx=n_ctx, alias=name,
                                     use_gguf_template=bool(info.chat_template))
    echo(f"starting llama.cpp server: {target.gguf} (n_ctx {n_ctx}) on {server.base_url}")
    with termination_as_interrupt():
        server.start(detached=opts.detach)
        try:
            server.wait_ready(opts.ready_timeout)
        except BaseException:
            server.stop()
            raise
        if opts.smoke:
            try:
                result = llamacpp.smoke_chat(server, target.system_prompt, opts.prompt, opts.max_tokens,
                                             target.reasoning_markers, target.recorded_answer)
            except ServeError as e:
                echo(f"smoke: FAILED ({e})")
                return 1
            finally:
                server.stop()
            echo(result.report())
            return 0 if result.ok else 1
        echo(f"ready: {server.url} (model {name!r}, log {server.log_path})")
        echo("try:\n  " + llamacpp.curl_example(server.base_url, name, target.system_prompt, opts.prompt))
        if opts.detach:
            echo(f"detached: pid {server.proc.pid} (pid file {llamacpp.pid_file(server.port)}); "
                 f"stop it with `grpoctl serve --stop --port {server.port}`")
            return 0
        echo("serving; Ctrl-C or SIGTERM stops the server")
        return _run_foreground(server, echo)


def _follow_requests(log_path: Path, start: int, echo: Callable[[str], None], done: threading.Event) -> None:
    """Echo the server's access-log and error lines as they appear (the rest of its log is llama.cpp's
    model-loading detail, kept in the log file)."""
    with open(log_path, errors="replace") as f:
        f.seek(start)
        pending = ""
        while not done.is_set():
            chunk = f.read()
            if not chunk:
                done.wait(0.25)
                continue
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                if _ACCESS_LINE.search(line) or line.startswith("ERROR:"):
                    echo("  " + line.removeprefix("INFO:").strip())


def _run_foreground(server: llamacpp.LlamaCppServer, echo: Callable[[str], None]) -> int:
    """Block until the server exits or grpoctl is asked to stop; always leave no server behind."""
    done = threading.Event()
    follower = threading.Thread(target=_follow_requests, daemon=True,
                                args=(server.log_path, server.log_path.stat().st_size, echo, done))
    follower.start()
    try:
        code = server.proc.wait()
        echo(f"llama.cpp server exited with code {code}: {llamacpp.death_reason(server.log_text())}")
        return 1
    except KeyboardInterrupt:
        echo("stopping llama.cpp server ...")
        server.stop()
        echo("stopped")
        return 0
    finally:
        server.stop()
        done.set()
        follower.join(timeout=2)


def _serve_ollama(opts: ServeOptions, target: ServeTarget, info: GGUFInfo, name: str, n_ctx: int,
                  echo: Callable[[str], None]) -> int:
    ollama.check_model_name(name)
    version = ollama.ping(opts.host, timeout=5.0)
    ollama.check_version(version)
    echo(f"Ollama daemon {version} at {ollama.resolve_host(opts.host)}")
    reg = ollama.plan_registration(target, info, name, n_ctx, opts.modelfile, version)
    if reg.source == "gguf":
        echo(f"registering {target.gguf.name} as {name!r}: no Modelfile in the export; stop tokens from the "
             "GGUF, context, sampling and system prompt from the run (`grpoctl manifests` writes a Modelfile)")
    else:
        echo(f"registering {target.gguf.name} as {name!r} with TEMPLATE/SYSTEM/PARAMETER from "
             f"{reg.source.removeprefix('modelfile:')}")
    echo(f"prompts: {reg.renders_with}")
    digest = target.verify_digest()
    ollama.register(reg, digest, opts.host, echo=echo)
    if opts.smoke:
        try:
            result = ollama.smoke_chat(name, opts.prompt, opts.max_tokens, opts.host, reg.system,
                                       target.reasoning_markers, target.recorded_answer)
        except ServeError as e:
            echo(f"smoke: FAILED ({e})")
            return 1
        echo(result.report())
        return 0 if result.ok else 1
    echo(f"ready: {name!r} is registered; try:\n" + ollama.usage_hint(name, opts.host, opts.prompt))
    return 0


def stop(port: int | None = None, echo: Callable[[str], None] = print) -> int:
    """Stop detached llama.cpp servers started by ``grpoctl serve --detach``."""
    for line in llamacpp.stop_detached(port):
        echo(line)
    return 0
