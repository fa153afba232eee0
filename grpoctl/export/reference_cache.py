"""The parity reference's results, kept between exports of the same base, adapter and probes.

The reference (base + adapter applied by PEFT in transformers, float32, and the same in bf16 for the noise
floor) is the slow half of parity, and it does not depend on the GGUF types asked for: adding q8_0 to an
export measures the new file against the reference the first export computed. What it computed is kept under
the cache (``$GRPOCTL_CACHE/parity-reference/<key>/``) and reused when the key matches; the key is the sha256
of everything the results depend on:

- the base: the content of every file in the model folder that transformers reads for it (config.json and the
  weights; each file's sha256 is remembered by its path, size, inode and change time, and a file whose change
  time moved is read again: an edit in place cannot keep it);
- the adapter: the content of ``adapter_model.safetensors`` and ``adapter_config.json``;
- the probes: their token ids, the greedy prompt's ids, the end-of-turn ids, the system prompt, the tokenizer
  files (the greedy answer is decoded with them), the greedy length, where the reference ran (device, whether
  streamed) and the versions of torch, transformers and peft.

Work done on the loaded reference model for another check (task parity's greedy answers to the held-out
prompts: ``ModelWork``) is kept in the same entry, under the sha256 of what it depends on beyond the entry's key
(the prompts, the answer length): a re-export of an unchanged run reuses the answers instead of loading the model
again, and an edited adapter, being another entry, answers again.

A change to any of them is another key, so a stale reference is never served. ``grpoctl export
--no-parity-cache`` (or ``GRPOCTL_PARITY_CACHE=0``) turns the cache off. The newest ``KEEP`` entries are kept
(each holds the reference's log-probabilities over the whole vocabulary at every probe position: tens to
hundreds of MiB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.fsutil import cache_dir, sha256_file, staged_dir, staged_file
from grpoctl.models import TOKENIZER_FILES

ENV_CACHE = "GRPOCTL_PARITY_CACHE"
FORMAT = 1  # of what an entry holds; a new format is another key
KEEP = 3
_WEIGHTS = "ref32.safetensors"
_META = "reference.json"


@dataclass
class ReferenceResults:
    """What the reference computed: log-probabilities at every probe position (float32), the noise floor (bf16
    vs float32), the mean top-1 probability, the greedy answer and a description of where it ran."""

    ref32: list[Any]
    noise: dict[str, float]
    confidence: float
    answer: str
    description: str


@dataclass
class ModelWork:
    """Work on the float32 reference model while it is loaded, whose result (JSON) is kept with the reference.

    ``key``: what the result depends on beyond the reference's own key; ``compute(model, tokenizer, eot_ids,
    device)`` returns the result; ``use(result, tokenizer, kept)`` receives it, computed now or kept."""

    name: str
    key: dict[str, Any]
    compute: Callable[[Any, Any, list[int], str], Any]
    use: Callable[[Any, Any, bool], None]


def _work_file(key: str, work: ModelWork) -> Path:
    digest = hashlib.sha256(json.dumps({"name": work.name, **work.key}, sort_keys=True).encode()).hexdigest()
    return root() / key / f"{work.name}-{digest}.json"


def load_work(key: str | None, work: ModelWork) -> tuple[Any] | None:
    """``(result,)`` kept for ``work`` in the entry ``key``, or None."""
    if key is None:
        return None
    try:
        return (json.loads(_work_file(key, work).read_text())["result"],)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_work(key: str | None, work: ModelWork, result: Any) -> None:
    """Keep ``result`` in the entry ``key`` (which ``store`` wrote first; written whole or not at all)."""
    if key is None or not (root() / key).is_dir():
        return
    try:
        with staged_file(_work_file(key, work)) as tmp:
            tmp.write_text(json.dumps({"key": work.key, "result": result}))
    except OSError:
        return


_switch: list[bool] = []  # set by switched(): the export's --parity-cache/--no-parity-cache


def enabled() -> bool:
    """Whether the reference is kept and reused: the export's option when given, else ``$GRPOCTL_PARITY_CACHE``."""
    if _switch:
        return _switch[-1]
    return os.environ.get(ENV_CACHE, "1") not in ("0", "false", "no", "off")


