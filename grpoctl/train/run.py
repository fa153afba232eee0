"""``grpoctl train``: the seed's GRPO + LoRA recipe as one function, ``train(config) -> RunDir``.

Order matters for the user: everything that can be wrong with the input (config, rewards, plugins,
tracking credentials, backend, dataset columns, prompt lengths) is checked before the model weights load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from grpoctl.config import TrainConfig
from grpoctl.fsutil import staged_dir, staged_file
from grpoctl.rundir import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    HELD_OUT_FILE,
    METRICS_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    BaseModelRecord,
    ChatTemplateRecord,
    DataStats,
    GenerationRecord,
    ReasoningRecord,
    RunDir,
    RunRecord,
    checkpoint_dir,
    checkpoint_step,
    newest_checkpoint,
    training_hold,
)
from grpoctl.train import backends, distributed
from grpoctl.train.generation import Generation, pick_generation, vllm_version
from grpoctl.train.launchenv import is_main_process, launched_by_grpoctl, rank, world_size
from grpoctl.train.resume import check_output
from grpoctl.version import __version__, library_versions

# the libraries whose versions run.json records (the export's are in grpoctl.artifacts)
TRAINING_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "vllm")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _warmup_kwargs(ratio: float) -> dict[str, float]:
    """transformers 5 folded ``warmup_ratio`` into a fractional ``warmup_steps``; older releases have both."""
    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


def train(cfg: TrainConfig) -> RunDir:
    """Train a LoRA adapter with GRPO as ``cfg`` says and return the finished run directory.

    The process that writes the run (this one, or the launcher of distributed workers) holds it for the whole
    run (``grpoctl.rundir.training_hold``): an export refuses it meanwhile, a second training of it fails."""
    cfg.validate()
    writes_run = is_main_process() and not launched_by_grpoctl()
    with training_hold(Path(cfg.output_dir)) if writes_run else contextlib.nullcontext():
        return _train(cfg)


def _train(cfg: TrainConfig) -> RunDir:
    # transformers 5 renames (gradient_checkpointing -> activation_checkpointing) warn on every step of TRL
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    if cfg.distributed.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return distributed.launch(cfg)
    cfg = distributed.record_launch(cfg)
    visible = distributed.visible_gpus()  # before one process is restricted to one: a spare may serve vLLM
    gpu_note = distributed.one_gpu_for_one_process()  # before anything initialises CUDA
    if gpu_note:
        print(f"grpoctl: {gpu_note}", flush=True)

    from grpoctl.train.data import check_source, read_chat_template
    from grpoctl.train.rewards import RewardContext, build_rewards
    from grpoctl.train.tracking import check_tracking

    # Fail fast: names, plugins, credentials and a mistyped data path need no model (nor a Hub download).
    build_rewards(cfg.rewards.functions, cfg.rewards.weights, RewardContext("<think>", "</think>"))
    check_tracking(cfg.tracking)
    check_source(cfg.data.dataset)
    template = read_chat_template(cfg.model.chat_template) if cfg.model.chat_template else None

    backend = backends.pick_backend(cfg.trainer.backend)
    gen = pick_generation(cfg.trainer.generation, cfg.trainer.vllm_mode, backend, cuda=backends.has_cuda(),
                          vllm=vllm_version(), gpus=len(visible), processes=world_size(),
                          load_in_4bit=cfg.model.load_in_4bit)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must patch transformers/trl before anything imports them)

    out = Path(cfg.output_dir)
    # the launcher already checked and cleared `out`; under a plain `accelerate launch` rank 0 alone decides
    launched = launched_by_grpoctl() or not is_main_process()
    resume_from = check_output(cfg, out, launched)  # the old run is removed (--force) only once data is ready

    from transformers import AutoTokenizer

    from grpoctl.models import resolve_base_model
    from grpoctl.train.data import (
        find_reasoning_markers,
        hold_out,
        load_source,
        prepare,
        use_chat_template,
        write_held_out,
    )

    base = resolve_base_model(cfg.model.name, cfg.model.revision)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    replaced = template is not None and bool(getattr(tokenizer, "chat_template", None))
    if template is not None:
        use_chat_template(tokenizer, template, cfg.model.chat_template)
    markers = find_reasoning_markers(tokenizer, cfg.data.reasoning_start, cfg.data.reasoning_end)
    data = prepare(load_source(cfg.data.dataset, cfg.data.subset, cfg.data.split), tokenizer, cfg.data,
                   cfg.model.max_seq_length, cfg.trainer.max_prompt_length, cfg.trainer.max_completion_length)
    data.dataset, held_out = hold_out(data.dataset, cfg.data.held_out)
    ctx = RewardContext(markers.start, markers.end, markers.prefilled_start, cfg.rewards.language)
    reward_funcs, reward_weights = build_rewards(cfg.rewards.functions, cfg.rewards.weights, ctx)
    optim, optim_note = backends.pick_optimizer(cfg.trainer.optim)
    main = is_main_process()
    if main and not cfg.resume and not launched and cfg.force and out.is_dir():
        shutil.rmtree(out)

    say = print if main else (lambda *a, **k: None)
    say(f"grpoctl: backend {backend}, base {base.id}", flush=True)
    if resume_from is not None:
        say(f"grpoctl: resuming from {resume_from} (step {checkpoint_step(resume_from)} of "
            f"{cfg.trainer.max_steps})", flush=True)
    say(f"grpoctl: data {data.rows_kept}/{data.rows_total} prompts kept (<= {data.length_cutoff} tokens, "
        f"quantile {cfg.data.length_quantile}); max_prompt_length {data.max_prompt_length}, "
        f"max_completion_length {data.max_completion_length}"
        f"{f'; {len(held_out)} held out of training for task parity' if len(held_out) else ''}", flush=True)
    say(f"grpoctl: reasoning markers {markers.start!r}/{markers.end!r} from the {markers.source}"
        f"{' (opening marker pre-filled by the chat template)' if markers.prefilled_start else ''}", flush=True)
    if optim_note:
        say(f"grpoctl: {optim_note}", flush=True)
    say(f"grpoctl: {gen.line()}", flush=True)
    if template is not None:
        instead = " instead of the tokenizer's own" if replaced else ""
        say(f"grpoctl: chat template from {cfg.model.chat_template}{instead}; the adapter's tokenizer carries it",
            flush=True)

    loaded = backends.load(cfg, backend, base.path, vllm=gen.engine == "vllm")
    if template is not None:  # the tokenizer the trainer renders prompts with and the adapter folder saves
        use_chat_template(loaded.tokenizer, template, cfg.model.chat_template)
    resolved = cfg.to_dict()
    resolved["trainer"].update(backend=backend, optim=optim, max_prompt_length=data.max_prompt_length,
                               max_completion_length=data.max_completion_length, generation=gen.engine,
                               vllm_mode=gen.mode or cfg.trainer.vllm_mode)
    resolved["lora"]["gradient_checkpointing"] = backends.gradient_checkpointing(cfg, backend)
    record = RunRecord(
        grpoctl_version=__version__,
        backend=backend,
        generation=GenerationRecord(engine=gen.engine, vllm_mode=gen.mode, reason=gen.reason),
        base_model=BaseModelRecord(id=base.id, path=base.path, revision=base.revision),
        config={k: resolved[k] for k in ("model", "lora", "data", "rewards", "trainer", "tracking", "distributed")},
        chat_template=ChatTemplateRecord(
            source="file" if template is not None else "tokenizer", file=cfg.model.chat_template,
            sha256=hashlib.sha256(template.encode()).hexdigest() if template is not None else None),
        reasoning=ReasoningRecord(start=markers.start, end=markers.end, source=markers.source,
                                  prefilled_start=markers.prefilled_start),
        # values grpoctl computed rather than the user chose; a resumed run derives them again
        derived=[f"trainer.{k}" for k in ("max_prompt_length", "max_completion_length")
                 if getattr(cfg.trainer, k) is None] + (["trainer.optim"] if cfg.trainer.optim == "auto" else [])
                + (["trainer.backend"] if cfg.trainer.backend == "auto" else [])
                + [f"trainer.{k}" for k in ("generation", "vllm_mode") if getattr(cfg.trainer, k) == "auto"]
                + (["lora.gradient_checkpointing"] if cfg.lora.gradient_checkpointing is None else []),
        data_stats=DataStats(rows_total=data.rows_total, rows_kept=data.rows_kept, length_cutoff=data.length_cutoff,
                             rows_held_out=len(held_out)),
        reward_weights=dict(zip([f.__name__ for f in reward_funcs], reward_weights, strict=True)),
        libraries=library_versions(TRAINING_LIBRARIES),
        python=sys.version.split()[0],
    )
    created = not out.exists()
    previous_meta = (out / RUN_FILE).read_text() if resume_from is not None else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        record.save(out / RUN_FILE)
        if len(held_out):
            write_held_out(held_out, out / HELD_OUT_FILE)

    # the vLLM server of trainer.vllm_mode=server runs from before the trainer connects to it until training ends
    servers = contextlib.ExitStack()
    try:
        server_url = _start_generation_server(servers, cfg, gen, base.path, visible, out) if main else None
        trainer = _build_trainer(cfg, loaded, data, reward_funcs, reward_weights, optim, out, gen, server_url)
    except BaseException:
        servers.close()
        raise
    distributed.match_frozen_dtype(trainer.model)
    from grpoctl.train.callbacks import (
        CompletionSamples,
        GenerationProgress,
        MetricsCallback,
        ResumedSchedule,
        SignalWatch,
        StepProgress,
        SwanLabTracker,
    )

    metrics = MetricsCallback(out / METRICS_FILE)
    trainer.add_callback(metrics)
    trainer.add_callback(CompletionSamples(out / SAMPLES_FILE, cfg.tracking.sample_completions,
                                           lambda: getattr(trainer, "_logs", None), record.reward_weights))
    trainer.add_callback(ResumedSchedule())
    trainer.add_callback(GenerationProgress(loaded.model, data.max_completion_length))
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    if trainer.callback_handler.callbacks and any(isinstance(c, ProgressCallback)
                                                   for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StepProgress)
    # after the step line; tqdm.write keeps the warning clear of the progress bars
    watch = SignalWatch(data.max_completion_length, tqdm.write if main else (lambda line: None))
    trainer.add_callback(watch)
    tracker = None
    if cfg.tracking.mode != "none":
        tracker = SwanLabTracker(cfg.tracking, out / "swanlog", record.config, name=out.name)
        trainer.add_callback(tracker)

    started = time.time()
    first_step = checkpoint_step(resume_from) if resume_from else 0
    stop_reason = "max_steps"
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        servers.close()
        if tracker is not None:
            tracker.finish()
    step = trainer.state.global_step
    if stop_reason == "interrupted" and step <= first_step:
        # No step finished: the model holds nothing new (a fresh run: an all-zero LoRA), so nothing is saved.
        if resume_from is not None:
            if main and previous_meta is not None:
                with staged_file(out / RUN_FILE) as tmp:
                    tmp.write_text(previous_meta)
            say(f"\ngrpoctl: interrupted during step {first_step + 1}, before it finished: the run is unchanged "
                f"(still at step {first_step}, {resume_from.name}; adapter as before)", flush=True)
        elif main:
            shutil.rmtree(out, ignore_errors=True)
            if not created:
                out.mkdir(parents=True, exist_ok=True)
            say(f"\ngrpoctl: interrupted during step 1, before any step finished: nothing was trained, so no "
                f"checkpoint or adapter was written; removed what this run had written to {out}", flush=True)
        raise KeyboardInterrupt
    if stop_reason == "interrupted":
        say(f"\ngrpoctl: interrupted during step {step + 1}: saving checkpoint-{step} and the adapter as of step "
            f"{step} (continue with --resume)", flush=True)
    _save_checkpoint_if_needed(trainer)
    state = distributed.gathered_state_dict(trainer.model_wrapped)  # every process, where weights are sharded
    if main:
        _save_adapter(loaded, out / ADAPTER_DIR, base.path, state)
        trained = saved_adapter_moved(out / ADAPTER_DIR)
        _write_summary(out, trainer, metrics, started, stop_reason, first_step, resume_from,
                       flat_steps=watch.flat_steps, adapter_trained=trained)
        if verdict := watch.verdict(trained):
            say(verdict, flush=True)
    if stop_reason == "interrupted":
        raise KeyboardInterrupt
    return RunDir(out)


def saved_adapter_moved(adapter_dir: Path) -> bool:
    """Whether any lora_B in the written adapter left PEFT's all-zero start (else the adapter changes nothing).

    Read from the file rather than the model: under sharded training a rank's parameters are only its shard."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return any(bool(f.get_tensor(k).any()) for k in f.keys() if "lora_B" in k)


