"""One training run of the GPU weights-freshness test, on its own: the late `vllm_logp_diff` it gives.

    python bench/vllm_fresh.py OUTDIR [--backend unsloth|trl] [--rollout fold|vllm-lora] [--stale]

The test (tests/train/test_vllm_generation_gpu.py) trains the tiny Qwen3 twice, synced and stale, in one call;
this runs one of those runs, for a machine with time left for one run only. The runs and the gap are the
test's own (`_train`, `_late_gap`, the stale wrappers), so the figures compare with the test's.
Writes OUTDIR/result.json and the run's train.log, metrics.jsonl and run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "train"), str(ROOT / "bench")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--backend", choices=["unsloth", "trl"], default="unsloth")
    ap.add_argument("--rollout", choices=["fold", "vllm-lora"], default="fold",
                    help="unsloth: how vLLM gets the adapter")
    ap.add_argument("--stale", action="store_true", help="the test's stale copy in place of the synced weights")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_BENCH_WORK", "/root/vwt")
    import test_vllm_generation_gpu as t
    import vllm_gpu

    vllm_gpu.WORK = Path(os.environ["VLLM_BENCH_WORK"])
    model = vllm_gpu.tiny_model()
    run = vllm_gpu.WORK / "fresh" / f"{a.backend}-{a.rollout}-{'stale' if a.stale else 'synced'}"
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    extra = t.UNSLOTH_GAP_ON if a.backend == "unsloth" else ()
    env_extra = t.UNSLOTH_ROLLOUTS[a.rollout][0] if a.backend == "unsloth" else {}
    try:
        metrics = t._train(model, run, a.backend, stale=a.stale, extra=extra, env_extra=env_extra)
        gaps = [m.get("vllm_logp_diff") for m in metrics]
        result = {"backend": a.backend, "rollout": a.rollout, "stale": a.stale, "gaps": gaps,
                  "late": t._late_gap(metrics)}
        print(json.dumps(result))
        (a.out / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        for name in ("train.log", "metrics.jsonl", "run.json"):
            if (run / name).is_file():
                shutil.copy(run / name, a.out / name)


if __name__ == "__main__":
    main()
