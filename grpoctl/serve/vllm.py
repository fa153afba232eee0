"""Serve an export through vLLM's OpenAI-compatible server, exactly as the vLLM manifests say.

``grpoctl manifests`` records, per vLLM mode (``merged``, ``merged-4bit``, ``lora``), the ``vllm serve``
arguments its serve.sh, Compose file and Kubernetes objects run (``artifacts.json: manifests.vllm``). This
engine starts vLLM with those same arguments, so what ``grpoctl serve --engine vllm`` proves about the
server is what the manifests will do. The process runs as vLLM's own entry point
(``python -m vllm.entrypoints.cli.main serve``: the interpreter that has vLLM, whatever is on PATH),
in its own process group, with the same port lock, pid file and log handling as the llama.cpp engine
(:class:`grpoctl.serve.llamacpp.LlamaCppServer`).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from grpoctl.artifacts import Artifacts, VllmMode, export_dir_of
from grpoctl.errors import DependencyError, InputNotFoundError, UsageError
from grpoctl.exportlayout import VLLM_DIR
from grpoctl.serve.common import SmokeResult, chat_messages
from grpoctl.serve.llamacpp import LlamaCppServer, _urlopen, chat_completion

HEALTH_PATH = "/health"
MODES = ("merged", "merged-4bit", "lora")
# the placeholders in the recorded argv (grpoctl.manifests.vllm writes them for serve.sh)
EXPORT_DIR_TOKEN = "$EXPORT_DIR"
HERE_TOKEN = "$HERE"


@dataclass
class VllmTarget:
    """One vLLM mode of an export, with its argv resolved to this machine's paths."""

    export_dir: Path
    mode: str
    argv: list[str]  # what follows `vllm serve`, without --host/--port
    served_model_name: str  # what clients ask for: the merged model, or the adapter in lora mode
    artifacts: Artifacts
    modes: list[str] = field(default_factory=list)  # every mode the export has

    @property
    def system_prompt(self) -> str | None:
        run = self.artifacts.run
        return run.system_prompt if run is not None else None

    @property
    def reasoning_markers(self) -> tuple[str, str] | None:
        run = self.artifacts.run
        return run.reasoning_markers if run is not None else None


def _export_dir(source: Path) -> Path:
    source = Path(source)
    if source.is_file():
        raise UsageError(f"{source} is a file; vLLM serves an export's merged model or base + LoRA: name the run "
                         "or export directory (GGUF files are served by --engine llamacpp or ollama)")
    return export_dir_of(source, " --merged 16bit")


def resolve_vllm_target(source: Path, mode: str | None = None) -> VllmTarget:
    """The vLLM mode to serve from a run or export directory (``mode`` None: the first the manifests wrote)."""
    if mode is not None and mode not in MODES:
        raise UsageError(f"unknown vLLM mode {mode!r}; choose one of {', '.join(MODES)}")
    export_dir = _export_dir(source)
    artifacts = Artifacts.load(export_dir)
    section = artifacts.manifests.vllm if artifacts.manifests is not None else None
    recorded: list[VllmMode] = section.modes if section is not None and section.written else []
    if not recorded:
        has = [k for k in ("merged", "merged-4bit", "lora") if artifacts.by_kind(k)]
        run = artifacts.run.root if artifacts.run is not None else export_dir
        if not has:
            raise InputNotFoundError(f"{export_dir} holds no merged model or LoRA adapter for vLLM (GGUF files are "
                                     "served by --engine llamacpp or ollama); export one: "
                                     f"`grpoctl export {run} --merged 16bit` (or --lora)")
        raise InputNotFoundError(f"{export_dir} has no vLLM manifests; write them with `grpoctl manifests {run}`")
    by_mode = {m.mode: m for m in recorded}
    if mode is not None and mode not in by_mode:
        raise InputNotFoundError(f"{export_dir} has no {mode} vLLM manifests; it has: {', '.join(by_mode)}")
    chosen = by_mode[mode] if mode is not None else recorded[0]
    out = artifacts.manifests.output_dir if artifacts.manifests else None
    here = (Path(out) if out else export_dir) / VLLM_DIR
    argv = [a.replace(EXPORT_DIR_TOKEN, str(export_dir.absolute())).replace(HERE_TOKEN, str(here.absolute()))
            for a in chosen.argv]
    return VllmTarget(export_dir=export_dir, mode=chosen.mode, argv=argv, served_model_name=_served_name(chosen),
                      artifacts=artifacts, modes=list(by_mode))


def _served_name(mode: VllmMode) -> str:
    """The name clients use: the adapter's (``--lora-modules NAME=PATH``) in lora mode, else the model's."""
    argv = mode.argv
    if "--lora-modules" in argv:
        return argv[argv.index("--lora-modules") + 1].split("=", 1)[0]
    return argv[argv.index("--served-model-name") + 1]


def check_vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise DependencyError("--engine vllm needs vLLM on this machine (a CUDA GPU): pip install 'grpoctl[gpu]'; "
                              "on a CPU serve the GGUF with --engine llamacpp")


@dataclass
class VllmServer(LlamaCppServer):
    """One vLLM server process; ``gguf`` holds the export directory it serves from."""

    ENGINE: ClassVar[str] = "vllm"
    argv: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *self.argv, "--host", self.host,
                "--port", str(self.port), *self.extra_args]

    def answers(self) -> bool:
        # /health turns 200 once the engine is up; /v1/models then lists the served name (this server's)
        with _urlopen(self.base_url + HEALTH_PATH, timeout=2) as r:
            if r.status != 200:
                return False
        return super().answers()


def server_for(target: VllmTarget, host: str, port: int) -> VllmServer:
    return VllmServer(gguf=target.export_dir, host=host, port=port, alias=target.served_model_name,
                      use_gguf_template=False, argv=target.argv)


def smoke_chat(server: VllmServer, target: VllmTarget, question: str, max_tokens: int) -> SmokeResult:
    resp = chat_completion(server.base_url, chat_messages(target.system_prompt, question),
                           model=target.served_model_name, max_tokens=max_tokens)
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    # a reasoning parser moves the thinking out of `content` (vLLM's `reasoning_content` / `reasoning`)
    thinking = message.get("reasoning_content") or message.get("reasoning") or ""
    answer = message.get("content") or ""
    if thinking:
        # a template that pre-fills the opening marker leaves an answer cut at max_tokens wholly "reasoning"
        start, end = target.reasoning_markers or ("", "")
        answer = f"{start}{thinking}{end if answer else ''}{answer}"
    return SmokeResult(engine=f"vLLM, {target.mode}", model=target.served_model_name,
                       system_prompt=target.system_prompt, question=question, answer=answer,
                       finish_reason=choice.get("finish_reason"), reasoning_markers=target.reasoning_markers)

