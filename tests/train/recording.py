"""A reward plugin for tests: records every call's arguments to the JSON-lines file in $GRPOCTL_RECORD."""

from __future__ import annotations

import json
import os
from typing import Any


def record(prompts: list, completions: list, completion_ids: list, answer: list, **kwargs: Any) -> list[float]:
    row = {
        "n": len(completions),
        "prompt_roles": [[m["role"] for m in p] for p in prompts],
        "completion_roles": [[m["role"] for m in c] for c in completions],
        "completion_ids_lens": [len(ids) for ids in completion_ids],
        "answers": list(answer),
        "kwargs": sorted(kwargs),
        "step": kwargs["trainer_state"].global_step if "trainer_state" in kwargs else None,
        "rank": int(os.environ.get("RANK", "0")),
    }
    with open(os.environ["GRPOCTL_RECORD"], "a") as fh:
        fh.write(json.dumps(row) + "\n")
    # a signal that depends on the completion, so the group has non-zero advantage variance
    return [float(len(c[0]["content"]) % 3) for c in completions]



def varied(completions: list, **kwargs: Any) -> list[float]:
    """A score that depends on the completion (its length mod 3), so groups vary and the adapter trains."""
    return [float(len(c[0]["content"]) % 3) for c in completions]


def interrupt_after_first_step(completions: list, **kwargs: Any) -> list[float]:
    """Behaves like Ctrl-C in the middle of the second step."""
    if kwargs["trainer_state"].global_step >= 1:
        raise KeyboardInterrupt
    return [0.0 for _ in completions]


def constant(completions: list, **kwargs: Any) -> list[float]:
    """The same score for every completion: no group ever varies, so GRPO has nothing to learn from."""
    return [1.0 for _ in completions]


def interrupt_in_first_step(completions: list, **kwargs: Any) -> list[float]:
    """Behaves like Ctrl-C during the first step, before any step finished."""
    raise KeyboardInterrupt
