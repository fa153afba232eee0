"""Safetensors read one tensor at a time, and written one tensor at a time.

``ModelWeights`` is a lazy view of a Hugging Face model folder (single file or sharded with an index):
it knows every tensor's shard, dtype and shape from the headers alone and loads a tensor only when
asked. ``write_safetensors`` writes a file whose header is known up front and whose tensors arrive
one by one, so a merge holds one tensor in memory, never a whole shard.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.errors import DataError, InputNotFoundError, UsageError
from grpoctl.jsonfiles import read_json

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT16 = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}


def torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code][0])


def dtype_code(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, (tname, _) in DTYPES.items():
        if tname == name:
            return code
    raise UsageError(f"tensor dtype {dtype} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shard: str  # file name inside the model folder
    dtype: str  # safetensors code, e.g. BF16
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset of the data in a safetensors shard


    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class RawBytes:
    """A tensor's bytes as a range of a file: written by an in-kernel copy, never loaded."""

    path: Path
    offset: int
    length: int

    def copy_to(self, out) -> None:
        out.flush()
        with open(self.path, "rb") as src:
            remaining, pos = self.length, self.offset
            try:
                while remaining:
                    n = os.copy_file_range(src.fileno(), out.fileno(), remaining, pos)
                    if n == 0:
                        raise OSError(f"{self.path} ended early (truncated?)")
                    remaining, pos = remaining - n, pos + n
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                src.seek(pos)  # a filesystem without copy_file_range: plain buffered copy
                while remaining:
                    block = src.read(min(remaining, 1 << 24))
                    if not block:
                        raise OSError(f"{self.path} ended early (truncated?)") from None
                    out.write(block)
                    remaining -= len(block)
                out.flush()


def corrupt(path: Path, err: Exception) -> DataError:
    return DataError(f"{path} is corrupt or truncated ({err}); re-download or re-save it")


