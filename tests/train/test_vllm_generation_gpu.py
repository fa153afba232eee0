"""On a CUDA GPU with vLLM: GRPO learns from completions vLLM wrote with the weights being trained.

TRL scores every vLLM sample again with the trained policy and logs how far the two log-probabilities are
apart (``sampling/sampling_logp_difference/mean``, grpoctl's ``vllm_logp_diff``). With the weights synced
before each generation that gap is kernel noise; with a stale copy in vLLM it grows as the adapter moves away
from it. The test trains the same run twice at a learning rate that moves the adapter within a few steps,
once as grpoctl runs it and once with TRL's weight sync cut after the first step (a stale vLLM): the first
must stay far below the second. Skipped where there is no CUDA GPU or no vLLM (every CPU machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not __import__("torch").cuda.is_available(),
    reason="needs a CUDA GPU and vLLM")

# TRL's sync cut after its first call: vLLM keeps generating with the weights of step 0
STALE = """
import runpy, sys
from trl.generation.vllm_generation import VLLMGeneration
real = VLLMGeneration.sync_weights
calls = []
def once(self):
    if not calls:
        real(self)
    calls.append(1)
VLLMGeneration.sync_weights = once
sys.argv = ["grpoctl", *sys.argv[1:]]
runpy.run_module("grpoctl", run_name="__main__")
"""


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ.setdefault("VLLM_BENCH_WORK", str(tmp_path_factory.mktemp("vw")))
    import vllm_gpu

    vllm_gpu.WORK = Path(os.environ["VLLM_BENCH_WORK"])
    return vllm_gpu.tiny_model()


def _train(model: Path, out: Path, backend: str, stale: bool = False) -> list[dict]:
    args = ["train", "-m", str(model), "-o", str(out), "--backend", backend, "--generation", "vllm",
            "--max-steps", "6", "--set", "trainer.learning_rate=5e-3", "--set", "trainer.max_completion_length=24",
            "--set", "data.max_samples=32", "--set", "model.gpu_memory_utilization=0.3",
            "--set", "trainer.save_steps=1000"]
    cmd = [sys.executable, "-c", STALE, *args] if stale else [sys.executable, "-m", "grpoctl", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.loads((out / "run.json").read_text())
    assert meta["generation"]["engine"] == "vllm", meta["generation"]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _late_gap(metrics: list[dict]) -> float:
    gaps = [m["vllm_logp_diff"] for m in metrics if "vllm_logp_diff" in m]
    assert len(gaps) >= 4, metrics
    return sum(gaps[-3:]) / 3


@pytest.fixture(scope="module")
def synced_gap(vllm_model, tmp_path_factory) -> float:
    return _late_gap(_train(vllm_model, tmp_path_factory.mktemp("fresh") / "run", "trl"))


def test_trl_vllm_generates_with_the_weights_being_trained(vllm_model, synced_gap, tmp_path):
    stale = _late_gap(_train(vllm_model, tmp_path / "stale", "trl", stale=True))
    print(f"late vllm_logp_diff: synced {synced_gap:.5f}, stale {stale:.5f}")
    assert stale > 3 * synced_gap, (synced_gap, stale)


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth")
def test_unsloth_vllm_generates_with_the_weights_being_trained(vllm_model, synced_gap, tmp_path):
    """Unsloth hands vLLM the LoRA tensors being trained (no copy to go stale): its gap stays at the level of
    TRL's synced run, measured the same way."""
    metrics = _train(vllm_model, tmp_path / "unsloth", "unsloth")
    gaps = [m["vllm_logp_diff"] for m in metrics if "vllm_logp_diff" in m]
    print(f"unsloth vllm_logp_diff per step: {gaps}; TRL synced: {synced_gap:.5f}")
    assert len(metrics) == 6
    if gaps:  # Unsloth's trainer logs TRL's metric where it keeps the importance-sampling correction
        assert sum(gaps[-3:]) / 3 < 3 * max(synced_gap, 1e-3), (gaps, synced_gap)
