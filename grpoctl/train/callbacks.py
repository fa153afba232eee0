"""Per-step metrics, progress lines, a learning-signal watch and SwanLab tracking, as transformers
``TrainerCallback``s.

transformers' own ``SwanLabCallback`` crashes with swanlab 0.10 ("No active Run. Call swanlab.init()
first."), so the run is driven here with swanlab's public ``init``/``log``/``finish``. Only the main
process writes files or talks to SwanLab, so multi-process runs keep one metrics file and one run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.generation.streamers import BaseStreamer
from transformers.trainer_callback import ProgressCallback

from grpoctl.config import TrackingConfig

_SWANLAB_MODE = {"cloud": "online", "local": "local", "offline": "offline"}


def step_metrics(logs: dict[str, Any], step: int) -> dict[str, Any]:
    """The subset of TRL's log dict grpoctl records, under stable names."""
    out: dict[str, Any] = {"step": step}
    for key, value in logs.items():
        if not isinstance(value, (int, float)):
            continue
        if key in ("reward", "reward_std", "kl", "loss", "learning_rate", "grad_norm", "entropy", "epoch",
                   "frac_reward_zero_std"):
            out[key] = value
        elif key.startswith("rewards/") and key.endswith("/mean"):
            out.setdefault("rewards", {})[key[len("rewards/"):-len("/mean")]] = value
        elif key == "completions/mean_length":
            out["completion_length"] = value
        elif key == "completions/clipped_ratio":
            out["clipped_ratio"] = value
        elif key == "sampling/sampling_logp_difference/mean":
            # vLLM generation: how far vLLM's log-probabilities of its samples are from the trained policy's
            # (kernel noise when vLLM holds the current weights; it grows with every step if they are stale)
            out["vllm_logp_diff"] = value
    return out


def format_step(m: dict[str, Any], max_steps: int) -> str:
    def f(key: str, fmt: str = ".3f") -> str:
        return format(m[key], fmt) if key in m else "-"

    per = " ".join(f"{k}={v:.2f}" for k, v in (m.get("rewards") or {}).items())
    return (f"step {m['step']}/{max_steps}  reward {f('reward')}  kl {f('kl', '.5f')}  "
            f"completion_len {f('completion_length', '.1f')}  [{per}]")


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per logged training step to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        m = step_metrics(logs, state.global_step)
        self.last = m
        self.history.append(m)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(m) + "\n")


def _text(value: Any) -> str:
    """A prompt or completion as TRL logs it (plain text, or chat messages) as text: the last message's content."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def pick_samples(logged: dict[str, Any], weights: dict[str, float], keep: int) -> list[dict[str, Any]]:
    """``keep`` of the completions in TRL's completion log (``GRPOTrainer._logs``: prompt, completion, rewards per
    function, advantages), spread over the range of their total reward: the best first, the worst last, so a
    step's samples show what was reinforced and what was pushed down."""
    prompts, completions = list(logged.get("prompt") or []), list(logged.get("completion") or [])
    per_func = {name: list(values) for name, values in (logged.get("rewards") or {}).items()}
    advantages = list(logged.get("advantages") or [])
    n = min(len(prompts), len(completions))
    if keep <= 0 or n == 0:
        return []

    def number(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    rows = []
    for i in range(n):
        rewards = {name: number(values[i]) if i < len(values) else None for name, values in per_func.items()}
        scored = [weights.get(name, 1.0) * v for name, v in rewards.items() if v is not None]
        rows.append({"prompt": _text(prompts[i]), "completion": _text(completions[i]),
                     "reward": sum(scored) if scored else None, "rewards": rewards,
                     "advantage": number(advantages[i]) if i < len(advantages) else None})
    ranked = sorted(range(n), key=lambda i: (rows[i]["reward"] is None, -(rows[i]["reward"] or 0.0), i))
    if keep >= n:
        picks = ranked
    elif keep == 1:
        picks = ranked[:1]
    else:
        picks = [ranked[round(j * (n - 1) / (keep - 1))] for j in range(keep)]
    return [rows[i] for i in picks]


class CompletionSamples(TrainerCallback):
    """Appends ``keep`` completions of each logged step, with their rewards, to ``samples.jsonl`` (main process).

    TRL keeps the prompts, completions and per-function rewards of the latest generation batch for its own
    completion tables (``GRPOTrainer._logs``, filled in ``_generate_and_score_completions``, read in ``log``
    right after the callbacks' ``on_log``); ``logged`` returns that record, or None where a trainer keeps none,
    and then nothing is written. The file grows by at most ``keep`` records a logged step."""

    def __init__(self, path: Path, keep: int, logged: Callable[[], dict[str, Any] | None],
                 weights: dict[str, float]) -> None:
        self.path = Path(path)
        self.keep = keep
        self.logged = logged
        self.weights = weights

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if self.keep <= 0 or not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        record = self.logged()
        samples = pick_samples(record, self.weights, self.keep) if isinstance(record, dict) else []
        if samples:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "samples": samples}, ensure_ascii=False) + "\n")


