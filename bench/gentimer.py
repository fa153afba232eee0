"""`grpoctl train` with each step's generation timed: how much of a GRPO step is writing the completions.

    python bench/gentimer.py train ARGS...   (the arguments of `grpoctl train`; $BENCH_GEN names the output file)

TRL's GRPOTrainer (and Unsloth's trainer, compiled from TRL's source) writes a step's completions in
``_generate_single_turn``, by vLLM or by transformers' ``generate``; the wrapper records the start and end of
each call, one ``start end`` line per call, so a bench can split the step time into generation and the rest.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from typing import Any

import grpoctl.train.run as run

_build = run._build_trainer


def _timed_build(*args: Any, **kwargs: Any) -> Any:
    trainer = _build(*args, **kwargs)
    real = trainer._generate_single_turn  # the method every generation path of the trainer goes through

    def timed(*a: Any, **k: Any) -> Any:
        start = time.time()
        try:
            return real(*a, **k)
        finally:
            if int(os.environ.get("RANK", "0")) == 0:
                with open(os.environ["BENCH_GEN"], "a") as fh:
                    fh.write(f"{start:.4f} {time.time():.4f}\n")

    trainer._generate_single_turn = timed
    return trainer


if __name__ == "__main__":
    run._build_trainer = _timed_build
    sys.argv = ["grpoctl", *sys.argv[1:]]
    runpy.run_module("grpoctl", run_name="__main__")
