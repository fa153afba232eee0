"""Backends: plain TRL + PEFT (CPU or GPU) and Unsloth (GPU, vLLM generation when installed).

Both return a PEFT-wrapped model and its tokenizer for the same config; the trainer code does not care
which one built them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from grpoctl.config import TrainConfig
from grpoctl.errors import DependencyError
from grpoctl.train.distributed import check_strategy
from grpoctl.train.launchenv import running_strategy


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pick_backend(requested: str) -> str:
    """``auto`` is unsloth on a CUDA GPU with unsloth installed, else trl; an explicit unsloth must be possible.

    Under several processes unsloth trains only as DDP (a whole model per GPU), so ``auto`` is trl when
    accelerate shards the weights (FSDP, ZeRO)."""
    if requested == "trl":
        return "trl"
    cuda = has_cuda()
    unsloth = has_module("unsloth")
    strategy = running_strategy()
    if requested == "unsloth":
        if not cuda:
            raise DependencyError("--backend unsloth needs an NVIDIA GPU with CUDA (none found); use --backend trl "
                                  "to train on CPU, or run on a GPU machine with `pip install 'grpoctl[gpu]'`")
        if not unsloth:
            raise DependencyError("--backend unsloth needs unsloth: pip install 'grpoctl[gpu]' "
                                  "(unsloth, plus vllm for fast generation)")
        if strategy is not None:
            check_strategy(strategy, "unsloth", load_in_4bit=False)
        return "unsloth"
    return "unsloth" if cuda and unsloth and strategy in (None, "ddp") else "trl"


def gradient_checkpointing(cfg: TrainConfig, backend: str) -> bool:
    """``lora.gradient_checkpointing`` resolved: unset means on with unsloth, whose "unsloth" mode offloads the
    saved activations to CPU (the tutorial's setting, for memory), and off with trl, where transformers'
    checkpointing recomputes them at a cost in step time."""
    value = cfg.lora.gradient_checkpointing
    return backend == "unsloth" if value is None else bool(value)


def gpu_index() -> int:
    """This process's GPU: its ``LOCAL_RANK`` under a launcher (one GPU per process), else the first visible."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_optimizer(requested: str) -> tuple[str, str | None]:
    """The seed's 8-bit AdamW needs bitsandbytes on CUDA; elsewhere plain AdamW, and the reason is returned."""
    if requested != "auto":
        return requested, None
    # FSDP gathers the optimizer state into the last step's checkpoint and fails on bitsandbytes' 8-bit state
    # (seen on two GPUs: "Expected all tensors to be on the same device"); torch's AdamW keeps its step on the CPU
    fsdp = running_strategy() == "fsdp"
    if has_cuda() and has_module("bitsandbytes") and not fsdp:
        return "adamw_8bit", None
    why = ("FSDP cannot gather its 8-bit state into a checkpoint" if fsdp else
           "no CUDA GPU" if not has_cuda() else "bitsandbytes is not installed")
    return "adamw_torch", f"optimizer adamw_torch instead of the recipe's adamw_8bit ({why})"


@dataclass
class Loaded:
    model: Any  # a PeftModel
    tokenizer: Any
    backend: str
    fast_inference: bool


def _dtype(cfg: TrainConfig) -> Any:
    import torch

    if cfg.model.dtype != "auto":
        try:
            return getattr(torch, cfg.model.dtype)
        except AttributeError:
            from grpoctl.errors import ConfigError

            raise ConfigError(f"model.dtype {cfg.model.dtype!r} is not a torch dtype "
                              "(bfloat16, float16, float32)") from None
    if has_cuda():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU kernels for bf16 training are slow and lossy for tiny LoRA updates; float32 is the safe CPU choice
    return torch.float32


def load_trl(cfg: TrainConfig, model_path: str) -> Loaded:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": _dtype(cfg)}
    if has_cuda():
        # every process on its own GPU: FSDP refuses a model on another rank's device, and 4-bit weights
        # are quantized where they are loaded
        torch.cuda.set_device(gpu_index())
    if cfg.model.load_in_4bit:
        if not has_cuda() or not has_module("bitsandbytes"):
            raise DependencyError("model.load_in_4bit needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
                                  "set model.load_in_4bit=false on CPU")
        strategy = running_strategy()
        if strategy is not None:
            check_strategy(strategy, "trl", load_in_4bit=True)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"],
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": gpu_index()}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if has_cuda() and not cfg.model.load_in_4bit:
        model = model.to(f"cuda:{gpu_index()}")
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model,
                                                use_gradient_checkpointing=gradient_checkpointing(cfg, "trl"))
    torch.manual_seed(cfg.trainer.seed)  # LoRA A init is random: the seed's random_state
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias,
                      use_rslora=cfg.lora.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    _ensure_pad(tokenizer)
    return Loaded(model=model, tokenizer=tokenizer, backend="trl", fast_inference=False)


def load_unsloth(cfg: TrainConfig, model_path: str, fast: bool) -> Loaded:
    """``fast``: Unsloth's ``fast_inference``, its vLLM engine in this process generating with the LoRA weights
    being trained (shared in GPU memory, not copied)."""
    # unsloth must be imported before trl/transformers/peft so its patches apply
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    kwargs: dict[str, Any] = {
        "model_name": model_path, "max_seq_length": cfg.model.max_seq_length,
        "load_in_4bit": cfg.model.load_in_4bit, "fast_inference": fast,
    }
    if fast:
        kwargs.update(max_lora_rank=cfg.lora.r, gpu_memory_utilization=cfg.model.gpu_memory_utilization)
    if cfg.model.dtype != "auto":
        kwargs["dtype"] = _dtype(cfg)
    model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, target_modules=list(cfg.lora.target_modules), lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing(cfg, "unsloth") else False,
        random_state=cfg.trainer.seed)
    _ensure_pad(tokenizer)
    return Loaded(model=model, tokenizer=tokenizer, backend="unsloth", fast_inference=bool(fast))


def _ensure_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load(cfg: TrainConfig, backend: str, model_path: str, vllm: bool = False) -> Loaded:
    """The PEFT model and tokenizer; ``vllm``: generation will run through vLLM (Unsloth loads its engine)."""
    return load_unsloth(cfg, model_path, vllm) if backend == "unsloth" else load_trl(cfg, model_path)
