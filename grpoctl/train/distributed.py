"""Several processes through Hugging Face accelerate: ``accelerate launch`` runs the same training function
in each process (DDP, DeepSpeed ZeRO-2/3 or FSDP); grpoctl adds no engine of its own.

The parent process does the checks that should fail once, not N times (config, rewards, output directory),
then launches ``python -m grpoctl.train.worker RESOLVED.json`` under accelerate and waits. Inside the
workers each process trains on its own GPU (``LOCAL_RANK``) and only rank 0 writes run.json, metrics, the
adapter and the summary; where the weights are sharded (FSDP, ZeRO-3) every process first takes part in
gathering the adapter.

One process on a host with several visible GPUs trains on the first of them (transformers would otherwise
wrap the model in ``nn.DataParallel``, which TRL's GRPOTrainer refuses) and says how to use all of them.
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
from typing import TYPE_CHECKING

from grpoctl import errors
from grpoctl.config import TrainConfig
from grpoctl.errors import ConfigError, DependencyError, InputNotFoundError, UsageError
from grpoctl.procs import run_child
from grpoctl.rundir import RunDir
from grpoctl.train.launchenv import ERROR_PREFIX, LAUNCHED_ENV, running_strategy, world_size
from grpoctl.train.resume import check_output

if TYPE_CHECKING:
    from typing import Any


# accelerate launch flags per strategy; an --accelerate-config file replaces these entirely
_STRATEGY_FLAGS: dict[str, list[str]] = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false"],
    # LoRA leaves most parameters frozen: FSDP must keep the original parameters to shard mixed flat groups.
    # Full state dicts make checkpoints whole, so a run resumes with another process count.
    "fsdp": ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_use_orig_params", "true",
             "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT"],
}
# strategies that split the weights themselves across the processes
SHARDED = ("zero3", "fsdp")


def record_launch(cfg: TrainConfig) -> TrainConfig:
    """The config as it ran: process count and strategy of the launch this process belongs to.

    run.json records these, and later stages (vLLM's data-parallel size) derive from them; a run started
    with ``accelerate launch --num_processes 2 -m grpoctl train`` would otherwise claim one process."""
    strategy = running_strategy()
    if strategy is None:
        return cfg
    known = strategy if strategy in _STRATEGY_FLAGS else cfg.distributed.strategy
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, num_processes=world_size(),
                                                                    strategy=known))


def visible_gpus() -> list[str]:
    """The CUDA devices this launch may use, as ``CUDA_VISIBLE_DEVICES`` names them (read through NVML, so CUDA
    is not initialised and the variable can still be narrowed afterwards)."""
    import torch

    count = torch.cuda.device_count()
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def one_gpu_for_one_process() -> str | None:
    """Restrict a single process to the first visible GPU; returns the note saying how to use all of them.

    Must run before CUDA is initialised in this process (CUDA reads ``CUDA_VISIBLE_DEVICES`` once).
    ``torch.cuda.device_count`` reads the GPUs through NVML and the variable, without initialising CUDA.
    """
    import torch

    if world_size() > 1:
        return None
    count = torch.cuda.device_count()
    if count <= 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else "0"
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    if torch.cuda.device_count() != 1:
        raise UsageError(f"{count} GPUs are visible to one process and CUDA is already initialised, so grpoctl "
                         f"cannot restrict it to one; set CUDA_VISIBLE_DEVICES to one GPU before starting, or train "
                         f"on all {count} with --num-processes {count}")
    return (f"{count} GPUs are visible; one process trains on one of them (CUDA_VISIBLE_DEVICES={first}). "
            f"To train on all {count}: --num-processes {count} (one process per GPU); to pick another GPU: "
            "CUDA_VISIBLE_DEVICES=N")


def check_strategy(strategy: str, backend: str, load_in_4bit: bool) -> None:
    """Combinations that cannot work, refused before any process starts (and again in each worker)."""
    if backend == "unsloth" and strategy != "ddp":
        raise ConfigError(f"--backend unsloth runs several processes only with --strategy ddp (one whole model "
                          f"per GPU); for --strategy {strategy} use --backend trl")
    if load_in_4bit and strategy in SHARDED:
        raise ConfigError(f"model.load_in_4bit cannot be combined with --strategy {strategy}: the 4-bit weights "
                          "are not sharded; use --strategy ddp or zero2 (each GPU holds the 4-bit base)")


def match_frozen_dtype(model: Any) -> None:
    """Under FSDP, give every frozen weight the base model's dtype before accelerate wraps the model.

    FSDP flattens the frozen weights of each layer into one tensor of one dtype (the trained LoRA weights get
    units of their own). TRL adds a frozen copy of the adapter as the KL reference, in float32 by PEFT's
    default, beside the layer's 16-bit weights, and FSDP refuses that mix. Its B is zero at the start, so
    the reference it computes does not change with the cast.
    """
    if running_strategy() != "fsdp":
        return
    base = model.get_input_embeddings().weight.dtype
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != base:
            p.data = p.data.to(base)


def trainer_mixed_precision() -> bool:
    """Whether the trainer may run mixed precision (bf16/fp16 autocast) for a 16-bit model on a GPU.

    Not under FSDP: there accelerate turns it into FSDP's own mixed precision, which hands every wrapped
    unit its weights in 16-bit, the float32 LoRA units too, while PEFT casts their input to the adapter's
    float32; the adapter's matmul then fails on two dtypes. Without it the 16-bit base still runs in 16-bit
    and the adapter in float32, PEFT casting between them.
    """
    return running_strategy() != "fsdp"


def gathered_state_dict(model_wrapped: Any) -> dict[str, Any] | None:
    """The trainable weights whole on rank 0 (empty elsewhere) where the strategy shards them, else None.

    Every process must call this: FSDP and ZeRO-3 gather the shards collectively. Under FSDP each process
    holds flat slices of the weights, so saving rank 0's module as it is would write a broken adapter.
    """
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model_wrapped, FSDP):
        import warnings

        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        offload = next(model_wrapped.parameters()).device.type != "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the replacement API is FSDP2-first
            with FSDP.state_dict_type(model_wrapped, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
                return model_wrapped.state_dict()
    stage = getattr(model_wrapped, "zero_optimization_stage", None)
    if callable(stage) and stage() == 3:
        import deepspeed

        trained = [(n, p) for n, p in model_wrapped.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):
            if torch.distributed.get_rank() != 0:
                return {}
            return {n: p.detach().cpu().clone() for n, p in trained}
    return None


def save_gathered_adapter(model: Any, state: dict[str, Any], dest: Path) -> None:
    """Write the adapter of a PEFT ``model`` whose weights were sharded, from ``state`` (``gathered_state_dict``).

    PEFT finds the adapter's entries by walking the model's modules. FSDP renames those
    (``layers.0._fsdp_wrapped_module.self_attn``...), so PEFT would write an empty adapter: there it writes
    from a weightless copy of the same structure (meta device) instead. ZeRO-3 keeps the names.
    """
    import copy

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    others = [f".{name}." for name in model.peft_config if name != "default"]  # TRL's frozen "ref" copy
    state = {k: v for k, v in state.items() if not any(o in k for o in others)}
    if not any(isinstance(m, FSDP) for m in model.modules()):
        model.save_pretrained(str(dest), selected_adapters=["default"], state_dict=state)
        return
    from accelerate import init_empty_weights
    from peft import get_peft_model

    base = model.get_base_model()
    with init_empty_weights():
        skeleton = get_peft_model(type(base)(base.config), copy.deepcopy(model.peft_config["default"]))
    skeleton.save_pretrained(str(dest), state_dict=state)


def launch_command(cfg: TrainConfig, config_json: Path) -> list[str]:
    d = cfg.distributed
    if not d.accelerate_config:
        check_strategy(d.strategy, cfg.trainer.backend, cfg.model.load_in_4bit)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes),
           "--num_machines", "1", "--dynamo_backend", "no"]
    if d.accelerate_config:
        if not Path(d.accelerate_config).is_file():
            raise InputNotFoundError(f"accelerate config {d.accelerate_config} does not exist")
        cmd += ["--config_file", str(d.accelerate_config)]
    else:
        import torch

        if d.strategy in ("zero2", "zero3") and importlib_missing("deepspeed"):
            raise DependencyError(f"--strategy {d.strategy} needs DeepSpeed: pip install 'grpoctl[deepspeed]'")
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
            raise worker_error(Path(tmp), rc)
    return RunDir(out)


def worker_error(launch_dir: Path, rc: int) -> Exception:
    """What stopped the training processes: the grpoctl error a worker reported (the same class, so the same
    exit code as training in one process), else an unexpected failure whose traceback the worker printed."""
    for path in sorted(launch_dir.glob(f"{ERROR_PREFIX}*.json")):
        try:
            reported = json.loads(path.read_text())
            cls = getattr(errors, reported["class"])
            if isinstance(cls, type) and issubclass(cls, errors.GrpoctlError):
                return cls(reported["message"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return RuntimeError(f"distributed training exited with status {rc}; see the messages above")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
