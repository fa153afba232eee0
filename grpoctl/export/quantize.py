"""GGUF file types as data, and llama.cpp's own quantizer run in-process.

Types the converter writes itself (``source="convert"``) come straight out of one conversion pass;
every other type is made by ``llama_cpp.llama_model_quantize`` from the 16-bit intermediate, so a
request like ``q8_0,q4_k_m,q5_k_m`` converts once and quantizes three times. With an importance matrix
the same quantizer runs as llama.cpp's ``llama-quantize --imatrix`` (``grpoctl.export.imatrix``), whose
loader reads the matrix file; without one both write byte-identical files, and the in-process call needs
no build.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from grpoctl.errors import ConversionError, DiskFullError
from grpoctl.fsutil import disk_full_cause, no_space_left
from grpoctl.gguftypes import TYPES
from grpoctl.threads import default_threads


@contextlib.contextmanager
def _stderr_to(file: IO[bytes]) -> Iterator[None]:
    """Point file descriptor 2 (where C libraries write) at ``file`` for the duration."""
    # llama-cpp-python forwards some of llama.cpp's log through Python's sys.stderr, the rest goes to fd 2
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    os.dup2(file.fileno(), 2)
    sys.stderr = open(os.dup(file.fileno()), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def quantize(src: Path, dst: Path, type_name: str, threads: int | None = None,
             say: Callable[[str], None] = print) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's quantizer, in this process (no importance matrix:
    ``grpoctl.export.imatrix.quantize_with_matrix`` takes one); ``say`` gets the one summary line of tensors
    that fell back to another type."""
    import llama_cpp

    gtype = TYPES[type_name]
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = getattr(llama_cpp, gtype.ftype)
    # llama.cpp writes a line per tensor (and per K-quant fallback) straight to fd 2; keep it out of the
    # terminal and report what matters: how many tensors fell back, or why quantization failed
    with tempfile.TemporaryFile(mode="w+b") as log, _stderr_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        log.seek(0)
        messages = log.read().decode("utf-8", errors="replace").splitlines()
    if rc == 0 and (note := fallback_note(messages, type_name)):
        say(note)
    if rc != 0:
        tail = " | ".join(line.strip() for line in messages[-3:] if line.strip()) or "no message"
        if no_space_left(dst.parent):
            # llama.cpp reports a failed write as a C++ stream error without errno; the file system tells the rest
            raise DiskFullError(f"disk full while llama.cpp's quantizer wrote {dst.parent} ({tail})") \
                from disk_full_cause(dst)
        raise ConversionError(f"llama.cpp failed to quantize {src.name} to {gtype.label} (code {rc}): {tail}")


def fallback_note(messages: list[str], type_name: str) -> str | None:
    """The line saying how many tensors llama.cpp's quantizer gave another type (its log says "falling back")."""
    fallbacks = sum("falling back" in line for line in messages)
    if not fallbacks:
        return None
    return (f"  {fallbacks} tensors use a fallback type: their row size is not a multiple of "
            f"{TYPES[type_name].label}'s block size (llama.cpp's own rule)")
