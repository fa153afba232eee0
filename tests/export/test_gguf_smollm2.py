"""GGUF export of the real SmolLM2-135M-Instruct (real tokenizer, BOS, chat template), through llama.cpp."""

from __future__ import annotations

import json

import pytest

from grpoctl.artifacts import Artifacts
from grpoctl.export import gguf as gg
from grpoctl.export.parity.scoring import DEFAULT_FLOORS
from tests.export.gguf_support import make_adapter, read_gguf


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_dir, tmp_path_factory):
    # small B so the merged model is still SmolLM2 (as after a short GRPO run) and the floors apply
    return make_adapter(smollm2_dir, tmp_path_factory.mktemp("smol") / "adapter", r=8, alpha=16, std=0.002)


def test_smollm2_fused_q4_k_m_behaves_like_the_merged_model(smollm2_dir, smollm2_adapter, tmp_path):
    out = tmp_path / "export" / "gguf"
    manifest = Artifacts(root=tmp_path / "export")
    [path] = gg.export_gguf(smollm2_dir, smollm2_adapter, out, ["q4_k_m"], name="SmolLM2-135M-Instruct-grpo",
                            artifacts=manifest, system_prompt="You are a careful math tutor.")
    assert path.name == "SmolLM2-135M-Instruct-grpo-Q4_K_M.gguf"
    meta, _ = read_gguf(path)
    assert meta["general.name"] == "SmolLM2-135M-Instruct-grpo"
    assert meta["general.license"] == "apache-2.0"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    rep = json.loads((out / "parity.json").read_text())
    f = rep["files"][path.name]
    tok = f["tokenizer"]
    # SmolLM2's BOS is <|im_start|>, which the template itself writes first: llama.cpp must not add another
    assert tok["bos_count"] == 1 and tok["bos_once"]
    assert tok["chat_ids_match"] and tok["template_matches"]
    assert tok["eog"] == {"<|im_end|>": True}
    assert rep["top1_gated"] and f["passed"]
    assert f["top1"] >= 0.85 and f["kl"] <= 0.15
    assert f["answer"] and rep["reference_answer"]
    assert rep["noise_floor"]["top1"] > 0.9


@pytest.mark.slow
def test_smollm2_all_types_parity_figures(smollm2_dir, tmp_path):
    """The figures quoted in docs/gguf.md: f16, q8_0, q5_k_m, q4_k_m of the plain SmolLM2."""
    out = tmp_path / "gguf"
    gg.export_gguf(smollm2_dir, None, out, ["f16", "q8_0", "q5_k_m", "q4_k_m"], name="SmolLM2-135M-Instruct",
                   artifacts=Artifacts(root=tmp_path))
    rep = json.loads((out / "parity.json").read_text())
    assert rep["passed"]
    assert rep["files"]["SmolLM2-135M-Instruct-F16.gguf"]["top1"] >= 0.995


def test_bf16_file_is_gated_below_bf16s_own_rounding_noise(smollm2_dir, smollm2_adapter, tmp_path):
    """bf16 keeps 8 mantissa bits: the reference itself in bf16 flips near-tie argmaxes against float32, so a top-1
    floor above that noise would fail correct bf16 files at random. The bf16 floor sits below the measured noise
    and the correct file passes; KL stays what separates a wrong file."""
    out = tmp_path / "export" / "gguf"
    [path] = gg.export_gguf(smollm2_dir, smollm2_adapter, out, ["bf16"], name="SmolLM2-135M-Instruct-grpo",
                            artifacts=Artifacts(root=tmp_path / "export"), parity_gate=False)
    rep = json.loads((out / "parity.json").read_text())
    f = rep["files"][path.name]
    floor = DEFAULT_FLOORS["bf16"]
    assert rep["top1_gated"]
    assert floor.top1 <= rep["noise_floor"]["top1"], (floor, rep["noise_floor"])
    assert floor.kl == DEFAULT_FLOORS["f16"].kl
    assert f["passed"] and f["kl"] <= floor.kl
