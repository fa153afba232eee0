"""The parity reference within memory: streamed from the safetensors files one layer at a time, it computes
exactly what the reference held in memory computes, for every adapter shape; and it streams when the float32
model does not fit."""

from __future__ import annotations

import pytest

from grpoctl.errors import DataError, UsageError
from grpoctl.export.parity import reference as reference_module
from grpoctl.export.parity.probes import DEFAULT_SYSTEM_PROMPT, build_probes
from grpoctl.export.parity.reference import (
    ENV_REFERENCE,
    _float32_bytes,
    load_reference,
    prepare_reference,
    reference_logprobs,
    streams,
)
from grpoctl.export.parity.report import report
from tests.export.adapters import VARIANTS


def _logprobs(model_dir, adapter, stream: bool):
    from transformers import AutoTokenizer

    probes = build_probes(AutoTokenizer.from_pretrained(model_dir), DEFAULT_SYSTEM_PROMPT)
    return reference_logprobs(load_reference(model_dir, adapter, "cpu", stream), probes, "cpu")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_streamed_reference_equals_the_one_held_in_memory(variant, name):
    """Every adapter shape the export supports (DoRA reads its base weight outside the layer's forward, an
    embedding LoRA makes PEFT save the base embedding whole, tied heads read the input embedding)."""
    base, adapter, _ = variant(name)
    held, streamed = _logprobs(base, adapter, False), _logprobs(base, adapter, True)
    assert len(held) == len(streamed) == 9
    assert max(float((a - b).abs().max()) for a, b in zip(held, streamed, strict=True)) <= 1e-6


def test_streamed_reference_holds_one_layer_at_a_time(tiny_models, qwen3_adapter):
    """No base weight stays in memory between forwards, and while a decoder layer runs no other layer holds
    its weights: memory is bounded by one layer (and the embedding and the head), not the model."""
    import torch

    model = load_reference(tiny_models["qwen3"], qwen3_adapter, "cpu", stream=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    layers = [m for m in model.modules() if type(m).__name__ == "Qwen3DecoderLayer"]
    held_while_running = []

    def count(module, args):
        held_while_running.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))

    for layer in layers:  # inside each layer, while it runs
        layer.mlp.register_forward_pre_hook(count)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert held_while_running == [1] * len(layers)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_reference_streams_when_the_float32_model_does_not_fit(tiny_models, monkeypatch):
    model = tiny_models["qwen3"]
    need = _float32_bytes(model, None)
    monkeypatch.delenv(ENV_REFERENCE, raising=False)
    monkeypatch.setattr(reference_module, "_available_bytes", lambda device: need + 4 * 2**30)
    assert not streams(model, None, "cpu")
    monkeypatch.setattr(reference_module, "_available_bytes", lambda device: need)
    assert streams(model, None, "cpu")
    monkeypatch.setenv(ENV_REFERENCE, "memory")
    assert not streams(model, None, "cpu")
    monkeypatch.setenv(ENV_REFERENCE, "sometimes")
    with pytest.raises(UsageError, match="GRPOCTL_PARITY_REFERENCE must be memory, stream or auto"):
        streams(model, None, "cpu")


def test_streamed_reference_refuses_a_config_that_does_not_match_the_weights(tiny_models, tmp_path):
    """As the one held in memory does: a reference with made-up weights would make every comparison void."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="config does not match its weights") as err:
        load_reference(model, None, "cpu", stream=True)
    assert err.value.exit_code == 4


def test_streamed_reference_of_a_model_folder_without_weights_is_bad_data(tiny_models, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], model)
    (model / "model.safetensors").unlink()
    with pytest.raises(DataError, match="holds no safetensors weights") as err:
        load_reference(model, None, "cpu", stream=True)
    assert err.value.exit_code == 4


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_that_peft_cannot_put_on_the_base_is_bad_data(tiny_models, qwen3_adapter, tmp_path, stream):
    """An adapter_config.json naming modules the base does not have: PEFT refuses it."""
    import json
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["no_such_proj"]}))
    with pytest.raises(DataError, match="PEFT cannot load the adapter") as err:
        load_reference(tiny_models["qwen3"], adapter, "cpu", stream)
    assert err.value.exit_code == 4


def test_adapter_file_missing_weights_is_bad_data(tiny_models, qwen3_adapter, tmp_path):
    """PEFT would run part of the adapter only; the reference refuses rather than compare against that."""
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, adapter / "adapter_model.safetensors")
    with pytest.raises(DataError, match="adapter weights missing") as err:
        load_reference(tiny_models["qwen3"], adapter, "cpu")
    assert err.value.exit_code == 4


def _plain_peft_logprobs(model_dir, adapter):
    """The textbook reference: the whole base in float32, ``PeftModel.from_pretrained`` on it, one probe at a
    time (no batch, no padding), nothing of grpoctl's loading or streaming."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probes = build_probes(AutoTokenizer.from_pretrained(model_dir), DEFAULT_SYSTEM_PROMPT)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).to(torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([p.ids])).logits[0].float(), dim=-1) for p in probes]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_streamed_reference_equals_plain_peft_on_the_whole_float32_model(variant, name):
    """The memory-lean reference (streamed, batched) computes what PEFT's own loading of the adapter onto the
    whole float32 base computes, to float rounding, for every adapter shape."""
    base, adapter, _ = variant(name)
    plain, streamed = _plain_peft_logprobs(base, adapter), _logprobs(base, adapter, True)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, streamed, strict=True)) <= 1e-4


def test_plain_peft_comparison_can_tell_adapters_apart(variant, wrong_scale_adapter):
    """The tolerance above is far below what a wrong adapter changes (here rsLoRA's scale on a plain LoRA)."""
    base, adapter, _ = variant("lora")
    plain, wrong = _plain_peft_logprobs(base, adapter), _logprobs(base, wrong_scale_adapter, True)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, wrong, strict=True)) > 1e-2


@pytest.fixture
def wrong_scale_adapter(variant, tmp_path):
    import json
    import shutil

    _, adapter, _ = variant("lora")
    out = tmp_path / "scale"
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    return out


def test_a_100kb_system_prompt_keeps_the_probes_and_llama_cpps_context_small(tiny_qwen3):
    """The probes carry the prompt's start only (the report says so), so parity does not run llama.cpp at a
    100k-token context."""
    from grpoctl.export import gguf as gg

    huge = "Follow every rule below.\n" + "Rule: show your work, then write #### N.\n" * 2500  # ~100 KB
    ref = prepare_reference(tiny_qwen3, None, tiny_qwen3, huge, gg.end_of_turn_ids(tiny_qwen3))
    assert huge.startswith(ref.system_prompt) and len(ref.system_prompt) < 1000
    assert len(ref.prompt_ids) < 1024  # what sizes llama.cpp's context in measure()
    probes = report(ref, {}).probes
    assert probes["system_prompt_cut"] == f"the first {len(ref.system_prompt)} of {len(huge)} characters"
