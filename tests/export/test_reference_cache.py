"""The parity reference's results are kept for the same base, adapter and probes, and never served stale.

Adding a quant to an export measures it against the reference the first export computed (PEFT in transformers,
and its bf16 noise floor); another adapter, a base edited in place, another system prompt or tokenizer is
another key, and the reference is computed again. Task parity's reference answers are kept with it: a re-export
of an unchanged run answers nothing again, an edited adapter does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from grpoctl.export import reference_cache
from grpoctl.export.gguf import end_of_turn_ids
from grpoctl.export.parity import reference as reference_module
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


def _reference(base: Path, adapter: Path, system: str = "Be brief.", work=None) -> ParityReference:
    return prepare_reference(base, adapter, adapter, system, end_of_turn_ids(adapter), plan=("cpu", False),
                             work=work)


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


def test_task_answers_are_kept_with_the_reference_and_an_edited_adapter_answers_again(cache, base, adapter, tmp_path,
                                                                                      monkeypatch):
    """A re-export of the same run loads no model: the reference's greedy answers to the held-out prompts come from
    the cache and are scored again by the run's rewards. Other prompts answer again on the kept reference; an
    adapter edited in place is another key, so the reference and its answers are computed again."""
    from grpoctl.export import taskparity
    from grpoctl.export.taskparity import TaskParity, TaskRequest

    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    answered, loaded = [], []
    real_answers, real_load = taskparity.reference_answers, reference_module.load_reference
    monkeypatch.setattr(taskparity, "reference_answers", lambda *a: answered.append(1) or real_answers(*a))
    monkeypatch.setattr(reference_module, "load_reference", lambda *a, **k: loaded.append(1) or real_load(*a, **k))

    def tasks(prompts: int = 2) -> TaskParity:
        t = TaskParity.prepare(TaskRequest(eval_data=held, prompts=prompts), None, adapter, streamed=False,
                               device="cpu")
        t.task.max_new_tokens = 6
        return t

    first = tasks()
    _reference(base, adapter, work=first.reference_work())
    assert (len(answered), len(loaded)) == (1, 1) and not first.ref_kept and len(first.ref_answers) == 2
    again = tasks()
    ref = _reference(base, adapter, work=again.reference_work())
    assert ref.reused and again.ref_kept and (len(answered), len(loaded)) == (1, 1)  # nothing loaded or answered
    assert again.ref_answers == first.ref_answers and again.ref_scores == first.ref_scores
    assert again.section().reference.kept

    more = tasks(prompts=3)  # other prompts: the kept reference, the model loaded for the answers alone
    ref = _reference(base, adapter, work=more.reference_work())
    assert ref.reused and not more.ref_kept and (len(answered), len(loaded)) == (2, 2)
    assert more.ref_answers[:2] == first.ref_answers

    other = make_adapter(base, tmp_path / "other", seed=5, std=0.5)
    shutil.copy2(other / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    edited = tasks()
    ref = _reference(base, adapter, work=edited.reference_work())
    assert not ref.reused and not edited.ref_kept and (len(answered), len(loaded)) == (3, 3)
    assert edited.ref_answers != first.ref_answers  # the edited adapter's own answers, not the kept ones
