"""Several processes through Hugging Face accelerate: ``accelerate launch`` runs the same training function
in each process (DDP, DeepSpeed ZeRO-2/3 or FSDP); grpoctl adds no engine of its own.

The parent process does the checks that should fail once, not N times (config, rewards, output directory),
then launches ``python -m grpoctl.train.worker RESOLVED.json`` under accelerate and waits. Inside the
workers only rank 0 writes run.json, metrics, the adapter and the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from grpoctl.config import TrainConfig
from grpoctl.errors import ConfigError, DependencyError, GrpoctlError, InputNotFoundError
from grpoctl.procs import run_child
from grpoctl.rundir import RunDir

LAUNCHED_ENV = "GRPOCTL_LAUNCHED"

# accelerate launch flags per strategy; an --accelerate-config file replaces these entirely
_STRATEGY_FLAGS: dict[str, list[str]] = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false"],
    # LoRA leaves most parameters frozen: FSDP must keep the original parameters to shard mixed flat groups
    "fsdp": ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_use_orig_params", "true",
             "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"],
}


def launch_command(cfg: TrainConfig, config_json: Path) -> list[str]:
    d = cfg.distributed
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes),
           "--num_machines", "1", "--dynamo_backend", "no"]
    if d.accelerate_config:
        if not Path(d.accelerate_config).is_file():
            raise InputNotFoundError(f"accelerate config {d.accelerate_config} does not exist")
        cmd += ["--config_file", str(d.accelerate_config)]
    else:
        import torch

        if d.strategy in ("zero2", "zero3") and importlib_missing("deepspeed"):
            raise DependencyError(f"--strategy {d.strategy} needs DeepSpeed: pip install deepspeed")
        if not torch.cuda.is_available() and d.strategy != "ddp":
            raise DependencyError(f"--strategy {d.strategy} needs CUDA GPUs; on CPU use --strategy ddp (gloo)")
        if torch.cuda.is_available() and d.num_processes > torch.cuda.device_count():
            # NCCL cannot put two ranks on one GPU; accelerate would fail later, once per process
            raise ConfigError(f"--num-processes {d.num_processes} needs {d.num_processes} GPUs, but "
                              f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower --num-processes")
        cmd += ["--mixed_precision", "no"] + _STRATEGY_FLAGS[d.strategy]
    return cmd + ["-m", "grpoctl.train.worker", str(config_json)]


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def launch(cfg: TrainConfig) -> RunDir:
    """Run ``cfg`` in ``cfg.distributed.num_processes`` processes and return the run directory rank 0 wrote."""
    from grpoctl.train.rewards import RewardContext, build_rewards
    from grpoctl.train.tracking import check_tracking

    build_rewards(cfg.rewards.functions, cfg.rewards.weights, RewardContext("<think>", "</think>"))
    check_tracking(cfg.tracking)
    from grpoctl.train.run import check_output

    out = Path(cfg.output_dir)
    check_output(cfg, out)
    if not cfg.resume and out.is_dir() and cfg.force:
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="grpoctl-launch-") as tmp:
        config_json = Path(tmp) / "config.json"
        config_json.write_text(json.dumps(dataclasses.asdict(cfg)))
        cmd = launch_command(cfg, config_json)
        print(f"grpoctl: launching {cfg.distributed.num_processes} processes ({cfg.distributed.strategy}) "
              "through accelerate", flush=True)
        env = {**os.environ, LAUNCHED_ENV: "1"}
        # accelerate picks a free port itself only with --main_process_port 0 semantics; give each launch its own
        env.setdefault("MASTER_PORT", str(_free_port()))
        # its own process group: an interrupted grpoctl hands every worker the Ctrl-C that saves a checkpoint
        rc = run_child(cmd, env=env, interrupt=signal.SIGINT, grace=120.0, on_parent_death=signal.SIGTERM)
    if rc != 0:
        raise GrpoctlError(f"distributed training exited with status {rc}; see the messages above")
    return RunDir(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