class ModelWeights:
    """The tensors of a model folder, indexed from file headers and loaded on demand."""

    def __init__(self, model_dir: Path, *, allow_pickle: bool = False) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise InputNotFoundError(f"base model folder {self.dir} does not exist")
        self.pickle = False
        shards = self._shard_names(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: dict[str, list[TensorInfo]] = {}
        self._pickled: dict[str, dict[str, Any]] = {}
        for shard in shards:
            infos = self._read_header(shard)
            self.shards[shard] = infos
            for info in infos:
                self.tensors[info.key] = info

    def _shard_names(self, allow_pickle: bool) -> list[str]:
        d = self.dir
        if (d / SAFE_INDEX).is_file():
            try:
                weight_map = json.loads((d / SAFE_INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise DataError(f"{d / SAFE_INDEX} is not a valid safetensors index ({err})") from None
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise InputNotFoundError(f"{d} is missing shard(s) {', '.join(missing)} named in {SAFE_INDEX}")
            return names
        if (d / SAFE_SINGLE).is_file():
            return [SAFE_SINGLE]
        loose = sorted(p.name for p in d.glob("*.safetensors"))
        if loose:
            return loose
        pickled = [PICKLE_SINGLE] if (d / PICKLE_SINGLE).is_file() else []
        if (d / PICKLE_INDEX).is_file():
            pickled = list(dict.fromkeys(json.loads((d / PICKLE_INDEX).read_text())["weight_map"].values()))
        if pickled:
            if not allow_pickle:
                raise UsageError(f"{d} holds only pickle checkpoints ({pickled[0]}); loading them can run "
                                 "arbitrary code. Re-save the model as safetensors, or pass --allow-pickle if you "
                                 "trust the file")
            self.pickle = True
            return pickled
        raise InputNotFoundError(f"{d} holds no model weights (no *.safetensors, no {PICKLE_SINGLE})")

    def _read_header(self, shard: str) -> list[TensorInfo]:
        path = self.dir / shard
        if self.pickle:
            sd = self._load_pickle(shard)
            return [TensorInfo(k, shard, dtype_code(t.dtype), tuple(t.shape)) for k, t in sd.items()]
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:  # validates header, offsets and file length
                keys = list(f.keys())
            with open(path, "rb") as raw:
                (n,) = struct.unpack("<Q", raw.read(8))
                header = json.loads(raw.read(n))
        except (SafetensorError, OSError, ValueError, struct.error) as err:
            raise corrupt(path, err) from None
        return [TensorInfo(k, shard, header[k]["dtype"], tuple(header[k]["shape"]),
                           offset=8 + n + header[k]["data_offsets"][0]) for k in keys]

    def _load_pickle(self, shard: str) -> dict[str, Any]:
        if shard not in self._pickled:
            import torch

            try:
                # mmap keeps the checkpoint on disk; weights_only refuses code objects
                self._pickled[shard] = torch.load(self.dir / shard, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # torch raises many types for bad pickles
                raise corrupt(self.dir / shard, err) from None
        return self._pickled[shard]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def raw(self, key: str) -> RawBytes | None:
        """The stored bytes of ``key`` as a file range, for copying a tensor that is not changed."""
        info = self.tensors[key]
        if self.pickle or info.offset is None:
            return None
        return RawBytes(self.dir / info.shard, info.offset, info.nbytes)

    def get(self, key: str):
        """One tensor, read from disk now. The shard is opened per call so that no mapping of a whole
        shard stays resident while the merge walks through it."""
        info = self.tensors[key]
        if self.pickle:
            return self._load_pickle(info.shard)[key]
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.dir / info.shard, framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise corrupt(self.dir / info.shard, err) from None

    @property
    def largest_shard_bytes(self) -> int:
        return max(sum(i.nbytes for i in infos) for infos in self.shards.values())

    def config(self) -> dict[str, Any]:
        p = self.dir / "config.json"
        if not p.is_file():
            raise InputNotFoundError(f"base model folder {self.dir} has no config.json")
        return read_json(p)


def write_safetensors(path: Path, specs: list[TensorInfo], produce: Callable[[TensorInfo], Any],
                      metadata: dict[str, str] | None = None, on_tensor: Callable[[], None] | None = None) -> int:
    """Write ``specs`` (dtype/shape known in advance) to ``path``, asking ``produce`` for each tensor in turn.

    The layout is the safetensors format itself (8-byte header length, JSON header, packed data); only
    the current tensor is in memory. ``produce`` may return ``RawBytes`` for a tensor copied unchanged.
    Returns the number of data bytes written.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.key] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as writer:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending: Future | None = None
        for s in specs:
            t = produce(s)
            if isinstance(t, RawBytes):
                if t.length != s.nbytes:
                    raise UsageError(f"tensor {s.key} has {t.length} bytes, expected {s.nbytes}")
                if pending is not None:
                    pending.result()
                    pending = None
                t.copy_to(f)
                if on_tensor is not None:
                    on_tensor()
                continue
            want = torch_dtype(s.dtype)
            if t.dtype != want:
                t = t.to(want)
            if tuple(t.shape) != s.shape:
                raise UsageError(f"tensor {s.key} has shape {tuple(t.shape)}, expected {s.shape}")
            t = t.contiguous()
            if pending is not None:
                pending.result()  # at most one tensor waits for the disk while the next is computed
            if t.numel():
                pending = writer.submit(f.write, memoryview(t.view(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor()
        if pending is not None:
            pending.result()
        f.flush()
        os.fsync(f.fileno())
    return offset


def shard_names(n: int) -> Iterator[str]:
    """Hugging Face's shard names: ``model.safetensors`` alone, else ``model-0000k-of-0000n.safetensors``."""
    if n == 1:
        yield SAFE_SINGLE
        return
    for k in range(1, n + 1):
        yield f"model-{k:05d}-of-{n:05d}.safetensors"
