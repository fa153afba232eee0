"""On a CUDA GPU with vLLM: GRPO learns from completions vLLM wrote with the weights being trained.

TRL scores every vLLM sample again with the trained policy and logs how far the two log-probabilities are
apart (``sampling/sampling_logp_difference/mean``, grpoctl's ``vllm_logp_diff``). With the weights synced
before each generation that gap is kernel noise; with a stale copy in vLLM it grows as the adapter moves away
from it. The test trains the same run twice at a learning rate that moves the adapter within a few steps,
once as grpoctl runs it and once with a stale vLLM (TRL: its weight sync cut after the first step; Unsloth: its
first adapter request handed back at every step): the first must stay far below the second. Skipped where
there is no CUDA GPU or no vLLM (every CPU machine).
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

# Unsloth's generation asks model.load_lora(..., load_tensors=True) for the live LoRA tensors before each
# generate, under a new request id (vLLM caches adapters by id). Handing back the first request every time
# leaves vLLM on the adapter of step 0: the stale copy Unsloth's design exists to avoid.
STALE_UNSLOTH = """
import runpy, sys
import grpoctl.train.run as run
build = run._build_trainer
def stale_build(cfg, loaded, *args, **kwargs):
    real, first = loaded.model.load_lora, []
    def first_request(*a, **k):
        if not first:
            first.append(real(*a, **k))
        return first[0]
    loaded.model.load_lora = first_request
    return build(cfg, loaded, *args, **kwargs)
run._build_trainer = stale_build
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


def _train(model: Path, out: Path, backend: str, stale: bool = False, extra: tuple[str, ...] = ()) -> list[dict]:
    args = ["train", "-m", str(model), "-o", str(out), "--backend", backend, "--generation", "vllm",
            "--max-steps", "6", "--set", "trainer.learning_rate=5e-3", "--set", "trainer.max_completion_length=24",
            "--set", "data.max_samples=32", "--set", "model.gpu_memory_utilization=0.3",
            "--set", "trainer.save_steps=1000", *extra]
    wrapper = STALE_UNSLOTH if backend == "unsloth" else STALE
    cmd = [sys.executable, "-c", wrapper, *args] if stale else [sys.executable, "-m", "grpoctl", *args]
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
def test_unsloth_vllm_generates_with_the_weights_being_trained(vllm_model, tmp_path):
    """Unsloth hands vLLM the LoRA tensors being trained (no copy to go stale): its gap stays far below a run
    whose vLLM keeps the adapter of step 0. Unsloth computes the gap only with the importance-sampling
    correction on (off by its default), so both runs turn it on."""
    on = ("--set", "trainer.vllm_importance_sampling_correction=true")
    synced = _late_gap(_train(vllm_model, tmp_path / "unsloth", "unsloth", extra=on))
    stale = _late_gap(_train(vllm_model, tmp_path / "unsloth-stale", "unsloth", stale=True, extra=on))
    print(f"late vllm_logp_diff with unsloth: synced {synced:.5f}, stale {stale:.5f}")
    assert stale > 3 * synced, (synced, stale)