class StepProgress(ProgressCallback):
    """transformers' progress bar, printing one compact reward/KL/length line per step instead of raw dicts."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = (format_step(step_metrics(logs, state.global_step), state.max_steps) if "reward" in logs
                else None)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


class TokenProgress(BaseStreamer):
    """A ``generate()`` streamer that moves a tqdm bar one step per generated token.

    ``generate`` first hands over the prompt, then one token (for the whole batch) per decoding step,
    then calls ``end``. One instance can serve several ``generate`` calls: each call counts for
    ``per_call`` positions on the bar, so a call that stops early at EOS still moves the bar to its end.
    """

    def __init__(self, bar: Any, per_call: int) -> None:
        self.bar = bar
        self.per_call = per_call
        self._prompt = True
        self._done = 0

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        if self._done < self.per_call:
            self._done += 1
            self.bar.update(1)

    def end(self) -> None:
        self.bar.update(self.per_call - self._done)
        self._prompt, self._done = True, 0


class GenerationProgress(TrainerCallback):
    """A bar inside each step while TRL generates the completions, with tokens/s and an ETA.

    Generation is most of a GRPO step on a CPU, and transformers' own bar moves only when a step ends, so
    without this the first step (often minutes) shows nothing. TRL calls ``model.generate`` without a
    streamer; the model's ``generate`` is wrapped to pass one. vLLM generation (unsloth) does not go
    through it and shows no bar.
    """

    def __init__(self, model: Any, max_new_tokens: int) -> None:
        from tqdm.auto import tqdm

        self.label = "generating"
        self.enabled = True
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled or kwargs.get("streamer") is not None:
                return original(*args, **kwargs)
            bar = tqdm(total=max_new_tokens, desc=self.label, unit="tok", leave=False, dynamic_ncols=True)
            try:
                return original(*args, streamer=TokenProgress(bar, max_new_tokens), **kwargs)
            finally:
                bar.close()

        model.generate = generate

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.enabled = state.is_world_process_zero

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.label = f"step {state.global_step + 1}/{state.max_steps} generating"


class ResumedSchedule(TrainerCallback):
    """On ``--resume`` with a new ``max_steps``, the first resumed step uses the new schedule's learning rate.

    The restored optimizer holds the learning rate the old schedule set for its next step; once a linear
    schedule has run its course that is 0, so the first step of ``--resume --max-steps N`` on a finished run
    would not train at all (and a one-step extension would leave the adapter byte for byte the same). The
    scheduler itself already counts with the new ``max_steps``; its rate for this step is written back.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                       **kw: Any) -> None:
        from torch.optim.lr_scheduler import LambdaLR

        if state.global_step == 0 or optimizer is None or not isinstance(lr_scheduler, LambdaLR):
            return
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas,
                                       strict=True):
            group["lr"] = base * factor(lr_scheduler.last_epoch)


# Consecutive steps without any reward variance before the run is called stalled.
STALL_STEPS = 3


def no_reward_variance(m: dict[str, Any]) -> bool:
    """No prompt's completions scored differently: TRL's ``frac_reward_zero_std`` is 1 (else ``reward_std`` 0)."""
    if "frac_reward_zero_std" in m:
        return math.isclose(m["frac_reward_zero_std"], 1.0)
    return "reward_std" in m and math.isclose(m["reward_std"], 0.0, abs_tol=1e-12)


