"""Two processes on CPU through ``accelerate launch`` (gloo): both generate and score, only rank 0 writes.

Real accelerate + torch.distributed on this machine's CPUs. accelerate applies FSDP and DeepSpeed only on
GPUs; here FSDP itself runs on CPU (gloo) for the adapter gather, the GPU count is a stub standing in for
NVML (``torch.cuda.device_count``), and the GPU runs are in bench/gpu_multi.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from grpoctl.config import load_config
from grpoctl.errors import ConfigError, DataError, DependencyError, UsageError
from grpoctl.train import backends
from grpoctl.train.distributed import (
    gathered_state_dict,
    launch_command,
    match_frozen_dtype,
    one_gpu_for_one_process,
    worker_error,
)
from grpoctl.train.resume import resumed_config_base
from grpoctl.train.run import train

pytestmark = pytest.mark.integration


def test_two_cpu_processes_train_one_step_and_rank0_writes(tiny_qwen3, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("GRPOCTL_RECORD", str(record))
    out = tmp_path / "run"
    cfg = load_config(overrides=["trainer.num_generations=2", "trainer.max_completion_length=8",
                                 'rewards.functions=["numbers", "tests.train.recording:record"]'],
                      flags={"model": {"name": str(tiny_qwen3)}, "output_dir": str(out),
                             "trainer": {"max_steps": 1}, "distributed": {"num_processes": 2}})
    run = train(cfg)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(c["rank"] for c in calls) == [0, 1]  # each process scored its own completions
    summary = run.summary()
    assert summary["world_size"] == 2 and summary["written_by_rank"] == 0
    assert summary["process_group_backend"] == "gloo" and summary["steps"] == 1
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert len(run.metrics()) == 1  # one metrics line per step, not one per process
    assert not [p for p in os.listdir(out) if ".partial-" in p]
    # the checkpoint is accelerate's: a single process picks it up and continues
    resumed = train(load_config(overrides=["trainer.max_steps=2", "distributed.num_processes=1"],
                                base=resumed_config_base(out), flags={"output_dir": str(out), "resume": True}))
    assert resumed.summary()["steps"] == 2 and resumed.summary()["world_size"] == 1
    assert resumed.summary()["resumed_from"].endswith("checkpoint-1")


def test_divisibility_is_checked_before_launch():
    with pytest.raises(ConfigError, match=r"generation batch .* must be divisible by trainer.num_generations \(4\)"):
        load_config(overrides=["trainer.per_device_train_batch_size=2", "distributed.num_processes=3"])


def test_launch_command_per_strategy(tmp_path):
    import torch

    cfg = load_config(overrides=["distributed.num_processes=2"])
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        # one GPU: two NCCL ranks cannot share it, so the launch is refused up front
        with pytest.raises(ConfigError, match=r"--num-processes 2 needs 2 GPUs, but 1 are visible"):
            launch_command(cfg, tmp_path / "c.json")
    else:
        cmd = launch_command(cfg, tmp_path / "c.json")
        assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
        assert cmd[-3:] == ["-m", "grpoctl.train.worker", str(tmp_path / "c.json")]
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: MULTI_GPU\n")
    cfg = load_config(overrides=["distributed.num_processes=2", f"distributed.accelerate_config={acc}"])
    cmd = launch_command(cfg, tmp_path / "c.json")
    assert ["--config_file", str(acc)] == cmd[cmd.index("--config_file"):cmd.index("--config_file") + 2]
    assert "--multi_gpu" not in cmd


def test_accelerate_launch_of_the_cli_on_two_cpu_processes(tiny_qwen3, tmp_path):
    """The documented ``accelerate launch --num_processes 2 --multi_gpu -m grpoctl train ...`` (gloo on CPU):
    each process runs the CLI itself, both score completions, rank 0 alone checks and writes the run."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    record = tmp_path / "calls.jsonl"
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "grpoctl", "train", "--model", str(tiny_qwen3), "-o", str(out), "--max-steps", "1",
           "--set", "trainer.num_generations=2", "--set", "trainer.max_completion_length=8",
           "--set", 'rewards.functions=["numbers", "tests.train.recording:record"]']
    env = {**os.environ, "GRPOCTL_RECORD": str(record)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grpoctl: backend") == 1  # rank 0 reports, rank 1 stays quiet
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(c["rank"] for c in calls) == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["written_by_rank"] == 0 and summary["steps"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # run.json says what ran (later stages size vLLM's data parallelism from it), not the CLI's default of 1
    ran = json.loads((out / "run.json").read_text())["config"]["distributed"]
    assert ran["num_processes"] == 2 and ran["strategy"] == "ddp"


def test_a_workers_grpoctl_error_is_the_launchs_line_and_exit_code(tiny_qwen3, tmp_path):
    """accelerate's launcher exits 1 whatever its processes return; the launch still ends as training in one
    process would: here a dataset without the mapped columns, exit 4 (DataError), not 1."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "solution": "2"}) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "train", "--model", str(tiny_qwen3), "-o", str(out),
                           "--dataset", str(data), "--num-processes", "2", "--max-steps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == DataError.exit_code, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # after the workers' own lines and torch's failure summary
    assert last.startswith("grpoctl: ") and "no column 'question', 'answer'" in last, proc.stderr[-3000:]
    assert not out.exists()


def test_a_worker_that_reported_no_grpoctl_error_failed_unexpectedly(tmp_path):
    """No error file: a worker died on a traceback (printed above) or a signal, a failure no exit code of
    docs/errors.md describes, so the command line reports an internal error (exit 70)."""
    (tmp_path / "error-1.json").write_text("{not json")  # a half-written report is ignored, not trusted
    err = worker_error(tmp_path, 1)
    assert type(err) is RuntimeError and "exited with status 1" in str(err)
    (tmp_path / "error-2.json").write_text(json.dumps({"class": "DataError", "message": "bad rows"}))
    err = worker_error(tmp_path, 1)
    assert type(err) is DataError and str(err) == "bad rows"
    (tmp_path / "error-2.json").write_text(json.dumps({"class": "Path", "message": "x"}))  # not a grpoctl error
    assert type(worker_error(tmp_path, 1)) is RuntimeError


def _visible_gpus(host: int):
    """Stands in for NVML behind ``torch.cuda.device_count``: ``host`` GPUs, masked by CUDA_VISIBLE_DEVICES."""

    def count() -> int:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        return host if mask is None else len([d for d in mask.split(",") if d.strip()])

    return count


def test_one_process_on_a_two_gpu_host_trains_on_the_first_and_says_how_to_use_both(tiny_qwen3, tmp_path,
                                                                                     monkeypatch, capsys):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", _visible_gpus(2))
    cfg = load_config(overrides=["trainer.num_generations=2", "trainer.max_completion_length=8"],
                      flags={"model": {"name": str(tiny_qwen3)}, "output_dir": str(tmp_path / "run"),
                             "trainer": {"max_steps": 1}})
    run = train(cfg)
    # one process sees one GPU, so transformers does not wrap the model in nn.DataParallel (which GRPO refuses)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and torch.cuda.device_count() == 1
    out = capsys.readouterr().out
    assert "grpoctl: 2 GPUs are visible; one process trains on one of them (CUDA_VISIBLE_DEVICES=0)" in out
    assert "--num-processes 2" in out
    assert run.summary()["world_size"] == 1 and run.config["distributed"]["num_processes"] == 1


def test_one_gpu_is_the_first_of_the_visible_ones_and_launched_processes_keep_theirs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", _visible_gpus(8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "CUDA_VISIBLE_DEVICES=3" in one_gpu_for_one_process()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert one_gpu_for_one_process() is None  # one visible: nothing to say
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate each process picks its GPU by LOCAL_RANK
    assert one_gpu_for_one_process() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_one_process_with_cuda_already_initialised_is_told_how_to_choose(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the mask no longer applies
    with pytest.raises(UsageError, match=r"set CUDA_VISIBLE_DEVICES to one GPU before starting, or train on all "
                                         r"2 with --num-processes 2"):
        one_gpu_for_one_process()


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.backend=unsloth", "distributed.strategy=fsdp"],
     r"--backend unsloth runs several processes only with --strategy ddp .*; for --strategy fsdp use --backend trl"),
    (["trainer.backend=unsloth", "distributed.strategy=zero2"], r"for --strategy zero2 use --backend trl"),
    (["model.load_in_4bit=true", "distributed.strategy=fsdp"],
     r"model.load_in_4bit cannot be combined with --strategy fsdp"),
    (["model.load_in_4bit=true", "distributed.strategy=zero3"],
     r"model.load_in_4bit cannot be combined with --strategy zero3"),
])
def test_launch_refuses_combinations_that_cannot_work_before_starting(overrides, message, tmp_path):
    cfg = load_config(overrides=["distributed.num_processes=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        launch_command(cfg, tmp_path / "c.json")


def test_auto_backend_under_sharding_launches_is_trl_and_explicit_unsloth_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "has_cuda", lambda: True)
    monkeypatch.setattr(backends, "has_module", lambda name: True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert backends.pick_backend("auto") == "unsloth"  # DDP: one whole model per GPU, unsloth's own support
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert backends.pick_backend("auto") == "trl"
    with pytest.raises(ConfigError, match="for --strategy fsdp use --backend trl"):
        backends.pick_backend("unsloth")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert backends.pick_backend("auto") == "trl"


def test_fsdp_runs_without_the_trainers_mixed_precision(monkeypatch):
    from grpoctl.train.distributed import trainer_mixed_precision

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not trainer_mixed_precision()  # FSDP's 16-bit units would meet PEFT's float32 adapter input
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert trainer_mixed_precision()


def test_deepspeed_strategies_name_the_extra_that_installs_deepspeed(tmp_path, monkeypatch):
    import grpoctl.train.distributed as distributed

    monkeypatch.setattr(distributed, "importlib_missing", lambda name: name == "deepspeed")
    with pytest.raises(DependencyError, match=r"pip install 'grpoctl\[deepspeed\]'"):
        launch_command(load_config(overrides=["distributed.num_processes=2", "distributed.strategy=zero2"]),
                       tmp_path / "c.json")


def _fsdp_save_worker(rank: int, world: int, port: int, model_dir: str, out: str, gather: bool) -> None:
    """One of two CPU processes: a PEFT LoRA sharded by FSDP (gloo), the adapter written as training ends."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpoctl.train.backends import Loaded
    from grpoctl.train.run import _save_adapter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      ACCELERATE_USE_FSDP="true")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # a 16-bit base with a float32 adapter, as grpoctl loads it on a GPU
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        # what TRL's GRPOTrainer does with a ready PEFT model: a frozen copy of the adapter as the KL reference
        model.add_adapter("ref", model.peft_config["default"])
        if gather:
            match_frozen_dtype(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name and ".default." in name:  # values a trained adapter could hold, per tensor
                    p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 1000 + len(name))
        from peft.utils.other import fsdp_auto_wrap_policy

        wrapped = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                       use_orig_params=True, auto_wrap_policy=fsdp_auto_wrap_policy(model))
        # a training step as grpoctl runs it under FSDP (no mixed precision): 16-bit base, float32 adapter
        wrapped(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().sum().backward()
        state = gathered_state_dict(wrapped) if gather else None
        if rank == 0:
            _save_adapter(Loaded(model, AutoTokenizer.from_pretrained(model_dir), "trl", False), Path(out),
                          model_dir, state)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_wraps_trls_reference_adapter_and_saves_the_gathered_adapter(tiny_qwen3, tmp_path):
    """FSDP wraps a 16-bit model carrying TRL's float32 reference copy of the adapter (it refuses mixed dtypes
    in one layer), and as each process holds flat slices of the LoRA weights, the saved adapter must hold the
    whole tensors with the values the model had (the same file a single process would write)."""
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    procs = mp.spawn(_fsdp_save_worker, args=(2, _free_port(), str(tiny_qwen3), str(out), True), nprocs=2,
                     join=False)
    deadline = time.monotonic() + 300
    # saving rank 0's module alone runs FSDP's collectives in one process: the other waits forever
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            pytest.fail("the processes did not finish saving the adapter within 300 s (a collective in one rank?)")
    saved = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(lora_b) == 4  # q_proj and v_proj of both layers
    for key, tensor in lora_b.items():
        expected_name = key.replace(".weight", ".default.weight")  # PEFT drops the adapter name on save
        expected = torch.arange(tensor.numel(), dtype=torch.float32).reshape(tensor.shape) / 1000 + len(expected_name)
        assert tensor.dim() == 2 and tensor.shape[1] == 4 and torch.equal(tensor, expected), key
    lora_a = [v for k, v in saved.items() if "lora_A" in k]
    assert len(lora_a) == 4 and all(t.shape[0] == 4 and t.shape[1] == 64 for t in lora_a)


def test_gathered_adapter_without_renamed_modules_is_the_file_peft_writes(tiny_qwen3, tmp_path):
    """ZeRO-3 gathers the trained weights under the model's own names (no FSDP wrappers): the adapter written
    from them is byte for byte what PEFT's own save writes, without TRL's frozen reference copy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from grpoctl.train.distributed import save_gathered_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.add_adapter("ref", model.peft_config["default"])  # frozen, as TRL adds it
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_gathered_adapter(model, state, tmp_path / "gathered")
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=["default"])
    ours, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("gathered", "peft"))
    assert sorted(ours) == sorted(peft) and len(ours) == 8
    assert all(torch.equal(ours[k], peft[k]) for k in peft)


def test_fsdp_trains_with_torchs_adamw_as_its_checkpoint_cannot_gather_8bit_state(monkeypatch):
    """The recipe's 8-bit AdamW on a GPU with bitsandbytes, except under FSDP, whose checkpoint of the last step
    gathers the optimizer state across processes and fails on bitsandbytes' state (seen on two H200s after 20
    steps); an optimizer the user set is kept."""
    from grpoctl.train import backends

    monkeypatch.setattr(backends, "has_cuda", lambda: True)
    monkeypatch.setattr(backends, "has_module", lambda name: True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert backends.pick_optimizer("auto") == ("adamw_8bit", None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    optim, note = backends.pick_optimizer("auto")
    assert optim == "adamw_torch" and "FSDP" in note
    assert backends.pick_optimizer("adamw_8bit") == ("adamw_8bit", None)