def _start_generation_server(stack: contextlib.ExitStack, cfg: TrainConfig, gen: Generation, model: str,
                             visible: list[str], out: Path) -> str | None:
    """For ``vllm_mode=server``: the server on the first GPU the training processes leave free; its URL."""
    if gen.mode != "server":
        return None
    from grpoctl.train.vllm_server import LOG_NAME, running_server

    gpu = visible[world_size()]
    return stack.enter_context(running_server(model, gpu, out / LOG_NAME,
                                              gpu_memory_utilization=cfg.model.gpu_memory_utilization,
                                              max_model_len=cfg.model.max_seq_length))


def _build_trainer(cfg: TrainConfig, loaded: Any, data: Any, reward_funcs: list, reward_weights: list[float],
                   optim: str, out: Path, gen: Generation, server_url: str | None = None) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**_grpo_args(cfg, loaded, data, reward_weights, optim, out, gen, server_url))
    return GRPOTrainer(model=loaded.model, processing_class=loaded.tokenizer, reward_funcs=reward_funcs,
                       args=args, train_dataset=data.dataset)


def _grpo_args(cfg: TrainConfig, loaded: Any, data: Any, reward_weights: list[float], optim: str, out: Path,
               gen: Generation, server_url: str | None = None) -> dict[str, Any]:
    """The GRPOConfig arguments of a run: the config's values, the generation engine's, the device's."""
    import torch

    t = cfg.trainer
    on_gpu = torch.cuda.is_available()
    amp = on_gpu and distributed.trainer_mixed_precision()
    dtype = next(loaded.model.parameters()).dtype
    kwargs: dict[str, Any] = dict(
        output_dir=str(out / CHECKPOINTS_DIR),
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=optim,
        logging_steps=t.logging_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        max_completion_length=data.max_completion_length,
        max_steps=t.max_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=t.seed,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k if t.top_k is not None else 0,
        min_p=t.min_p,
        beta=t.beta,
        reward_weights=reward_weights,
        report_to="none",
        gradient_checkpointing=backends.gradient_checkpointing(cfg, loaded.backend),
        bf16=amp and dtype == torch.bfloat16,
        fp16=amp and dtype == torch.float16,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **_warmup_kwargs(t.warmup_ratio),
    )
    if gen.engine == "vllm":
        kwargs["use_vllm"] = True
        if t.vllm_importance_sampling_correction is not None:
            kwargs["vllm_importance_sampling_correction"] = t.vllm_importance_sampling_correction
        if loaded.backend == "trl":
            kwargs.update(vllm_mode=gen.mode, vllm_max_model_length=cfg.model.max_seq_length)
            if gen.mode == "server":
                kwargs["vllm_server_base_url"] = server_url
            else:
                kwargs["vllm_gpu_memory_utilization"] = cfg.model.gpu_memory_utilization
    return kwargs


