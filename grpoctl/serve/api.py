"""``grpoctl serve``: one function per action, called by the CLI, the tests and scripts alike."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import click

from grpoctl.argtypes import Range, check_fields
from grpoctl.errors import ServeError, UsageError
from grpoctl.exportlayout import VLLM_DIR
from grpoctl.options import option
from grpoctl.procs import termination_as_interrupt
from grpoctl.serve import llamacpp, ollama, vllm
from grpoctl.serve.common import DEFAULT_PROBE, DEFAULT_SMOKE_MAX_TOKENS, default_model_name
from grpoctl.serve.gguf_info import GGUFInfo, read_gguf_info
from grpoctl.serve.source import ServeTarget, resolve_target

ENGINES = ("llamacpp", "ollama", "vllm")
# seconds to wait for a server to answer: vLLM loads the 16-bit model and compiles its graphs first
DEFAULT_READY_TIMEOUT = {"llamacpp": 120.0, "ollama": 120.0, "vllm": 900.0}
# Context for a bare GGUF with no run: enough for a chat, without the KV cache of a 128k-token model.
DEFAULT_CTX_CAP = 4096
# uvicorn's access log: 'INFO:     127.0.0.1:54640 - "POST /v1/chat/completions HTTP/1.1" 200 OK'
_ACCESS_LINE = re.compile(r'^INFO:\s+\S+ - "(GET|POST|PUT|DELETE|OPTIONS) ')


@dataclass
class ServeOptions:
    """What ``grpoctl serve`` takes: ``source`` is its argument, every other field the flag of the same name."""

    source: Path
    engine: str = option("llamacpp", choices=ENGINES, help="llama-cpp-python's OpenAI-compatible server, a running "
                         "Ollama daemon, or vLLM (a CUDA GPU; the export's merged model or base + LoRA, as the vLLM "
                         "manifests run it).")
    quant: str | None = option(help="Which exported GGUF (e.g. q4_k_m); default: the only one, else q4_k_m.")
    host: str | None = option(help="llamacpp/vllm: address to listen on [127.0.0.1]. ollama: daemon address "
                              "[$OLLAMA_HOST or 127.0.0.1:11434].")
    port: Annotated[int, Range(0, 65535)] = option(8080, help="llamacpp/vllm port (0: any free port; with --stop: "
                                                   "which detached server).")
    ctx: Annotated[int, Range(1)] | None = option(help="Context size; default: the run's max_seq_length, else the "
                                                  "GGUF's (capped at 4096).")
    name: str | None = option(help="Model name (Ollama model / llama.cpp alias); default from the GGUF.")
    smoke: bool = option(False, help="Send one chat (training system prompt + a probe), print it, exit 0/1.")
    prompt: str = option(DEFAULT_PROBE, show_default=False, help="Probe question for --smoke and the printed "
                         "example (default: a short arithmetic question).")
    max_tokens: Annotated[int, Range(1)] = option(DEFAULT_SMOKE_MAX_TOKENS, help="Token limit of the smoke chat.")
    detach: bool = option(False, help="llamacpp/vllm: start in the background, write a pid file and return.")
    modelfile: Path | None = option(click_type=click.Path(path_type=Path, dir_okay=False), help="ollama: Modelfile "
                                    "to take TEMPLATE/PARAMETER/SYSTEM from (default: the export's).")
    # None: the engine's DEFAULT_READY_TIMEOUT
    ready_timeout: Annotated[float, Range(1)] | None = option(
        aliases=("--timeout",), default_text=", ".join(f"{s:g} ({e})" for e, s in DEFAULT_READY_TIMEOUT.items()),
        help="Seconds to wait for the server to answer.")
    vllm_mode: str | None = option(choices=vllm.MODES, help="vllm: which of the export's vLLM manifests to run "
                                   "(default: the first written).")
    parity: bool = option(False, help="vllm: measure the served model's prompt log-probabilities against base + "
                          "adapter applied by PEFT; exit 1 if it departs beyond the noise floor.")

    @property
    def timeout(self) -> float:
        if self.ready_timeout is not None:
            return self.ready_timeout
        return DEFAULT_READY_TIMEOUT.get(self.engine, DEFAULT_READY_TIMEOUT["llamacpp"])

    def __post_init__(self) -> None:
        check_fields(self)


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
        raise UsageError("--detach applies to --engine llamacpp or vllm; an Ollama daemon already runs in the "
                         "background")
    if opts.engine != "vllm" and (opts.vllm_mode is not None or opts.parity):
        raise UsageError("--vllm-mode and --parity apply to --engine vllm (export measured the GGUF files already)")
    if opts.engine == "vllm" and opts.quant is not None:
        raise UsageError("--quant picks a GGUF; vLLM serves the export's merged model or base + LoRA "
                         "(pick one with --vllm-mode)")
    if opts.modelfile is not None and opts.engine != "ollama":
        raise UsageError("--modelfile applies to --engine ollama; llama.cpp uses the GGUF's own chat template")
    if opts.smoke and opts.detach:
        raise UsageError("--smoke starts, checks and stops a server; it cannot be combined with --detach")
    if opts.name and opts.engine == "ollama":
        ollama.check_model_name(opts.name)  # before reading or hashing anything
    if opts.engine == "vllm":
        return _serve_vllm(opts, echo)
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
    with server.claimed():  # a port another server holds is refused before anything is announced
        echo(f"starting llama.cpp server: {target.gguf} (n_ctx {n_ctx}) on {server.base_url}")
    with termination_as_interrupt():
        _start(server, opts)
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
        return _serve_on(server, opts, name, target.system_prompt, echo)


def _start(server: llamacpp.LlamaCppServer, opts: ServeOptions) -> None:
    """Start ``server`` (claimed already) and wait until it answers; a server that does not is stopped again."""
    server.start(detached=opts.detach)
    try:
        server.wait_ready(opts.timeout)
    except BaseException:
        server.stop()
        raise


def _serve_on(server: llamacpp.LlamaCppServer, opts: ServeOptions, name: str, system_prompt: str | None,
              echo: Callable[[str], None]) -> int:
    """The running server's address and a request to try, then detached, or in the foreground until stopped."""
    echo(f"ready: {server.url} (model {name!r}, log {server.log_path})")
    echo("try:\n  " + llamacpp.curl_example(server.base_url, name, system_prompt, opts.prompt))
    if opts.detach:
        echo(f"detached: pid {server.proc.pid} (pid file {llamacpp.pid_file(server.port, server.ENGINE)}); "
             f"stop it with `grpoctl serve --stop --port {server.port}`")
        return 0
    echo("serving; Ctrl-C or SIGTERM stops the server")
    return _run_foreground(server, echo)


