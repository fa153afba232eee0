"""The launch environment: the variables that say how this training process was started (by ``grpoctl train
--num-processes`` through accelerate, by a plain ``accelerate launch``, or alone), and the names the launcher and
its workers agree on. Imports nothing from grpoctl, so the launcher, the workers and the trainer all read it."""

from __future__ import annotations

import os

# set by grpoctl's launcher in every worker's environment: the launcher checked (and cleared) the output already
LAUNCHED_ENV = "GRPOCTL_LAUNCHED"
# a worker stopped by a grpoctl error writes it beside the launch's config file, as ERROR_PREFIX<pid>.json
ERROR_PREFIX = "error-"


def world_size() -> int:
    """How many processes train together (accelerate's ``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's place among them (``RANK``; 0 alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, the process that writes the run's files."""
    return rank() == 0


def launched_by_grpoctl() -> bool:
    """Whether grpoctl's launcher started this process (so it checked and cleared the output already)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def running_strategy() -> str | None:
    """How accelerate launched this process (None for a single process), read from the variables it sets,
    so ``grpoctl train --num-processes`` and a plain ``accelerate launch -m grpoctl train`` answer alike."""
    if world_size() <= 1:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '')}"
    return "ddp"
