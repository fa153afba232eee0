"""The one per-tensor merge: bit for bit PEFT's merge_and_unload, and refusals by name for what it cannot merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from grpoctl.errors import InputNotFoundError, VerificationError
from grpoctl.export.lora import LoraAdapter
from grpoctl.export.tensors import ModelWeights
from tests.export.adapters import make_adapter


def _adapter(model_dir, out, **cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], **cfg))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft.save_pretrained(out)
    return peft


def _plan(adapter_dir, base_dir):
    weights = ModelWeights(base_dir)
    return LoraAdapter.open(adapter_dir).plan({k: i.shape for k, i in weights.tensors.items()}, weights.config())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cfg", [dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=16, use_rslora=True),
                                 dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})])
def test_merge_equals_peft(tiny_models, tmp_path, arch, cfg):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).state_dict()
    peft = _adapter(tiny_models[arch], tmp_path / "a", **cfg)
    expected = peft.merge_and_unload().state_dict()
    plan = _plan(tmp_path / "a", tiny_models[arch])
    assert len(plan.sources) == 7 * 2
    for key, weight in base.items():
        merged = plan.merged(key, weight)
        assert merged.dtype == weight.dtype
        assert torch.equal(merged, expected[key]), key


def test_missing_adapter_names_the_folder(tmp_path):
    with pytest.raises(InputNotFoundError, match="holds no adapter"):
        LoraAdapter.open(tmp_path)


def test_adapter_for_another_shape_is_refused_before_merging(tiny_models, tmp_path):
    _adapter(tiny_models["qwen3"], tmp_path / "a", r=4, lora_alpha=8)
    shapes = {k: i.shape for k, i in ModelWeights(tiny_models["qwen3"]).tensors.items()}
    shapes["model.layers.0.self_attn.q_proj.weight"] = (3, 3)
    with pytest.raises(VerificationError, match=r"does not fit the base: model\.layers\.0\.self_attn\.q_proj has "
                                                r"lora_A \(4, 64\) and lora_B \(64, 4\), base weight is \(3, 3\)"):
        LoraAdapter.open(tmp_path / "a").plan(shapes)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_a_tied_embedding_is_refused_by_name(variant_bases, tmp_path, target):
    """PEFT's merge adds the update to the shared tensor, so the other side changes too (measured: max logit
    difference 1-10 between PEFT's merged and unmerged model on the tied tiny Llama): no faithful merge exists."""
    adapter = make_adapter(variant_bases["llama-tied"], tmp_path / "a", target_modules=["q_proj", target])
    with pytest.raises(VerificationError, match=rf"trains [a-z_.]*{target} with LoRA, but the base ties it to .*"
                                                "tie_word_embeddings"):
        _plan(adapter, variant_bases["llama-tied"])


def test_trainable_tokens_are_refused_by_name(tiny_models, tmp_path):
    adapter = make_adapter(tiny_models["llama"], tmp_path / "a", target_modules=["q_proj"],
                           trainable_token_indices=[3, 5])
    with pytest.raises(VerificationError, match=r"cannot be merged: trainable tokens \(trainable_token_indices\)"):
        _plan(adapter, tiny_models["llama"])


@pytest.mark.parametrize(("config", "named"), [
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' trains against a modified base"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"use_dora": True, "fan_in_fan_out": True}, r"DoRA on fan_in_fan_out \(GPT-2 style Conv1D\)"),
    ({"use_dora": True, "lora_bias": True}, "DoRA together with lora_bias"),
    ({"use_bdlora": {"target_modules": ["q_proj"]}}, r"BD-LoRA \(use_bdlora\)"),
    ({"alora_invocation_tokens": [3, 4]}, r"activated LoRA \(alora_invocation_tokens\)"),
    ({"layer_replication": [[0, 2], [1, 2]]}, r"layer replication"),
], ids=["pissa", "olora", "dora_fan_in_fan_out", "dora_lora_bias", "bdlora", "alora", "layer_replication"])
def test_adapter_configs_that_do_not_merge_to_w_plus_update_are_refused_by_name(qwen3_adapter, tiny_qwen3, tmp_path,
                                                                                config, named):
    bad = tmp_path / "a"
    shutil.copytree(qwen3_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    with pytest.raises(VerificationError, match=named):
        _plan(bad, tiny_qwen3)


def test_tensor_of_an_unknown_lora_variant_is_refused_by_name(qwen3_adapter, tiny_qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "a"
    shutil.copytree(qwen3_adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_diag"] = torch.ones(8)  # KaSA's diagonal
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(VerificationError, match=r"q_proj\.lora_diag is a tensor of a LoRA variant"):
        _plan(bad, tiny_qwen3)


def test_refusal_comes_before_any_export_work(variant_bases, tmp_path):
    """Through the real export: a refused adapter stops at verification, no output folder, no conversion."""
    from grpoctl.export.pipeline import ExportOptions, export

    adapter = make_adapter(variant_bases["llama-tied"], tmp_path / "a", target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "export"
    with pytest.raises(VerificationError, match="ties it to"):
        export(adapter, ExportOptions(base=str(variant_bases["llama-tied"]), merged="16bit", gguf=["f16"],
                                      output_dir=out, progress=False))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