def _serve_vllm(opts: ServeOptions, echo: Callable[[str], None]) -> int:
    from grpoctl.serve import vllm

    if opts.name:
        raise UsageError("--name does not apply to --engine vllm: the served name is the manifests' "
                         "(`grpoctl manifests RUN --served-model-name NAME`)")
    target = vllm.resolve_vllm_target(opts.source, opts.vllm_mode)
    if why := target.artifacts.stale():
        echo(f"warning: {why}; serving the old export anyway")
    vllm.check_vllm_installed()
    host = opts.host or "127.0.0.1"
    port = llamacpp.free_port(host) if opts.port == 0 else opts.port
    server = vllm.server_for(target, host, port)
    ref = None
    with server.claimed():  # a port another server holds is refused before anything is announced or computed
        if opts.parity:
            # before vLLM takes its share of the GPU: the reference needs the memory only while it runs
            from grpoctl.serve import vllm_parity

            echo("parity: base + adapter applied by PEFT in transformers, against vLLM's prompt log-probabilities")
            ref = vllm_parity.reference_for(target)
        echo(f"starting vLLM server ({target.mode}, model {target.served_model_name!r}) on {server.base_url}")
    with termination_as_interrupt():
        _start(server, opts)
        if opts.parity or opts.smoke:
            try:
                return _vllm_checks(opts, server, target, ref, echo)
            finally:
                server.stop()
        return _serve_on(server, opts, target.served_model_name, target.system_prompt, echo)


def _vllm_checks(opts: ServeOptions, server, target, ref, echo: Callable[[str], None]) -> int:
    """--parity (``ref``: export's reference) and/or --smoke against the running server; the exit code (0 when
    every check passed)."""
    from grpoctl.serve import vllm

    code = 0
    if ref is not None:
        from grpoctl.serve import vllm_parity

        result = vllm_parity.measure_served(server.base_url, target.served_model_name, target.mode, ref)
        echo(f"{'served model':44} {'top-1':>7} {'KL top-k':>9} {'floor':>14}  result")
        echo(f"{'(noise floor: bf16 vs f32)':44} {ref.noise['top1'] * 100:6.1f}% {ref.noise['kl']:9.5f}")
        echo(result.row())
        record_served_parity(target, result, ref)
        code = 0 if result.passed else 1
    if opts.smoke:
        try:
            smoke = vllm.smoke_chat(server, target, opts.prompt, opts.max_tokens)
        except ServeError as e:
            echo(f"smoke: FAILED ({e})")
            return 1
        echo(smoke.report())
        code = code or (0 if smoke.ok else 1)
    return code


def record_served_parity(target, result, ref) -> None:
    """The vLLM row joins the export's record: ``vllm/parity-MODE.json`` and ``artifacts.json``."""
    from dataclasses import asdict

    from grpoctl.artifacts import Artifacts, ServedParityRecord
    from grpoctl.fsutil import output_lock
    from grpoctl.serve.vllm_parity import write_served

    with output_lock(target.export_dir, what="serve --parity"):
        art = Artifacts.load(target.export_dir)
        path = write_served(target.export_dir / VLLM_DIR / f"parity-{target.mode}.json", [result], ref)
        art.add_file(path, "report")
        art.served_parity = {**(art.served_parity or {}), f"vllm:{target.mode}": ServedParityRecord(
            **asdict(result), reference=ref.description, noise_kl=float(ref.noise["kl"]))}
        art.save()


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
    label = llamacpp.ENGINE_LABELS[server.ENGINE]
    """Block until the server exits or grpoctl is asked to stop; always leave no server behind."""
    done = threading.Event()
    follower = threading.Thread(target=_follow_requests, daemon=True,
                                args=(server.log_path, server.log_path.stat().st_size, echo, done))
    follower.start()
    try:
        code = server.proc.wait()
        echo(f"{label} exited with code {code}: {llamacpp.death_reason(server.log_text())}")
        return 1
    except KeyboardInterrupt:
        echo(f"stopping {label} ...")
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
    """Stop detached servers (llama.cpp, vLLM) started by ``grpoctl serve --detach``."""
    for line in llamacpp.stop_detached(port):
        echo(line)
    return 0
