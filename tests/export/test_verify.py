"""Adapter verification: untrained, partly trained, mis-shaped, NaN, truncated and pickle adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grpoctl.errors import DataError, VerificationError
from grpoctl.export.tensors import ModelWeights
from grpoctl.export.verify import open_adapter, verify_adapter
from tests.export.adapters import make_adapter


def _verify(adapter_dir: Path, base: Path, **kw):
    return verify_adapter(open_adapter(adapter_dir), ModelWeights(base), **kw)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an adapter folder, changing its tensors with ``edit(dict) -> dict``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = edit(load_file(src / "adapter_model.safetensors"))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_trained_adapter_passes_with_per_module_stats(qwen3_adapter, tiny_qwen3):
    report = _verify(qwen3_adapter, tiny_qwen3)
    assert report.status == "ok" and not report.warnings
    assert len(report.modules) == 14 and report.zero_b == 0
    assert all(m.delta_norm > 0 and m.max_abs_b > 0 for m in report.modules)
    assert "q_proj" in report.table() and "verify: OK" in report.table()


def test_fresh_adapter_is_rejected_as_never_trained(fresh_adapter, tiny_qwen3):
    with pytest.raises(VerificationError, match="never trained: all 14 LoRA updates are zero"):
        _verify(fresh_adapter, tiny_qwen3)


def test_partly_zero_adapter_warns_per_module_and_fails_under_strict(tiny_qwen3, tmp_path):
    adapter = make_adapter(tiny_qwen3, tmp_path / "partly", zero_b="layers.1.self_attn")
    report = _verify(adapter, tiny_qwen3)
    assert report.status == "warn" and report.zero_b == 4
    assert sorted(report.zero_modules)[0] == "model.layers.1.self_attn.k_proj"
    assert "4 of 14 modules have a zero update" in report.warnings[0]
    data = report.to_dict()
    assert data["summary"]["zero_b"] == 4 and len(data["modules"]) == 14
    with pytest.raises(VerificationError, match="--strict: 4 of 14 modules"):
        _verify(adapter, tiny_qwen3, strict=True)


def test_adapter_for_another_base_names_the_first_mismatched_module(qwen3_adapter, tiny_qwen3, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "wider-mlp"
    shutil.copytree(tiny_qwen3, other)
    state = load_file(other / "model.safetensors")
    for layer in (0, 1):  # a base whose MLP is wider than the one the adapter was trained on
        state[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.zeros(96, 64, dtype=torch.bfloat16)
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match=r"does not fit the base: model\.layers\.0\.mlp\.up_proj has") as err:
        _verify(qwen3_adapter, other)
    assert "(96, 64)" in str(err.value) and "check --base" in str(err.value)


def test_nan_in_lora_b_is_rejected(qwen3_adapter, tiny_qwen3, tmp_path):
    def poison(t):
        key = next(k for k in sorted(t) if "layers.1.mlp.up_proj.lora_B" in k)
        t[key][0, 0] = float("nan")
        return t

    bad = _rewrite(qwen3_adapter, tmp_path / "nan", poison)
    with pytest.raises(VerificationError, match=r"NaN/Inf in model\.layers\.1\.mlp\.up_proj\.lora_B"):
        _verify(bad, tiny_qwen3)


def test_missing_lora_b_is_reported_as_incomplete(qwen3_adapter, tmp_path):
    bad = _rewrite(qwen3_adapter, tmp_path / "half", lambda t: {k: v for k, v in t.items()
                                                                 if "layers.0.self_attn.q_proj.lora_B" not in k})
    with pytest.raises(Exception, match=r"incomplete: .*layers\.0\.self_attn\.q_proj has no lora_B"):
        open_adapter(bad)


def test_truncated_safetensors_gives_a_clear_error(qwen3_adapter, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(qwen3_adapter, bad)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        open_adapter(bad)


def test_truncated_base_shard_gives_a_clear_error(tiny_qwen3, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_qwen3, base)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(DataError, match=r"model\.safetensors is corrupt or truncated"):
        ModelWeights(base)


def test_pickle_adapter_is_refused_unless_allowed(qwen3_adapter, tiny_qwen3, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(qwen3_adapter / "adapter_config.json", pickled)
    torch.save(load_file(qwen3_adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(VerificationError, match="pickle checkpoint.*--allow-pickle"):
        open_adapter(pickled)
    adapter = open_adapter(pickled, allow_pickle=True, scratch=tmp_path / "scratch")
    assert verify_adapter(adapter, ModelWeights(tiny_qwen3)).status == "ok"


def test_target_module_missing_from_base_is_rejected(qwen3_adapter, tiny_qwen3, tmp_path):
    bad = tmp_path / "targets"
    shutil.copytree(qwen3_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = [*cfg["target_modules"], "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerificationError, match="targets c_attn, which the base"):
        _verify(bad, tiny_qwen3)


def test_other_base_name_warns_when_shapes_fit(qwen3_adapter, tiny_qwen3, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(qwen3_adapter, renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-8B"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    report = _verify(renamed, tiny_qwen3)
    assert report.status == "warn" and "Qwen/Qwen3-8B" in report.warnings[0]


def test_embedding_lora_and_lora_bias_verify_with_per_module_stats(variant):
    """PEFT merges both (W + s * (B @ A).T; b + s * lora_B.bias), so they are verified like any LoRA pair."""
    base, adapter, _ = variant("lora_embedding")
    report = _verify(adapter, base)
    assert report.status == "ok" and {m.module for m in report.modules} >= {"model.embed_tokens", "lm_head"}
    assert all(m.delta_norm > 0 for m in report.modules)
    base, adapter, _ = variant("lora_bias")
    assert _verify(adapter, base).status == "ok"


def test_embedding_lora_on_tied_embeddings_is_refused_with_a_clear_message(variant_bases, tmp_path):
    adapter = make_adapter(variant_bases["llama-tied"], tmp_path / "embed", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(VerificationError, match=r"trains model\.embed_tokens with LoRA, but the base ties it to "
                                                r"lm_head .*would differ from the trained one"):
        _verify(adapter, variant_bases["llama-tied"])


def test_untying_a_tied_base_is_a_note_not_a_warning(variant):
    base, adapter, _ = variant("tied_modules_to_save_lm_head")
    report = _verify(adapter, base, strict=True)
    assert report.status == "ok" and report.saved_modules == ["lm_head.weight"]
    assert "unties them" in report.notes[0] and "note: the adapter changes one side" in report.table()