def _save_checkpoint_if_needed(trainer: Any) -> None:
    """A resumable checkpoint at the last step, also after Ctrl-C (transformers saves only every save_steps)."""
    step = trainer.state.global_step
    if step == 0:
        return
    ckpt = checkpoint_dir(Path(trainer.args.output_dir), step)
    if not ckpt.is_dir():
        trainer._save_checkpoint(trainer.model, trial=None)


def _save_adapter(loaded: Any, final: Path, base_path: str, state: dict[str, Any] | None = None) -> None:
    """PEFT adapter + tokenizer (chat template included), published in one rename; ``state`` holds the
    gathered weights where the strategy sharded them."""
    with staged_dir(final, force=True) as tmp:
        # TRL adds a frozen "ref" copy for the KL term when the adapter pre-exists; ship only the trained one
        if state is None:
            loaded.model.save_pretrained(str(tmp), selected_adapters=["default"])
        else:
            distributed.save_gathered_adapter(loaded.model, state, tmp)
        loaded.tokenizer.save_pretrained(str(tmp))
        cfg_file = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_file.read_text())
        # later stages find the base here; point at the exact local weights trained against
        adapter_cfg["base_model_name_or_path"] = base_path
        cfg_file.write_text(json.dumps(adapter_cfg, indent=2) + "\n")


