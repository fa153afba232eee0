"""What serving needs to know about a GGUF file, read from its header without loading the model.

The chat template, the end-of-turn tokens and the trained context length live in the GGUF's
key/value metadata; llama.cpp and Ollama both take them from there, so serve reads the same keys.
A file the reader cannot parse (truncated copy, wrong file) is reported here, before any server
is started.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, Keys

from grpoctl.errors import InputNotFoundError, ServeError

# Keys whose token ids end an assistant turn.
_STOP_TOKEN_KEYS = (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID)


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    chat_template: str | None
    stop_tokens: list[str] = field(default_factory=list)
    context_length: int | None = None
    tensor_count: int = 0


# Fixed-size GGUF value types: struct format per gguf-py's GGUFValueType number.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays kept in full; every other array is skipped (vocabularies and merges are large).
_KEEP_ARRAYS = {Keys.Tokenizer.LIST}
# Arrays within arrays: llama.cpp's own reader (ggml gguf.cpp) accepts none; a few levels are read here, a deeper
# nesting is a corrupt or hostile file, not recursion without bound.
MAX_ARRAY_DEPTH = 8


class _Header:
    """A forward-only reader over the GGUF header: key/values, then the tensor table.

    gguf-py's GGUFReader also builds numpy views of every vocabulary entry, which takes seconds on a
    150k-token vocabulary; serving needs a handful of keys, so the header is walked here directly.
    """

    def __init__(self, buf, endian: str) -> None:
        self.buf, self.e, self.pos = buf, endian, 0

    def take(self, fmt: str):
        value = struct.unpack_from(self.e + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool, depth: int = 0):
        if vtype in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"its metadata nests arrays more than {MAX_ARRAY_DEPTH} levels deep")
            etype, count = self.take("I"), self.take("Q")
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise ValueError("an array runs past the end of the file")
            if keep:
                return [self.value(etype, True, depth + 1) for _ in range(count)]
            if etype in _SCALAR_FORMATS:
                self.pos += count * struct.calcsize(_SCALAR_FORMATS[etype])
            else:
                for _ in range(count):
                    self.value(etype, False, depth + 1)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def _parse(buf) -> tuple[dict, int, int]:
    """(metadata, tensor count, end of the last tensor's data) from a GGUF file's bytes."""
    version = struct.unpack_from("<I", buf, 4)[0]
    h = _Header(buf, "<" if version < 0x10000 else ">")
    h.pos = 8
    n_tensors, n_kv = h.take("Q"), h.take("Q")
    meta: dict = {}
    for _ in range(n_kv):
        key = h.string()
        meta[key] = h.value(h.take("I"), key in _KEEP_ARRAYS)
    end = 0
    infos = []
    for _ in range(n_tensors):
        h.string()
        dims = [h.take("Q") for _ in range(h.take("I"))]
        ttype, offset = h.take("I"), h.take("Q")
        block, type_size = GGML_QUANT_SIZES.get(ttype, (1, 0))
        infos.append((offset, math.prod(dims) // block * type_size))
    align = int(meta.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-h.pos // align) * align
    end = max((data_start + off + nbytes for off, nbytes in infos), default=data_start)
    return meta, n_tensors, end


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse ``path``'s header and tensor table; raise a one-line error when it is not a usable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"GGUF file {path} does not exist; export one with `grpoctl export RUN --gguf q4_k_m`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ServeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, n_tensors, end = _parse(buf)
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            raise ServeError(f"{path} is truncated or corrupt: its header cannot be read ({e}); "
                             "re-run `grpoctl export`") from None
    if end > size:
        raise ServeError(f"{path} is truncated: {size} bytes, but its tensors need {end}; re-run `grpoctl export`")
    arch = str(meta.get(Keys.General.ARCHITECTURE) or "unknown")
    tokens = meta.get(Keys.Tokenizer.LIST) or []
    stops: list[str] = []
    for key in _STOP_TOKEN_KEYS:
        tid = meta.get(key)
        if isinstance(tid, int) and 0 <= tid < len(tokens) and tokens[tid] and tokens[tid] not in stops:
            stops.append(tokens[tid])
    ctx = meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    return GGUFInfo(path=path, architecture=arch, name=meta.get(Keys.General.NAME),
                    chat_template=meta.get(Keys.Tokenizer.CHAT_TEMPLATE), stop_tokens=stops,
                    context_length=int(ctx) if ctx is not None else None, tensor_count=n_tensors)