@contextlib.contextmanager
def switched(on: bool | None) -> Iterator[None]:
    """The cache turned on or off while the block runs (None: as the environment says)."""
    if on is None:
        yield
        return
    _switch.append(on)
    try:
        yield
    finally:
        _switch.pop()


def root() -> Path:
    return cache_dir() / "parity-reference"


def _file_digests(files: list[Path]) -> list[tuple[str, str]]:
    """(name, sha256) of each file, remembered by path, size, inode and change time (kept in the cache)."""
    memo_file = root() / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for f in sorted(files):
        real = f.resolve()
        st = real.stat()
        stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
        seen = memo.get(str(real))
        if not isinstance(seen, dict) or seen.get("stamp") != stamp:
            seen = {"stamp": stamp, "sha256": sha256_file(real, progress=True)}
            memo[str(real)] = seen
            changed = True
        out.append((f.name, seen["sha256"]))
    if changed:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            with staged_file(memo_file) as tmp:
                tmp.write_text(json.dumps(memo))
        except OSError:  # a cache that cannot be written costs only the next hash
            pass
    return out


def base_files(model_dir: Path) -> list[Path]:
    """What transformers reads of a model folder for the reference: config.json and the weight files."""
    model_dir = Path(model_dir)
    return [p for p in model_dir.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))]


def reference_key(model_dir: Path, adapter_dir: Path | None, tokenizer_dir: Path, probes: list[list[int]],
                  prompt_ids: list[int], eot_ids: list[int], system_prompt: str, where: dict[str, Any]) -> str | None:
    """The sha256 of everything the reference's results depend on (see the module's docstring); None when the
    cache is off (nothing is hashed then)."""
    from importlib import metadata

    if not enabled():
        return None

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    adapter = [] if adapter_dir is None else [
        (name, sha256_file(Path(adapter_dir) / name)) for name in ("adapter_model.safetensors", "adapter_config.json")
        if (Path(adapter_dir) / name).is_file()]
    tokenizer = [(name, sha256_file(Path(tokenizer_dir) / name)) for name in TOKENIZER_FILES
                 if (Path(tokenizer_dir) / name).is_file()]
    parts = {
        "format": FORMAT, "base": _file_digests(base_files(model_dir)), "adapter": adapter, "tokenizer": tokenizer,
        "probes": probes, "prompt_ids": prompt_ids, "eot_ids": eot_ids, "system_prompt": system_prompt,
        "where": where, "versions": {n: version(n) for n in ("torch", "transformers", "peft")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load(key: str | None) -> ReferenceResults | None:
    """The results kept under ``key``, or None (none kept, unreadable, or the cache is off)."""
    if key is None:
        return None
    entry = root() / key
    try:
        meta = json.loads((entry / _META).read_text())
        from safetensors.torch import load_file

        tensors = load_file(str(entry / _WEIGHTS))
        ref32 = [tensors[f"probe.{i}"] for i in range(int(meta["probes"]))]
        os.utime(entry)  # most recently used: kept longest
        return ReferenceResults(ref32=ref32, noise=meta["noise"], confidence=float(meta["confidence"]),
                                answer=meta["answer"], description=meta["description"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except Exception as err:  # safetensors' own error for a damaged file: recompute, as for a missing one
        from safetensors import SafetensorError

        if isinstance(err, SafetensorError):
            return None
        raise


def store(key: str | None, results: ReferenceResults) -> None:
    """Keep ``results`` under ``key`` (written whole or not at all) and drop all but the newest ``KEEP``."""
    if key is None:
        return
    from safetensors.torch import save_file

    entry = root() / key
    try:
        with staged_dir(entry, force=True) as tmp:
            save_file({f"probe.{i}": t.contiguous() for i, t in enumerate(results.ref32)}, str(tmp / _WEIGHTS))
            (tmp / _META).write_text(json.dumps({"probes": len(results.ref32), "noise": results.noise,
                                                 "confidence": results.confidence, "answer": results.answer,
                                                 "description": results.description}))
    except OSError:  # a full or read-only cache costs only the next export's time
        return
    entries = sorted((p for p in root().iterdir() if p.is_dir() and len(p.name) == 64),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