def _write_summary(out: Path, trainer: Any, metrics: Any, started: float, stop_reason: str, first_step: int,
                   resume_from: Path | None, flat_steps: list[int], adapter_trained: bool) -> None:
    # the whole run, earlier sessions included when resumed
    hist = [m for m in RunDir(out).metrics() if "reward" in m]
    k = max(1, min(5, len(hist) // 2)) if hist else 0
    wall = time.time() - started
    session_steps = trainer.state.global_step - first_step
    summary = {
        "steps": trainer.state.global_step,
        "steps_this_session": trainer.state.global_step - first_step,
        "max_steps": trainer.args.max_steps,
        "stop_reason": stop_reason,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_time_s": round(wall, 2),
        "steps_per_s": round(session_steps / wall, 4) if wall > 0 else None,
        "peak_gpu_memory_mb": _peak_gpu_memory_mb(),
        "first_reward": hist[0]["reward"] if hist else None,
        "last_reward": hist[-1]["reward"] if hist else None,
        "mean_reward_first": sum(m["reward"] for m in hist[:k]) / k if k else None,
        "mean_reward_last": sum(m["reward"] for m in hist[-k:]) / k if k else None,
        "window": k,
        "world_size": world_size(),
        "written_by_rank": rank(),
        "process_group_backend": _process_group_backend(),
        "checkpoint": str(newest_checkpoint(out / CHECKPOINTS_DIR) or ""),
        # steps of this session on which no prompt's completions scored differently (nothing to learn from)
        "steps_without_reward_variance": flat_steps,
        "adapter_trained": adapter_trained,
    }
    _write_json(out / SUMMARY_FILE, summary)


def _peak_gpu_memory_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _process_group_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
