"""Streaming 16-bit merge: equal to PEFT's merge_and_unload, sharded like the base, loadable, template kept."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from grpoctl.export.lora import LoraAdapter, MergePlan
from grpoctl.export.merge import merge_16bit, read_chat_template
from tests.export.adapters import VARIANTS, make_adapter, peft_merged_state


def _load_merged(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_equal_to_peft(ours: dict, ref: dict) -> None:
    """Same tensors as PEFT, each within bf16 rounding (one ulp relative to the tensor's scale)."""

    for key, t in ours.items():
        r = ref[key]
        assert t.dtype == r.dtype and t.shape == r.shape, key
        err = (t.float() - r.float()).abs().max().item()
        scale = r.float().abs().max().item()
        assert err <= scale * 2**-8, f"{key}: max abs error {err} vs scale {scale}"
    assert set(ours) <= set(ref)
    assert not [k for k in ref if k not in ours and "lm_head" not in k]  # only a tied head may be absent


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_merge_equals_peft_merge_and_unload(tiny_models, tmp_path, arch):
    base = tiny_models[arch]
    adapter = make_adapter(base, tmp_path / "adapter", r=8, alpha=16)
    result = merge_16bit(base, LoraAdapter.open(adapter), tmp_path / "merged", progress=False)
    assert result.merged == 14 and result.dtype == "BF16"
    ours = _load_merged(tmp_path / "merged")
    ref = peft_merged_state(base, adapter)
    assert_equal_to_peft(ours, ref)
    base_state = _load_merged(base)
    changed = [k for k in ours if not (ours[k] == base_state[k]).all()]
    assert len(changed) == 14  # exactly the adapted projections moved


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_16bit_equals_peft_merged_folder_for_every_variant(variant, tmp_path, name):
    """--merged 16bit writes exactly what PEFT's merge_and_unload + save_pretrained writes: the same tensors bit
    for bit (an lm_head untied from the embedding included, a tied one left out) and the same tie setting."""
    import torch

    base, adapter, peft_dir = variant(name)
    result = merge_16bit(base, LoraAdapter.open(adapter), tmp_path / "merged", progress=False)
    ours, ref = _load_merged(tmp_path / "merged"), _load_merged(peft_dir)
    assert sorted(ours) == sorted(ref)
    differ = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not differ, f"{len(differ)} tensors differ from PEFT's, first {differ[0]}"
    tie = json.loads((peft_dir / "config.json").read_text()).get("tie_word_embeddings")
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("tie_word_embeddings") == tie
    # and the adapter really moved the model (the comparison is not vacuous)
    base_state = _load_merged(base)
    assert result.merged >= 1 and any(k not in base_state or not torch.equal(ours[k], base_state[k]) for k in ours)


def test_merge_equals_peft_on_embedded_smollm2(smollm2_dir, tmp_path):
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", r=16, alpha=32,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    result = merge_16bit(smollm2_dir, LoraAdapter.open(adapter), tmp_path / "merged", progress=False)
    assert result.merged == 3 * 30 and result.chat_template
    assert_equal_to_peft(_load_merged(tmp_path / "merged"), peft_merged_state(smollm2_dir, adapter))


def test_sharded_base_gives_sharded_output_with_index_that_transformers_loads(tiny_qwen3, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16).save_pretrained(
        base, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_qwen3 / f).is_file():
            shutil.copy2(tiny_qwen3 / f, base / f)
    n_base = len(list(base.glob("model-*.safetensors")))
    assert n_base >= 3
    adapter = make_adapter(base, tmp_path / "adapter")
    merge_16bit(base, LoraAdapter.open(adapter), tmp_path / "merged", progress=False)

    shards = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{n_base:05d}.safetensors" for k in range(1, n_base + 1)]
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in _load_merged(tmp_path / "merged").values())

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                    adapter).merge_and_unload()
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")("What is 12 plus 30?", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_chat_template_survives_the_merge(qwen3_run, tiny_qwen3, tmp_path):
    from transformers import AutoTokenizer

    merge_16bit(tiny_qwen3, LoraAdapter.open(qwen3_run / "adapter"), tmp_path / "merged",
                tokenizer_dir=qwen3_run / "adapter", progress=False)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    want = AutoTokenizer.from_pretrained(tiny_qwen3).apply_chat_template(chat, tokenize=False,
                                                                         add_generation_prompt=True)
    got = AutoTokenizer.from_pretrained(tmp_path / "merged").apply_chat_template(chat, tokenize=False,
                                                                                 add_generation_prompt=True)
    assert got == want and got.endswith("<|im_start|>assistant\n<think>\n")


