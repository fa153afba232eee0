"""``grpoctl doctor``: one line per engine grpoctl relies on, with what to do when it is missing."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from grpoctl.options import option


@dataclass
class DoctorOptions:
    """What ``grpoctl doctor`` takes: what to prepare before the checks (each field is the flag of the same name)."""

    fetch_converter: bool = option(False, help="First fetch llama.cpp's GGUF converter into the cache (from the "
                                   "installed llama-cpp-python's sdist on PyPI), so later exports work offline.")
    build_llama_tools: bool = option(False, help="First build llama.cpp's C++ tools (llama-quantize, llama-imatrix, "
                                     "llama-server, llama-perplexity) into the cache from the same sdist; minutes, "
                                     "once.")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    hint: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _package(name: str, dist: str, required: bool, hint: str) -> Check:
    v = _version(dist)
    if v is None:
        return Check(name, "fail" if required else "warn", "not installed", hint)
    try:
        importlib.import_module(name.replace("-", "_"))
    except Exception as e:  # installed but broken (ABI mismatch, missing CUDA libs...)
        return Check(name, "fail" if required else "warn", f"{v} installed but import fails: {e}".splitlines()[0],
                     hint)
    return Check(name, "ok", v)


def _cuda() -> Check:
    try:
        import torch
    except Exception:
        return Check("cuda", "fail", "torch not importable", "pip install torch (CPU: pip install torch==2.13.0)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("cuda", "ok", f"CUDA {torch.version.cuda}: {names}")
    return Check("cuda", "warn", "no CUDA device: training runs on CPU with --backend trl",
                 "a GPU is needed for --backend unsloth and 4-bit loading")


def _converter() -> Check:
    from grpoctl.export.converter import find_converter

    try:
        conv = find_converter(fetch=False)
    except Exception as e:
        return Check("gguf-converter", "warn", str(e).splitlines()[0], "run `grpoctl doctor --fetch-converter` once "
                     "while online, or set GRPOCTL_LLAMA_CPP_DIR to a llama.cpp checkout")
    return Check("gguf-converter", "ok", str(conv.root))


def _llama_tools() -> Check:
    from grpoctl.llamacpp_tools import ENV_BIN, TOOLS, check_version, find_tools

    hint = (f"run `grpoctl doctor --build-llama-tools` once (compiles {', '.join(TOOLS)}; minutes, needs cmake "
            f"and a C++ compiler), or set {ENV_BIN} to a directory of llama.cpp tools")
    try:
        tools = find_tools(build=False)
    except Exception as e:
        return Check("llama.cpp-tools", "warn", str(e).splitlines()[0].split(";")[0], hint)
    if tools.source == "env":
        missing = [t for t in TOOLS if t not in tools.available()]
        if missing:
            return Check("llama.cpp-tools", "warn", f"{ENV_BIN}={tools.bin_dir} lacks {', '.join(missing)}", hint)
        if note := check_version(tools):
            return Check("llama.cpp-tools", "warn", note, f"unset {ENV_BIN} to use a build of the matching commit")
        return Check("llama.cpp-tools", "ok", f"{ENV_BIN}={tools.bin_dir}")
    commit = (tools.info.get("llama_cpp_commit") or "unknown")[:8]
    on = (f"linked against {tools.info['linked_to']}" if tools.info.get("linked_to")
          else f"built for {tools.info.get('cpu')}")
    return Check("llama.cpp-tools", "ok", f"{tools.bin_dir} (llama.cpp {commit}, {on})")


def _ollama() -> Check:
    from grpoctl.serve.ollama import ping

    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    try:
        version = ping(host, timeout=1.0)
    except Exception:
        return Check("ollama", "warn", f"no Ollama daemon answers at {host}",
                     "start one with `ollama serve` (or set OLLAMA_HOST) to use --engine ollama")
    return Check("ollama", "ok", f"daemon {version} at {host}")


def _leftovers() -> Check:
    """Staging folders of exports killed outright (kill -9, power loss) and their temporary folders: each can
    hold a full merged copy, and only a live owner may keep one."""
    from grpoctl.fsutil import human_bytes, sweep_stale_scratch, sweep_stale_staging

    removed = sweep_stale_staging() + sweep_stale_scratch()
    if not removed:
        return Check("leftovers", "ok", "no staging or temporary folders left by killed grpoctl processes")
    total = sum(size for _, size in removed)
    names = ", ".join(str(p) for p, _ in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
    return Check("leftovers", "ok", f"removed {len(removed)} folder(s) left by killed grpoctl processes "
                 f"({human_bytes(total)}): {names}")


def run_checks() -> list[Check]:
    checks = [
        _package("torch", "torch", True, "pip install torch==2.13.0 (CPU) or a CUDA build from pytorch.org"),
        _package("transformers", "transformers", True, "pip install -e ."),
        _package("trl", "trl", True, "pip install -e ."),
        _package("peft", "peft", True, "pip install -e ."),
        _package("llama_cpp", "llama-cpp-python", True, "pip install 'llama-cpp-python[server]'"),
        _cuda(),
        _package("unsloth", "unsloth", False, "GPU only: pip install 'grpoctl[gpu]'"),
        _package("vllm", "vllm", False, "GPU only: pip install 'grpoctl[gpu]' for fast generation"),
        _converter(),
        _llama_tools(),
        _ollama(),
        _leftovers(),
    ]
    return checks


def doctor(options: DoctorOptions | None = None, say: Callable[[str], None] = print) -> list[Check]:
    """Prepare what ``options`` asks for (saying where it is), then run the checks."""
    options = options or DoctorOptions()
    if options.fetch_converter:
        from grpoctl.export.converter import find_converter

        say(f"GGUF converter ready at {find_converter(fetch=True).root}")
    if options.build_llama_tools:
        from grpoctl.llamacpp_tools import find_tools

        say(f"llama.cpp tools ready in {find_tools(build=True).bin_dir}")
    return run_checks()
