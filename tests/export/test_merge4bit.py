"""4-bit export: merged in 16-bit first, then quantized once to bitsandbytes nf4.

bitsandbytes quantizes on CUDA only, so the round trip runs where a GPU is present (the GPU device,
recorded in docs/export.md) and is skipped here; the CPU test checks the refusal message.
"""

from __future__ import annotations

import json

import pytest
import torch

from grpoctl.errors import DependencyError

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="checks the message shown when no CUDA GPU is visible")
def test_nf4_without_cuda_is_a_dependency_error():
    from grpoctl.export.merge4bit import check_nf4_available

    with pytest.raises(DependencyError, match="needs a CUDA GPU.*--merged 16bit"):
        check_nf4_available()


@pytest.mark.skipif(not CUDA, reason="bitsandbytes nf4 needs a CUDA GPU (runs on the GPU device)")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_nf4_export_loads_back_and_tracks_the_16bit_merge_on_gpu(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from grpoctl.api import ExportOptions, export  # the manifests are written by the stage above export
    from tests.conftest import make_run

    run = make_run(tmp_path / "run", tiny_models[arch])
    merged16 = export(run, ExportOptions(output_dir=tmp_path / "e16", progress=False)).root / "merged"
    manifest = export(run, ExportOptions(merged="4bit", lora=True, output_dir=tmp_path / "e4", progress=False))
    out = manifest.root / "merged-4bit"
    assert not (manifest.root / ".merged-16bit").exists()
    assert {f.kind for f in manifest.files} == {"merged-4bit", "lora", "report", "manifest"}
    # vLLM is told the weights are bitsandbytes 4-bit
    assert "--quantization bitsandbytes" in (manifest.root / "vllm" / "serve.sh").read_text()
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["load_in_4bit"]

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]], device=0)
    with torch.no_grad():
        q = AutoModelForCausalLM.from_pretrained(out, device_map={"": 0})(ids).logits.float()
        ref = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.bfloat16, device_map={"": 0})(ids)
        ref = ref.logits.float()
    cos = torch.nn.functional.cosine_similarity(q.flatten(), ref.flatten(), dim=0).item()
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"nf4 vs 16-bit merge ({arch}): logits cosine {cos:.4f}, top-1 agreement {top1:.2f}")
    assert any(m.__class__.__name__ == "Linear4bit" for m in AutoModelForCausalLM.from_pretrained(
        out, device_map={"": 0}).modules())
    assert cos > 0.9