def test_template_is_taken_from_base_when_run_tokenizer_lacks_it(qwen3_run, tiny_qwen3, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(qwen3_run / "adapter", tok_dir)
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert read_chat_template(tok_dir) is None
    result = merge_16bit(tiny_qwen3, LoraAdapter.open(tok_dir), tmp_path / "merged", tokenizer_dir=tok_dir,
                         progress=False)
    assert result.chat_template and read_chat_template(tmp_path / "merged") == read_chat_template(tiny_qwen3)


def test_fp16_output_dtype_is_recorded_in_config(qwen3_adapter, tiny_qwen3, tmp_path):
    import torch

    result = merge_16bit(tiny_qwen3, LoraAdapter.open(qwen3_adapter), tmp_path / "merged", dtype="fp16",
                         progress=False)
    assert result.dtype == "F16"
    assert all(t.dtype == torch.float16 for t in _load_merged(tmp_path / "merged").values())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"


def test_disk_full_during_merge_is_simulated_and_leaves_nothing(qwen3_run, monkeypatch, tmp_path):
    """Disk full is simulated (the write raises ENOSPC mid-file): no real small filesystem is mounted here."""
    from grpoctl.errors import DiskFullError
    from grpoctl.export import tensors
    from grpoctl.export.pipeline import ExportOptions, export

    calls = {"n": 0}
    real = tensors.write_safetensors

    def failing(path, specs, produce, *a, **kw):
        def produce_then_fail(spec):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return produce(spec)

        return real(path, specs, produce_then_fail, *a, **kw)

    monkeypatch.setattr("grpoctl.export.merge.write_safetensors", failing)
    out = tmp_path / "export"
    with pytest.raises(DiskFullError, match="disk full"):
        export(qwen3_run, ExportOptions(output_dir=out, progress=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder either


def test_pickle_base_is_refused_unless_allowed_then_merges_the_same(qwen3_adapter, tiny_qwen3, tmp_path):
    import torch
    from safetensors.torch import load_file

    from grpoctl.errors import UsageError
    from grpoctl.export.tensors import ModelWeights

    base = tmp_path / "pickled-base"
    base.mkdir()
    for f in tiny_qwen3.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, base / f.name)
    torch.save(load_file(tiny_qwen3 / "model.safetensors"), base / "pytorch_model.bin")
    with pytest.raises(UsageError, match="only pickle checkpoints.*--allow-pickle"):
        ModelWeights(base)
    adapter = LoraAdapter.open(qwen3_adapter)
    merge_16bit(base, adapter, tmp_path / "from-pickle", allow_pickle=True, progress=False)
    merge_16bit(tiny_qwen3, adapter, tmp_path / "from-safetensors", progress=False)
    a, b = _load_merged(tmp_path / "from-pickle"), _load_merged(tmp_path / "from-safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_export_leaves_no_folder(qwen3_run, monkeypatch, tmp_path):
    """Ctrl-C in the middle of the merge: the staged folder is removed, no export appears."""
    from grpoctl.export.pipeline import ExportOptions, export

    real = MergePlan.merged
    seen = {"n": 0}

    def interrupt_on_third(self, key, weight):
        seen["n"] += 1
        if seen["n"] == 3:
            raise KeyboardInterrupt
        return real(self, key, weight)

    monkeypatch.setattr(MergePlan, "merged", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        export(qwen3_run, ExportOptions(output_dir=tmp_path / "export", progress=False))
    assert list(tmp_path.iterdir()) == []
