"""A zero reward that timestamps every scoring call, so grpoctl and a hand-written trainer are timed alike.

GRPO scores each step's completions once, so the spacing of consecutive calls is the step period. Use it as
``rewards.functions=[..., "steptimer:tick"]`` (grpoctl) or as one more entry of ``reward_funcs`` (by hand),
with ``$BENCH_TICKS`` naming the file that collects one ``time.time()`` per line.
"""

from __future__ import annotations

import os
import time
from typing import Any


def tick(completions: list, **kwargs: Any) -> list[float]:
    path = os.environ.get("BENCH_TICKS")
    if path and int(os.environ.get("RANK", "0")) == 0:
        with open(path, "a") as fh:
            fh.write(f"{time.time():.4f}\n")
    return [0.0 for _ in completions]


def step_times(path: str, train_wall_s: float, steps: int) -> dict[str, float | None]:
    """Steady-state seconds per step (median spacing of the calls after the first step) and the first step's
    share of the trainer's wall time (everything the steady steps do not account for: compilation, warm-up)."""
    import statistics

    ticks = [float(x) for x in open(path).read().split()] if os.path.isfile(path) else []
    gaps = [b - a for a, b in zip(ticks[1:], ticks[2:], strict=False)]  # step 2 -> 3 onwards
    if not gaps:
        return {"steady_s_per_step": None, "first_step_s": None, "ticks": len(ticks)}
    steady = statistics.median(gaps)
    return {"steady_s_per_step": round(steady, 3), "first_step_s": round(train_wall_s - (steps - 1) * steady, 2),
            "ticks": len(ticks)}


def generation_times(path: str) -> dict[str, float | None]:
    """Median seconds of generation per call after the first (the first includes engine warm-up), from the
    ``start end`` lines bench/gentimer.py writes."""
    import statistics

    spans = [float(b) - float(a) for a, b in (line.split() for line in open(path))] if os.path.isfile(path) else []
    return {"steady_generation_s": round(statistics.median(spans[1:]), 3) if len(spans) > 1 else None,
            "generation_calls": len(spans)}
