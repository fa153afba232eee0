"""Task parity: does each GGUF still do the task the run was trained on? Measured with the run's own rewards.

The KL parity (``grpoctl.export.parity``) is teacher-forced on fixed probes: it sees the next-token
distributions, never an answer the file writes by itself. Here both sides write answers:

    held-out prompts of the run's data (RUN/held_out.jsonl, which training never saw; or --eval-data FILE)
      -> the reference (base + adapter applied by PEFT, float32, the trained tokenizer's chat template)
         answers each one greedily, up to the run's completion length
      -> each GGUF answers the same messages greedily in llama.cpp (llama-cpp-python's chat completion with
         the chat template and end-of-generation tokens the file itself carries)
      -> the run's reward functions (the built-in ones and plugins, with the run's weights) score every answer

Per file: the mean weighted reward and each reward's mean, the share of answers identical to the reference's,
and the paired difference in weighted reward (file minus reference, per prompt) with a bootstrap 95%
interval. A drop is significant when the whole interval lies below zero; the optional gate fails such a file.
The prompt count is small by default (the answers cost a forward pass per token on a CPU); on a GPU more.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.artifacts import ParityResult, ParitySection, RewardDifference, TaskReference, TaskResult, TaskSection
from grpoctl.errors import ConfigError, DataError, UsageError
from grpoctl.export.reference_cache import ModelWork
from grpoctl.rundir import RunDir

CPU_PROMPTS = 8  # greedy answers on 2 CPU cores: each prompt costs one pass per answer token on every side
GPU_PROMPTS = 32
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 3407
LEVEL = 0.95
EXAMPLES = 3  # answers written into parity.json per side (all of them are scored)


@dataclass(frozen=True)
class TaskRequest:
    """What the export options ask of task parity (``ExportOptions.eval_data/task_prompts/task_gate``)."""

    eval_data: Path | None = None  # held-out prompts to use instead of the run's held-out split
    prompts: int | None = None  # how many; None: CPU_PROMPTS (GPU_PROMPTS on a GPU); 0: no task parity
    gate: bool = False  # fail a file whose reward drop is significant

    def check(self) -> None:
        """Bad options fail before any heavy work."""
        if self.prompts is not None and self.prompts < 0:
            raise UsageError("--task-prompts must be 0 (no task parity) or more")
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            from grpoctl.errors import InputNotFoundError

            raise InputNotFoundError(f"--eval-data {self.eval_data} does not exist")
        if self.gate and self.prompts == 0:
            raise UsageError("--task-gate needs task parity; drop --task-prompts 0")


@dataclass
class TaskSet:
    """The prompts both sides answer, the columns the rewards read, and the rewards."""

    prompts: list[list[dict[str, str]]]
    columns: dict[str, list[Any]]
    source: str
    funcs: list[Any]
    weights: list[float]
    max_new_tokens: int
    budget_note: str | None = None

    @property
    def names(self) -> list[str]:
        return [f.__name__ for f in self.funcs]


def prompt_count(request: TaskRequest, cuda: bool) -> int:
    return request.prompts if request.prompts is not None else (GPU_PROMPTS if cuda else CPU_PROMPTS)


def load_task_set(request: TaskRequest, run: RunDir | None, tokenizer_dir: Path, cuda: bool) -> TaskSet | str:
    """The held-out prompts and the run's rewards; a string saying why there are none (then task parity is
    skipped and the report says so: the export the user asked for does not depend on it)."""
    from transformers import AutoTokenizer

    from grpoctl.config import DataConfig, RewardsConfig
    from grpoctl.train.data import find_reasoning_markers, load_source, map_rows
    from grpoctl.train.evaluate import CPU_MAX_NEW_TOKENS, completion_budget
    from grpoctl.train.rewards import RewardContext, build_rewards

    count = prompt_count(request, cuda)
    if count == 0:
        return "--task-prompts 0"
    dcfg = run.data_config() if run is not None else DataConfig()
    if request.eval_data is not None:
        rows = map_rows(load_source(str(request.eval_data)), dcfg)
        source = f"{request.eval_data} (--eval-data)"
    elif run is not None and run.held_out_file.is_file():
        rows = _read_held_out(run.held_out_file)
        source = f"{run.held_out_file.name}: prompts the run held out of training"
    elif run is not None:
        return ("the run records no held-out prompts (trained before grpoctl held some out, or with data.held_out "
                "= 0); pass --eval-data FILE with prompts training never saw")
    else:
        return "an adapter folder records no training data; pass --eval-data FILE with prompts it never saw"
    rows = list(rows)[:count]
    if not rows:
        return f"{source} holds no prompts"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if run is not None:
        markers = run.reasoning_markers or (dcfg.reasoning_start, dcfg.reasoning_end)
        prefilled = run.prefilled_start
        rewards = run.section("rewards")
        functions = rewards.get("functions") or RewardsConfig().functions
        weights, language = rewards.get("weights") or {}, rewards.get("language", RewardsConfig().language)
        max_new, note = completion_budget(run, None, cuda)
    else:
        found = find_reasoning_markers(tokenizer, dcfg.reasoning_start, dcfg.reasoning_end)
        markers, prefilled = (found.start, found.end), found.prefilled_start
        functions, weights, language = RewardsConfig().functions, {}, RewardsConfig().language
        max_new, note = CPU_MAX_NEW_TOKENS, None
    try:
        funcs, out_weights = build_rewards(functions, weights,
                                           RewardContext(markers[0], markers[1], prefilled, language))
    except ConfigError as err:  # a plugin of the run that does not import here: the export does not need it
        return f"the run's rewards cannot be loaded here: {err}"
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
    return TaskSet(prompts=[r["prompt"] for r in rows], columns=columns, source=source, funcs=funcs,
                   weights=out_weights, max_new_tokens=max_new, budget_note=note)


def _read_held_out(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n} is not JSON; the run's held-out prompts were changed by hand") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), list):
            raise DataError(f"{path}:{n} holds no chat prompt; the run's held-out prompts were changed by hand")
        rows.append(row)
    return rows


# --- answers -------------------------------------------------------------------------------------

def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False, dynamic_ncols=True)


def reference_answers(model: Any, tokenizer: Any, task: TaskSet, eot_ids: list[int], device: str) -> list[str]:
    """Greedy answers of the reference (``model``, in float32), prompts rendered by the trained tokenizer's
    template and tokenized as training tokenized them (the template writes every special token)."""
    import torch

    from grpoctl.train.callbacks import TokenProgress

    answers = []
    with _bar(len(task.prompts) * task.max_new_tokens, "task parity: transformers") as bar, torch.no_grad():
        streamer = TokenProgress(bar, task.max_new_tokens)
        for messages in task.prompts:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=task.max_new_tokens, eos_token_id=eot_ids or None,
                                 pad_token_id=(eot_ids or [0])[0], streamer=streamer)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def gguf_answers(path: Path, task: TaskSet, threads: int | None = None) -> list[str] | None:
    """Greedy answers of one GGUF in llama.cpp: llama-cpp-python's chat completion with the chat template the
    file carries (``chat_template.default``: the handler llama-cpp-python builds from the file's template, BOS/EOS
    texts and EOS id, never a built-in format it might guess), ending where the file's vocabulary ends a turn.
    None when the file carries no chat template."""
    import llama_cpp
    from gguf.constants import Keys

    from grpoctl.threads import default_threads

    llm = llama_cpp.Llama(str(path), n_ctx=_context(task), n_batch=512, verbose=False, use_mmap=True,
                          n_threads=threads or default_threads(), chat_format="chat_template.default")
    try:
        if not llm.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE):
            return None
        answers = []
        with _bar(len(task.prompts) * task.max_new_tokens, f"task parity: {path.name}") as bar:
            for messages in task.prompts:
                llm.reset()
                parts: list[str] = []
                for chunk in llm.create_chat_completion(messages=messages, max_tokens=task.max_new_tokens,
                                                        temperature=0.0, top_k=1, stream=True):
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        parts.append(delta)
                        if len(parts) <= task.max_new_tokens:
                            bar.update(1)
                bar.update(max(0, task.max_new_tokens - len(parts)))
                answers.append("".join(parts).strip())
    finally:
        llm.close()
    return answers


def _context(task: TaskSet) -> int:
    return 2048 + task.max_new_tokens


# --- scores --------------------------------------------------------------------------------------

def score(task: TaskSet, answers: list[str], tokenizer: Any) -> dict[str, list[float]]:
    """Every reward of the run on every answer, called as TRL calls them in training (plugins included)."""
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    out: dict[str, list[float]] = {}
    for f in task.funcs:
        values = f(prompts=task.prompts, completions=completions, completion_ids=ids, **task.columns)
        out[f.__name__] = [float(v) if v is not None else math.nan for v in values]
    return out


def totals(task: TaskSet, scores: dict[str, list[float]]) -> list[float]:
    """The weighted reward of each answer, as training added them up."""
    return [sum(w * scores[name][i] for name, w in zip(task.names, task.weights, strict=True))
            for i in range(len(task.prompts))]


def bootstrap_interval(diffs: list[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``diffs`` (prompts resampled with replacement)."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary(task: TaskSet, scores: dict[str, list[float]]) -> dict[str, Any]:
    return {"mean_reward": round(_mean(totals(task, scores)), 4),
            "rewards": {name: round(_mean(v), 4) for name, v in scores.items()}}


def compare(task: TaskSet, ref_answers: list[str], ref_scores: dict[str, list[float]], answers: list[str],
            scores: dict[str, list[float]], gate: bool) -> dict[str, Any]:
    """One file against the reference: its rewards, agreement, the paired difference and whether it passes."""
    diffs = [a - b for a, b in zip(totals(task, scores), totals(task, ref_scores), strict=True)]
    low, high = bootstrap_interval(diffs)
    drop = high < 0
    return {**summary(task, scores),
            "agreement": round(sum(a == r for a, r in zip(answers, ref_answers, strict=True)) / len(answers), 4),
            "difference": {"mean": round(_mean(diffs), 4), "low": round(low, 4), "high": round(high, 4)},
            "significant_drop": bool(drop), "passed": not (gate and drop),
            "examples": answers[:EXAMPLES]}


# --- one export's task parity ----------------------------------------------------------------------

ANSWERS_FORMAT = 1  # of the reference's answers kept with the parity reference; a new format is another key


class TaskParity:
    """Task parity for one GGUF export: the reference answers while the parity reference is loaded, or its answers
    are kept from an earlier export of the same base, adapter and prompts (``reference_work``), then each file
    answers (``measure``); ``section`` is what parity.json records."""

    def __init__(self, request: TaskRequest, task: TaskSet | None, skipped: str | None) -> None:
        self.request, self.task, self.skipped = request, task, skipped
        self.ref_answers: list[str] = []
        self.ref_scores: dict[str, list[float]] = {}
        self.tokenizer: Any = None
        self.ref_seconds = 0.0
        self.ref_kept = False

    @classmethod
    def prepare(cls, request: TaskRequest | None, run: RunDir | None, tokenizer_dir: Path, streamed: bool,
                device: str) -> TaskParity | None:
        request = request or TaskRequest()
        cuda = device.startswith("cuda")
        if prompt_count(request, cuda) == 0:
            return None
        if streamed and not cuda:
            return cls(request, None, "the reference streams its weights from disk on this CPU, so each answer "
                                      "token would read the whole model again; task parity needs the model in memory "
                                      "(a GPU, or more RAM)")
        found = load_task_set(request, run, tokenizer_dir, cuda)
        return cls(request, None, found) if isinstance(found, str) else cls(request, found, None)

    def reference_work(self) -> ModelWork | None:
        """The reference's greedy answers as work on the loaded parity reference, kept with it in the cache: they
        depend on the model, tokenizer and end-of-turn ids (the reference's key) and on the prompts and the answer
        length (this key). The scores are not kept: the run's rewards (plugins included) score them each time."""
        if self.task is None:
            return None
        task = self.task
        start = time.perf_counter()

        def compute(model: Any, tokenizer: Any, eot_ids: list[int], device: str) -> list[str]:
            nonlocal start
            start = time.perf_counter()
            return reference_answers(model, tokenizer, task, eot_ids, device)

        def use(answers: list[str], tokenizer: Any, kept: bool) -> None:
            scoring = time.perf_counter()
            self.tokenizer, self.ref_answers, self.ref_kept = tokenizer, list(answers), kept
            try:
                self.ref_scores = score(task, self.ref_answers, tokenizer)
            except Exception as err:  # a plugin's own failure: the export does not depend on task parity
                self.task, self.skipped = None, f"a reward function failed on the answers: {type(err).__name__}: {err}"
            self.ref_seconds = round(time.perf_counter() - (scoring if kept else start), 2)

        return ModelWork(name="task-answers", key={"format": ANSWERS_FORMAT, "prompts": task.prompts,
                                                   "max_new_tokens": task.max_new_tokens},
                         compute=compute, use=use)

    def measure(self, files: dict[str, ParityResult], paths: dict[str, Path], say: Callable[[str], None]) -> None:
        """Answer with every file and add its ``task`` record to ``files`` (gated: ``passed`` too)."""
        if self.task is None:
            return
        for i, (name, path) in enumerate(paths.items(), 1):
            say(f"task parity: {name} answers {len(self.task.prompts)} held-out prompts in llama.cpp "
                f"(file {i}/{len(paths)}, up to {self.task.max_new_tokens} tokens each)")
            start = time.perf_counter()
            answers = gguf_answers(path, self.task)
            if answers is None:  # the tokenizer checks fail this file already and say why
                say(f"task parity: {name} carries no chat template, so llama.cpp cannot answer a chat; not measured")
                continue
            record = compare(self.task, self.ref_answers, self.ref_scores, answers,
                             score(self.task, answers, self.tokenizer), self.request.gate)
            difference = RewardDifference(**record.pop("difference"))
            files[name].task = TaskResult(**record, difference=difference,
                                          seconds=round(time.perf_counter() - start, 2))
            files[name].passed = bool(files[name].passed and record["passed"])

    def section(self) -> TaskSection:
        """How task parity ran and the reference's scores, or why it did not run."""
        if self.task is None:
            return TaskSection(skipped=self.skipped)
        t = self.task
        return TaskSection(source=t.source, prompts=len(t.prompts), max_new_tokens=t.max_new_tokens,
                           max_new_tokens_note=t.budget_note, weights=dict(zip(t.names, t.weights, strict=True)),
                           level=LEVEL, resamples=BOOTSTRAP_RESAMPLES, gate=self.request.gate,
                           reference=TaskReference(**summary(t, self.ref_scores),
                                                   examples=self.ref_answers[:EXAMPLES], seconds=self.ref_seconds,
                                                   kept=self.ref_kept),
                           questions=[p[-1]["content"] for p in t.prompts[:EXAMPLES]])


def format_rows(rep: ParitySection) -> list[str]:
    """Lines under the parity table: the reference's rewards, then per file its rewards, agreement and the
    paired difference with its interval (``!`` marks a significant drop)."""
    sec = rep.task
    if not sec:
        return []
    if sec.skipped:
        return [f"task parity skipped: {sec.skipped}"]
    names = list(sec.reference.rewards)
    head = f"{'task parity':44} {'reward':>8} {'agree':>6} {'diff [95% CI]':>24}  " + " ".join(f"{n[:10]:>10}"
                                                                                            for n in names)
    note = f" ({sec.max_new_tokens_note})" if sec.max_new_tokens_note else ""
    lines = [f"task parity: {sec.prompts} prompts from {sec.source}, greedy, up to {sec.max_new_tokens} "
             f"tokens{note}",
             head,
             f"{'(reference)':44} {sec.reference.mean_reward:8.3f} {'':>6} {'':>24}  "
             + " ".join(f"{sec.reference.rewards[n]:10.3f}" for n in names)]
    for name, f in rep.files.items():
        t = f.task
        if not t:
            continue
        d = t.difference
        diff = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" + ("!" if t.significant_drop else " ")
        lines.append(f"{name:44} {t.mean_reward:8.3f} {t.agreement * 100:5.0f}% {diff:>24}  "
                     + " ".join(f"{t.rewards[n]:10.3f}" for n in names))
    if any(f.task is not None and f.task.significant_drop for f in rep.files.values()):
        lines.append("! a significant reward drop: the whole 95% interval of the paired difference is below zero"
                     + ("" if sec.gate else " (not gated; --task-gate fails such a file)"))
    return lines
