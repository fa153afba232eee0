"""On a CUDA GPU with vLLM: GRPO learns from completions vLLM wrote with the weights being trained.

TRL scores every vLLM sample again with the trained policy and logs how far the two log-probabilities are
apart (``sampling/sampling_logp_difference/mean``, grpoctl's ``vllm_logp_diff``). With the weights synced
before each generation that gap is kernel noise; with a stale copy in vLLM it grows as the adapter moves away
from it. The test trains the same run twice at a learning rate that moves the adapter within a few steps,
once as grpoctl runs it and once with a stale vLLM (TRL: its weight sync cut after the first step; Unsloth: the
first generate's adapter put back in place during every generate): the first must stay far below the second.
Skipped where there is no CUDA GPU or no vLLM (every CPU machine).
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

# Unsloth gives vLLM the live adapter at every generate, one of two ways: folded into vLLM's shared 16-bit weights
# for the call (its automatic default on CUDA) or as a vLLM LoRA request built from the live tensors (its path for
# a 4-bit base, as the tutorial's, or with UNSLOTH_VLLM_MERGED_ROLLOUT=0). Handing back an old request object does
# not make either stale (the fold re-reads the adapter), so the stale run puts the adapter of the first generate
# back into the trained parameters for the length of every TRL generate call, around whatever Unsloth does in it.
STALE_UNSLOTH = """
import runpy, sys, torch
import grpoctl.train.run as run
from trl.generation import vllm_generation as vg
build, calls = run._build_trainer, []
def stale_build(cfg, loaded, *args, **kwargs):
    trainer = build(cfg, loaded, *args, **kwargs)
    params = [p for n, p in loaded.model.named_parameters() if "lora_" in n]
    assert params, "no LoRA parameters"
    real, first = vg.VLLMGeneration.generate, []
    def generate(self, *a, **k):
        with torch.no_grad():
            first.extend([] if first else [p.detach().clone() for p in params])
            live = [p.detach().clone() for p in params]
            for p, old in zip(params, first):
                p.copy_(old)
        try:
            return real(self, *a, **k)
        finally:
            with torch.no_grad():
                for p, now in zip(params, live):
                    p.copy_(now)
            calls.append(1)
    generate._unsloth_vllm_generation_lora_wrapped = True  # Unsloth wraps a generate only once
    vg.VLLMGeneration.generate = generate
    return trainer
run._build_trainer = stale_build
sys.argv = ["grpoctl", *sys.argv[1:]]
try:
    runpy.run_module("grpoctl", run_name="__main__")
finally:
    print(f"stale generate calls: {len(calls)}")
"""


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ.setdefault("VLLM_BENCH_WORK", str(tmp_path_factory.mktemp("vw")))
    import vllm_gpu

    vllm_gpu.WORK = Path(os.environ["VLLM_BENCH_WORK"])
    return vllm_gpu.tiny_model()


def _train(model: Path, out: Path, backend: str, stale: bool = False, extra: tuple[str, ...] = (),
           env_extra: dict[str, str] | None = None) -> list[dict]:
    args = ["train", "-m", str(model), "-o", str(out), "--backend", backend, "--generation", "vllm",
            "--max-steps", "6", "--set", "trainer.learning_rate=5e-3", "--set", "trainer.max_completion_length=24",
            "--set", "data.max_samples=32", "--set", "model.gpu_memory_utilization=0.3",
            "--set", "trainer.save_steps=1000", *extra]
    wrapper = STALE_UNSLOTH if backend == "unsloth" else STALE
    cmd = [sys.executable, "-c", wrapper, *args] if stale else [sys.executable, "-m", "grpoctl", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "VLLM_USE_FLASHINFER_SAMPLER": "0", **(env_extra or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if stale and backend == "unsloth":  # the stale copy must really have been in place at each generate
        assert int(r.stdout.rsplit("stale generate calls: ", 1)[1].split()[0]) >= 4, r.stdout[-3000:]
    (out / "train.log").write_text(r.stdout + r.stderr)
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


# Unsloth's two ways of handing vLLM the adapter; the log line tells which one a run took
UNSLOTH_ROLLOUTS = {
    "fold": ({}, True),  # its automatic default for a 16-bit base on CUDA: the adapter folded into shared weights
    "vllm-lora": ({"UNSLOTH_VLLM_MERGED_ROLLOUT": "0"}, False),  # a 4-bit base's (the tutorial's) path
}
# Unsloth computes the gap only with the importance-sampling correction on (off by its default)
UNSLOTH_GAP_ON = ("--set", "trainer.vllm_importance_sampling_correction=true")


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth")
@pytest.mark.parametrize("rollout", sorted(UNSLOTH_ROLLOUTS))
def test_unsloth_vllm_generates_with_the_weights_being_trained(vllm_model, tmp_path, rollout):
    """Unsloth hands vLLM the LoRA tensors being trained (no copy to go stale): its gap stays far below a run
    whose vLLM generates with the adapter of the first step; both runs turn on the correction that computes it."""
    env_extra, folds = UNSLOTH_ROLLOUTS[rollout]
    synced = _late_gap(_train(vllm_model, tmp_path / "unsloth", "unsloth", extra=UNSLOTH_GAP_ON,
                              env_extra=env_extra))
    log = (tmp_path / "unsloth" / "train.log").read_text()
    assert ("Merged-weight rollouts on" in log) == folds, log[-3000:]
    stale = _late_gap(_train(vllm_model, tmp_path / "unsloth-stale", "unsloth", stale=True, extra=UNSLOTH_GAP_ON,
                             env_extra=env_extra))
    print(f"late vllm_logp_diff with unsloth ({rollout}): synced {synced:.5f}, stale {stale:.5f}")
    assert stale > 3 * synced, (synced, stale)
