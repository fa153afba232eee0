"""`grpoctl train` stopped by SIGTERM (docker stop, Kubernetes, CI time-outs) as a real process: the same clean
stop as Ctrl-C (checkpoint, adapter, summary), exit 143 and one last line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def sigterm_after_first_step(completions: list, **kwargs: Any) -> list[float]:
    """A reward plugin: the process gets a real SIGTERM in the middle of the second step."""
    if kwargs["trainer_state"].global_step >= 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c[0]["content"]) % 3) for c in completions]


def test_sigterm_stops_training_like_ctrl_c(tiny_qwen3, tmp_path):
    out = tmp_path / "run"
    rewards = json.dumps(["numbers", "tests.train.test_train_signals:sigterm_after_first_step"])
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "train", "--model", str(tiny_qwen3), "-o", str(out),
                           "--max-steps", "3", "--set", "trainer.num_generations=2", "--set",
                           "trainer.max_completion_length=8", "--set", f"rewards.functions={rewards}"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "grpoctl: interrupted (SIGTERM)"
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["steps"] == 1
    assert (out / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
