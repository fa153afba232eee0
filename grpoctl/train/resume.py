"""The run directory a training writes, decided before any slow work: a new run refuses an existing one (offering
``--resume``), a resumed one continues from its newest checkpoint with the config it was started with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpoctl.config import TrainConfig
from grpoctl.errors import InputNotFoundError, OutputExistsError, UsageError
from grpoctl.fsutil import check_output_dir
from grpoctl.rundir import CHECKPOINTS_DIR, RUN_FILE, RunDir, checkpoint_step, newest_checkpoint


def check_output(cfg: TrainConfig, out: Path, launched: bool = False) -> Path | None:
    """Before any slow work: the checkpoint ``--resume`` continues from (None for a new run).

    A new run refuses an existing output (offering ``--resume`` when it holds a run); a resumed one refuses
    when its newest checkpoint already reaches ``max_steps``, since TRL would otherwise train past it.
    """
    if cfg.resume:
        if not RunDir.is_run(out):
            raise InputNotFoundError(f"--resume: {out} is not a grpoctl run directory (no {RUN_FILE})")
        ckpt = newest_checkpoint(out / CHECKPOINTS_DIR)
        if ckpt is None:
            raise UsageError(f"--resume: {out / CHECKPOINTS_DIR} holds no checkpoint to resume from; "
                             "start again with --force")
        step, target = checkpoint_step(ckpt), cfg.trainer.max_steps
        if step >= target:
            raise UsageError(f"--resume: {out} is already at step {step} ({ckpt.name}), which reaches max_steps "
                             f"{target}: nothing to train, the adapter is unchanged; pass a larger --max-steps "
                             f"(e.g. --max-steps {step + target}) to continue")
        return ckpt
    if launched:  # the launcher already checked (and cleared) `out`
        return None
    if RunDir.is_run(out) and not cfg.force:
        ckpt = newest_checkpoint(out / CHECKPOINTS_DIR)
        at = f" (at step {checkpoint_step(ckpt)})" if ckpt else ""
        raise OutputExistsError(f"{out} already holds a training run{at}; continue it with --resume (with a larger "
                                "--max-steps), or pass --force to delete it and start again")
    check_output_dir(out, cfg.force)
    return None


def resumed_config_base(out: Path) -> dict[str, Any] | None:
    """The config a run was started with, so ``--resume -o RUN`` needs no other flag."""
    if not RunDir.is_run(out):
        return None
    run = RunDir(out)
    config = json.loads(json.dumps(run.config))
    for dotted in run.record.derived:
        section, _, key = dotted.partition(".")
        config.get(section, {}).pop(key, None)
    return config
