"""GGUF file types as data, and llama.cpp's own quantizer run in-process.

Types the converter writes itself (``source="convert"``) come straight out of one conversion pass;
every other type is made by ``llama_cpp.llama_model_quantize`` from the 16-bit intermediate, so a
request like ``q8_0,q4_k_m,q5_k_m`` converts once and quantizes three times.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from grpoctl.errors import ConversionError, DiskFullError, UsageError
from grpoctl.fsutil import disk_full_cause, no_space_left


@dataclass(frozen=True)
class GgufType:
    name: str  # lower-case CLI spelling: q4_k_m
    ftype: str  # llama.cpp LLAMA_FTYPE_* constant name
    bits: float  # approximate bits per weight, for the disk-space estimate
    source: str = "quantize"  # "convert": the HF converter writes it directly

    @property
    def label(self) -> str:
        """Hub file-name spelling: Q4_K_M, F16, BF16."""
        return self.name.upper()


TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("f32", "LLAMA_FTYPE_ALL_F32", 32.0, "convert"),
    GgufType("f16", "LLAMA_FTYPE_MOSTLY_F16", 16.0, "convert"),
    GgufType("bf16", "LLAMA_FTYPE_MOSTLY_BF16", 16.0, "convert"),
    GgufType("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5, "convert"),
    GgufType("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
    GgufType("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
    GgufType("q5_k_s", "LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.5),
    GgufType("q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", 6.0),
    GgufType("q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", 5.5),
    GgufType("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
    GgufType("q4_k_s", "LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6),
    GgufType("q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", 5.0),
    GgufType("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
    GgufType("iq4_nl", "LLAMA_FTYPE_MOSTLY_IQ4_NL", 4.5),
    GgufType("iq4_xs", "LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.3),
    GgufType("q3_k_l", "LLAMA_FTYPE_MOSTLY_Q3_K_L", 4.3),
    GgufType("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
    GgufType("q3_k_s", "LLAMA_FTYPE_MOSTLY_Q3_K_S", 3.5),
    GgufType("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K", 3.0),
    GgufType("tq1_0", "LLAMA_FTYPE_MOSTLY_TQ1_0", 1.7, "convert"),
    GgufType("tq2_0", "LLAMA_FTYPE_MOSTLY_TQ2_0", 2.1, "convert"),
)}
# common spellings people type, mapped to the canonical name
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m", "fp16": "f16", "float16": "f16",
           "bfloat16": "bf16", "q8": "q8_0"}
SIXTEEN_BIT = ("bf16", "f16")
# The type used where none is named (the plain Modelfile, serve, the Hub card's commands): the usual local
# default first, then the next best size/quality trade-offs.
PREFERRED = ("q4_k_m", "q5_k_m", "q8_0", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32")


def canonical_type(name: str) -> str:
    """``"Q4-K"`` -> ``"q4_k_m"``: the spelling of ``TYPES`` for a name or an alias (other names come back lowered)."""
    name = name.strip().lower().replace("-", "_")
    return ALIASES.get(name, name)


def default_type(available: Iterable[str]) -> str | None:
    """Of the types ``available``, the one used when none is named: the first of ``PREFERRED``, else the first by
    name; None when there is none."""
    have = sorted(canonical_type(t) for t in available)
    return next((t for t in PREFERRED if t in have), have[0] if have else None)


def parse_types(text: str) -> list[str]:
    """``"q8_0, Q4_K_M"`` -> ``["q8_0", "q4_k_m"]`` (order kept, duplicates dropped)."""
    out: list[str] = []
    for raw in (text or "").split(","):
        name = canonical_type(raw)
        if not name:
            continue
        if name not in TYPES:
            raise UsageError(f"unknown GGUF type {raw.strip()!r}; valid types: {', '.join(TYPES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError(f"no GGUF type given; valid types: {', '.join(TYPES)}")
    return out


def estimate_gguf_bytes(bytes16: int, types: list[str], vocab_bytes: int = 0) -> int:
    """Peak bytes a GGUF export of ``types`` writes for a model of ``bytes16`` 16-bit weight bytes: every file at
    its bits per weight (plus the vocabulary each carries) and the 16-bit intermediate the quantizer reads
    while the files are made, unless it is one of them or the one type is written directly (see gguf.convert_all)."""
    params = bytes16 / 2
    need = sum(params * TYPES[t].bits / 8 + vocab_bytes for t in types)
    single_pass = len(types) == 1 and TYPES[types[0]].source == "convert"
    if not single_pass and not any(t in SIXTEEN_BIT for t in types):
        need += bytes16 + vocab_bytes
    return int(need)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's quantizer, in this process; ``say`` gets the one
    summary line of tensors that fell back to another type."""
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
    fallbacks = sum("falling back" in line for line in messages)
    if fallbacks and rc == 0:
        say(f"  {fallbacks} tensors use a fallback type: their row size is not a multiple of {gtype.label}'s block "
            "size (llama.cpp's own rule)")
    if rc != 0:
        tail = " | ".join(line.strip() for line in messages[-3:] if line.strip()) or "no message"
        if no_space_left(dst.parent):
            # llama.cpp reports a failed write as a C++ stream error without errno; the file system tells the rest
            raise DiskFullError(f"disk full while llama.cpp's quantizer wrote {dst.parent} ({tail})") \
                from disk_full_cause(dst)
        raise ConversionError(f"llama.cpp failed to quantize {src.name} to {gtype.label} (code {rc}): {tail}")

