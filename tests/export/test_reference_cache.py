"""The parity reference's results are kept for the same base, adapter and probes, and never served stale.

Adding a quant to an export measures it against the reference the first export computed (PEFT in transformers,
and its bf16 noise floor); another adapter, a base edited in place, another system prompt or tokenizer is
another key, and the reference is computed again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from grpoctl.export import reference_cache
from grpoctl.export.gguf import end_of_turn_ids
from grpoctl.export.parity.reference import ParityReference, prepare_reference
from tests.export.adapters import make_adapter


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "parity-reference"


@pytest.fixture
def base(tiny_qwen3, tmp_path) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(tiny_qwen3, copy)
    return copy


@pytest.fixture
def adapter(base, tmp_path) -> Path:
    return make_adapter(base, tmp_path / "adapter", save_tokenizer=True)


def _reference(base: Path, adapter: Path, system: str = "Be brief.") -> ParityReference:
    return prepare_reference(base, adapter, adapter, system, end_of_turn_ids(adapter), plan=("cpu", False))


def _same(a: ParityReference, b: ParityReference) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a.ref32, b.ref32, strict=True)) and a.noise == b.noise \
        and a.answer == b.answer and a.confidence == b.confidence


def test_a_second_reference_of_the_same_base_adapter_and_probes_is_kept_not_computed(cache, base, adapter):
    first = _reference(base, adapter)
    assert not first.reused and len(list(cache.glob("[0-9a-f]" * 64))) == 1
    again = _reference(base, adapter)
    assert again.reused and _same(first, again)
    assert "kept from an earlier export" in again.description


def test_another_adapter_in_the_same_folder_is_computed_again(cache, base, adapter, tmp_path):
    first = _reference(base, adapter)
    other = make_adapter(base, tmp_path / "other", seed=5)
    shutil.copy2(other / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    changed = _reference(base, adapter)
    assert not changed.reused and not _same(first, changed)


def test_an_adapter_rewritten_in_place_with_its_old_size_and_time_is_computed_again(cache, base, adapter, tmp_path):
    """The adapter is keyed by its content: a cache keyed by name, size or time would serve the old reference."""
    first = _reference(base, adapter)
    weights = adapter / "adapter_model.safetensors"
    st = weights.stat()
    other = make_adapter(base, tmp_path / "other", seed=5)
    data = (other / "adapter_model.safetensors").read_bytes()
    assert len(data) == st.st_size
    weights.write_bytes(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _reference(base, adapter)
    assert not changed.reused and not _same(first, changed)


def test_a_base_weight_edited_in_place_with_its_old_time_is_computed_again(cache, base, adapter):
    """The base's files are hashed once and remembered by size, inode and change time; an edit in place moves
    the change time even where the modification time is put back, so the file is read again."""
    import torch
    from safetensors.torch import load_file, save_file

    first = _reference(base, adapter)
    weights = base / "model.safetensors"
    st = weights.stat()
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key] = tensors[key] + torch.full_like(tensors[key], 0.25)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _reference(base, adapter)
    assert not changed.reused and not _same(first, changed)


def test_another_system_prompt_is_other_probes(cache, base, adapter):
    _reference(base, adapter)
    assert not _reference(base, adapter, system="Answer in French.").reused


def test_the_cache_can_be_turned_off(cache, base, adapter, monkeypatch):
    monkeypatch.setenv(reference_cache.ENV_CACHE, "0")
    _reference(base, adapter)
    assert not _reference(base, adapter).reused and not cache.exists()