def stall_causes(steps: list[dict[str, Any]], max_completion_length: int) -> str:
    """The likely reasons rewards did not vary on ``steps`` (metrics lines), as one sentence for the user."""
    clipped = [m["clipped_ratio"] for m in steps if "clipped_ratio" in m]
    causes = []
    if clipped and min(clipped) >= 0.99:
        causes.append(f"every completion was cut at max_completion_length {max_completion_length} tokens "
                      "(clipped_ratio 1.00) before it could reach the answer format: raise "
                      "trainer.max_completion_length (and model.max_seq_length if the budget is what is left of it)")
    last = steps[-1].get("rewards") or {}
    scores = " ".join(f"{k}={v:.2f}" for k, v in last.items())
    causes.append("rewards that cannot separate these samples: each one gave every completion of a prompt the "
                  f"same score ({scores}); use rewards with partial credit, or more varied completions "
                  "(trainer.num_generations, trainer.temperature)")
    return "; or ".join(causes)


class SignalWatch(TrainerCallback):
    """Warns as soon as GRPO has nothing to learn from, instead of letting the run finish looking fine.

    GRPO's advantage is a reward minus the mean of its group: when every completion of every prompt scores
    the same, every advantage is zero, the gradient is zero and the LoRA does not move (its B matrices
    stay exactly zero from the start). ``STALL_STEPS`` such steps in a row (or all steps of a shorter run)
    print one warning with the likely causes; ``flat_steps`` feeds the summary.
    """

    def __init__(self, max_completion_length: int, say: Callable[[str], None]) -> None:
        self.max_completion_length = max_completion_length
        self.say = say
        self.flat: list[dict[str, Any]] = []  # metrics of the steps without reward variance
        self.steps = 0
        self._streak: list[dict[str, Any]] = []
        self.warned = False

    @property
    def flat_steps(self) -> list[int]:
        return [m["step"] for m in self.flat]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        m = step_metrics(logs, state.global_step)
        self.steps += 1
        if not no_reward_variance(m):
            self._streak = []
            return
        self.flat.append(m)
        self._streak.append(m)
        if not self.warned and len(self._streak) >= min(STALL_STEPS, state.max_steps):
            self.warned = True
            still = all(m.get("grad_norm", 0.0) == 0.0 for m in self._streak)
            effect = ("the adapter is not learning (grad_norm 0)" if still
                      else "the rewards teach the adapter nothing (only the KL penalty moves it)")
            self.say(f"grpoctl: warning: for {len(self._streak)} steps in a row no prompt's completions got "
                     "different rewards (reward_std 0, frac_reward_zero_std 1.0), so every advantage is zero and "
                     f"{effect}. Likely causes: {stall_causes(self._streak, self.max_completion_length)}")

    def verdict(self, adapter_trained: bool) -> str | None:
        """The end-of-run warning when the adapter is untrained or most steps taught it nothing, else None."""
        flat, steps = len(self.flat), self.steps
        if adapter_trained and 2 * flat < steps:
            return None
        # the warning during the run already listed the causes
        causes = "as above" if self.warned else (stall_causes(self.flat, self.max_completion_length) if flat else "")
        if adapter_trained:
            return (f"grpoctl: warning: on {flat} of {steps} steps no prompt's completions got different rewards, "
                    f"so those steps taught the adapter nothing. Likely causes: {causes}")
        if flat and flat == steps:
            return (f"grpoctl: warning: the adapter was never trained: every lora_B is still zero because on all "
                    f"{flat} step(s) no prompt's completions got different rewards, so GRPO had nothing to learn "
                    f"from (`grpoctl export` will refuse this adapter). Likely causes: {causes}")
        return (f"grpoctl: warning: the adapter was never trained: every lora_B is still zero ({flat} of {steps} "
                "steps had no reward variance); check trainer.learning_rate (`grpoctl export` will refuse this "
                "adapter)")


class SwanLabTracker(TrainerCallback):
    """SwanLab run driven through its public API; one run per training, opened by the main process."""

    def __init__(self, cfg: TrackingConfig, logdir: Path, config: dict[str, Any], name: str) -> None:
        self.cfg = cfg
        self.logdir = Path(cfg.logdir) if cfg.logdir else Path(logdir)
        self.config = config
        self.name = cfg.experiment or name
        self.run: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero or self.run is not None:
            return
        import swanlab

        self.logdir.mkdir(parents=True, exist_ok=True)
        self.run = swanlab.init(project=self.cfg.project, name=self.name, mode=_SWANLAB_MODE[self.cfg.mode],
                                log_dir=str(self.logdir), config=self.config, reinit=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if self.run is None or not logs:
            return
        import swanlab

        data = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        if data:
            swanlab.log(data, step=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.finish()

    def finish(self) -> None:
        if self.run is None:
            return
        import swanlab

        swanlab.finish()
        self.run = None
