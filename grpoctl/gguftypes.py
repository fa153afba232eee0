"""GGUF file types as data: the table of types grpoctl writes (llama.cpp's names, bits per weight, which pass
makes each), their spellings, the default one, and the disk space a set of them needs.

Read by every stage (export writes the files, manifests, serve and push pick one), so it imports no stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from grpoctl.errors import UsageError


@dataclass(frozen=True)
class GgufType:
    name: str  # lower-case CLI spelling: q4_k_m
    ftype: str  # llama.cpp LLAMA_FTYPE_* constant name
    bits: float  # approximate bits per weight, for the disk-space estimate
    source: str = "quantize"  # "convert": the HF converter writes it directly
    needs_imatrix: bool = False  # too lossy without an importance matrix: offered only with one

    @property
    def reads_imatrix(self) -> bool:
        """Whether an importance matrix changes this type's file (q8_0 and the 16-bit types ignore one)."""
        return self.source == "quantize"

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
    GgufType("iq4_nl", "LLAMA_FTYPE_MOSTLY_IQ4_NL", 4.5, needs_imatrix=True),
    GgufType("iq4_xs", "LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.3, needs_imatrix=True),
    GgufType("q3_k_l", "LLAMA_FTYPE_MOSTLY_Q3_K_L", 4.3),
    GgufType("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
    GgufType("q3_k_s", "LLAMA_FTYPE_MOSTLY_Q3_K_S", 3.5),
    GgufType("iq3_m", "LLAMA_FTYPE_MOSTLY_IQ3_M", 3.7, needs_imatrix=True),
    GgufType("iq3_s", "LLAMA_FTYPE_MOSTLY_IQ3_S", 3.5, needs_imatrix=True),
    GgufType("iq3_xs", "LLAMA_FTYPE_MOSTLY_IQ3_XS", 3.3, needs_imatrix=True),
    GgufType("iq3_xxs", "LLAMA_FTYPE_MOSTLY_IQ3_XXS", 3.1, needs_imatrix=True),
    GgufType("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K", 3.0, needs_imatrix=True),
    GgufType("q2_k_s", "LLAMA_FTYPE_MOSTLY_Q2_K_S", 2.8, needs_imatrix=True),
    GgufType("iq2_m", "LLAMA_FTYPE_MOSTLY_IQ2_M", 2.7, needs_imatrix=True),
    GgufType("iq2_s", "LLAMA_FTYPE_MOSTLY_IQ2_S", 2.5, needs_imatrix=True),
    GgufType("iq2_xs", "LLAMA_FTYPE_MOSTLY_IQ2_XS", 2.3, needs_imatrix=True),
    GgufType("iq2_xxs", "LLAMA_FTYPE_MOSTLY_IQ2_XXS", 2.1, needs_imatrix=True),
    GgufType("iq1_m", "LLAMA_FTYPE_MOSTLY_IQ1_M", 1.8, needs_imatrix=True),
    GgufType("iq1_s", "LLAMA_FTYPE_MOSTLY_IQ1_S", 1.6, needs_imatrix=True),
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
