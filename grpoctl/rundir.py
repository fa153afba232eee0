"""The run directory contract: what ``train`` writes and every later stage reads.

    RUN/
      run.json          resolved config, base model (id, local path, revision), reasoning markers,
                        grpoctl and library versions; the one file later stages trust (``RunRecord``)
      adapter/          adapter_model.safetensors + adapter_config.json (PEFT layout) and the
                        tokenizer files including its chat template; the sha256 of its weights
                        is the adapter's identity (``adapter_sha256``)
      metrics.jsonl     one JSON object per logged step (reward, per-reward means, kl, lengths)
      samples.jsonl     per logged step, a few of the completions it trained on (tracking.sample_completions)
      summary.json      steps run, wall time, first/last mean reward, stop reason
      checkpoints/      trainer checkpoints (``--resume`` picks the newest)
      eval.json         written by ``grpoctl eval``
      report.html       written by ``grpoctl report``
      export/           default output of ``grpoctl export`` (see ``grpoctl.artifacts``)

``run.json`` is one typed record, :class:`RunRecord`, written by ``train`` and read here only. Every key is
optional, so a run written by an older grpoctl (without the keys added since) still reads; a key this grpoctl
does not know (a newer one wrote it) is skipped, at every level. ``config`` is the resolved training config as
a plain object, kept whole (``grpoctl.config`` gives it its types).

Stages never import a later stage; they meet only here and in ``artifacts.json`` (``grpoctl.artifacts``).

A training process holds the run (an flock on ``.RUN.lock`` beside it, :func:`training_hold`) from its first
check to its summary; an export takes the same lock for the moment it copies the adapter
(:func:`snapshot_hold`) and refuses a run that is being trained, so it never reads an adapter that
training is replacing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpoctl.errors import DataError, InputNotFoundError, OutputBusyError, RunBusyError
from grpoctl.fsutil import lock_owner, lock_path, output_lock, sha256_file, staged_file
from grpoctl.jsonfiles import check_types, from_json, read_json, to_json

if TYPE_CHECKING:
    from grpoctl.config import DataConfig

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
EVAL_FILE = "eval.json"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoints/checkpoint-<step>, as transformers' Trainer names them
HELD_OUT_FILE = "held_out.jsonl"  # prompts training never saw (grpoctl.train.data.hold_out)
EXPORT_DIR = "export"


@dataclass(frozen=True)
class BaseModelRef:
    """Where a run's base model came from (``id``: Hub id, local path or ``embedded:...``) and
    where its 16-bit safetensors live on this machine (``path``).

    ``hub_id`` (the Hub repo the base is, or was built from) and ``license`` are worked out from the
    folder by ``grpoctl.models.identify``; ``run.json`` records only id, path and revision."""

    id: str
    path: str
    revision: str | None = None
    hub_id: str | None = None
    license: str | None = None


# --- run.json -------------------------------------------------------------------------------------------

@dataclass
class GenerationRecord:
    """Who wrote the completions in training (``grpoctl.train.generation``) and why."""

    engine: str | None = None  # "vllm" | "hf"
    vllm_mode: str | None = None
    reason: str | None = None


@dataclass
class BaseModelRecord:
    """The base as trained against: Hub id (or local path, or ``embedded:...``), local folder, revision."""

    id: str | None = None
    path: str | None = None
    revision: str | None = None


@dataclass
class ChatTemplateRecord:
    """Where the chat template came from: the tokenizer's own, or a file (``--chat-template``) and its sha256."""

    source: str = "tokenizer"  # "tokenizer" | "file"
    file: str | None = None
    sha256: str | None = None


@dataclass
class ReasoningRecord:
    """The reasoning markers training used and where they were found (``grpoctl.train.data``)."""

    start: str | None = None
    end: str | None = None
    source: str | None = None
    prefilled_start: bool = False  # the chat template writes the opening marker itself


@dataclass
class DataStats:
    rows_total: int | None = None
    rows_kept: int | None = None
    length_cutoff: int | None = None
    rows_held_out: int = 0


@dataclass
class RunRecord:
    """``run.json``: what a training run was, written once by ``train`` and read by every later stage."""

    grpoctl_version: str | None = None
    backend: str | None = None
    generation: GenerationRecord | None = None
    base_model: BaseModelRecord | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig, section by section
    chat_template: ChatTemplateRecord | None = None
    reasoning: ReasoningRecord | None = None
    derived: list[str] = field(default_factory=list)  # config keys grpoctl worked out (``trainer.optim``)
    data_stats: DataStats | None = None
    reward_weights: dict[str, float] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    python: str | None = None

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return from_json(cls, read_json(path), path, ignore_unknown=True)

    def text(self) -> str:
        """The file's text (absent values as null, as every grpoctl has written them)."""
        return json.dumps(to_json(self, keep_none=True), indent=2, default=str) + "\n"

    def save(self, path: Path) -> None:
        with staged_file(path) as tmp:
            tmp.write_text(self.text())


def adapter_sha256(adapter_dir: Path) -> str:
    """An adapter's identity: the sha256 of its ``adapter_model.safetensors``. Export records it in
    ``artifacts.json`` (``provenance.adapter.sha256``); serve and push compare the run's adapter with it."""
    return sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS, progress=True)


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    """Where the trainer's checkpoint of ``step`` lies in ``checkpoints`` (RUN/checkpoints)."""
    return Path(checkpoints) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(ckpt: Path) -> int:
    """The training step a checkpoint folder holds (``checkpoint-12`` -> 12)."""
    return int(Path(ckpt).name.removeprefix(CHECKPOINT_PREFIX))


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint of the highest step in ``checkpoints`` (RUN/checkpoints), None when there is none."""
    found = [p for p in Path(checkpoints).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return max(found, key=checkpoint_step) if found else None


TRAINING = "train"  # what the training process writes into the run's lock file
SNAPSHOT = "export: copying the adapter"


@contextlib.contextmanager
def training_hold(root: Path) -> Iterator[None]:
    """Held by ``grpoctl train`` for the whole run. A second training of the same run fails at once
    (OutputBusyError); an export copying the adapter holds it for a moment only, so training waits for that."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(output_lock(root, what=TRAINING))
        except OutputBusyError:
            if _holder(root) != SNAPSHOT:
                raise
            held.enter_context(output_lock(root, what=TRAINING, wait=True))
        yield


def _holder(root: Path) -> str | None:
    """What holds the run's lock, by its own account; a holder writes that just after taking the lock."""
    for _ in range(20):
        if what := lock_owner(lock_path(root)).get("what"):
            return what
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def snapshot_hold(root: Path) -> Iterator[None]:
    """Hold the run while an export copies its adapter, so that it copies one adapter, never half of the old one
    and half of the new; RunBusyError while a training process holds the run (another export copying it is
    waited for: a moment)."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(output_lock(root, what=SNAPSHOT))
        except OutputBusyError:
            if _holder(root) != SNAPSHOT:
                owner = lock_owner(lock_path(root))
                pid = f", pid {owner['pid']}" if owner.get("pid") else ""
                raise RunBusyError(f"{root} is being trained right now (grpoctl {owner.get('what', TRAINING)}{pid}), "
                                   "so its adapter may be replaced mid-export; export it once training has "
                                   "finished") from None
            held.enter_context(output_lock(root, what=SNAPSHOT, wait=True))
        yield


class RunDir:
    """Typed, read-only view of a finished (or checkpointed) training run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        meta = self.root / RUN_FILE
        if not meta.is_file():
            raise InputNotFoundError(f"{self.root} is not a grpoctl run directory (no {RUN_FILE}); "
                                     "create one with `grpoctl train`")
        self.record = RunRecord.load(meta)
        # every typed value later stages read, checked now: a bad one fails here, not after an hour of export
        _ = self.system_prompt, self.max_seq_length, self.sampling, self.lora_r

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / RUN_FILE).is_file()

    # Paths -----------------------------------------------------------------------------------
    @property
    def adapter_dir(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary_file(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def held_out_file(self) -> Path:
        return self.root / HELD_OUT_FILE

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_DIR

    # What later stages need -------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name) or {}
        if not isinstance(value, dict):
            raise DataError(f"{self.root / RUN_FILE}: \"config.{name}\" should be an object, not {json.dumps(value)}")
        return value

    def _number(self, section: str, key: str, default: int) -> int:
        value = self.section(section).get(key, default)
        check_types({key: value}, {key: (int,)}, self.root / RUN_FILE, where=f"config.{section}.")
        return int(value)

    @property
    def base_model(self) -> BaseModelRef:
        b = self.record.base_model
        if b is None or b.path is None:
            raise DataError(f"{self.root / RUN_FILE} does not record the base model path")
        return BaseModelRef(id=b.id or b.path, path=b.path, revision=b.revision)

    @property
    def system_prompt(self) -> str | None:
        data = self.section("data")
        check_types(data, {"system_prompt": (str,)}, self.root / RUN_FILE, where="config.data.")
        return data.get("system_prompt") or None

    @property
    def max_seq_length(self) -> int:
        return self._number("model", "max_seq_length", 1024)

    @property
    def sampling(self) -> dict[str, float]:
        """Sampling settings used during training (temperature, top_p, min_p, top_k where set)."""
        t = self.section("trainer")
        keys = ("temperature", "top_p", "min_p", "top_k")
        check_types(t, {k: (int, float) for k in keys}, self.root / RUN_FILE, where="config.trainer.")
        return {k: t[k] for k in keys if t.get(k) is not None}

    @property
    def reasoning_markers(self) -> tuple[str, str] | None:
        r = self.record.reasoning
        if r is not None and r.start and r.end:
            return r.start, r.end
        return None

    @property
    def prefilled_start(self) -> bool:
        """Whether the chat template writes the opening reasoning marker itself (the model starts after it)."""
        return self.record.reasoning is not None and self.record.reasoning.prefilled_start

    @property
    def lora_r(self) -> int:
        return self._number("lora", "r", 32)

    @property
    def rewards(self) -> list[tuple[str, float]]:
        """Reward functions used in training with their weights (missing weights are 1.0)."""
        r = self.section("rewards")
        weights = r.get("weights") or {}
        return [(name, float(weights.get(name, 1.0))) for name in r.get("functions", [])]

    def data_config(self) -> DataConfig:
        """The data section as training resolved it (dataset, field mapping, system prompt, max_samples)."""
        from grpoctl.config import DataConfig

        known = set(DataConfig.__dataclass_fields__)
        return DataConfig(**{k: v for k, v in self.section("data").items() if k in known})

    @property
    def dataset(self) -> str | None:
        """The dataset as given to ``train`` (a ``datasets`` name or a file); None = the shipped arithmetic set."""
        return self.section("data").get("dataset") or None

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text()) if self.summary_file.is_file() else {}

    def metrics(self) -> list[dict[str, Any]]:
        return _json_lines(self.metrics_file)

    def samples(self) -> list[dict[str, Any]]:
        """The completions training kept, one record per logged step (``{"step": N, "samples": [...]}``)."""
        return _json_lines(self.root / SAMPLES_FILE)

    def eval_result(self) -> dict[str, Any] | None:
        """What ``grpoctl eval`` wrote, or None before it ran."""
        path = self.root / EVAL_FILE
        return read_json(path) if path.is_file() else None


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a line cut short by a killed writer (the last one) is skipped."""
    if not path.is_file():
        return []
    out = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise DataError(f"{path} line {i + 1} is not JSON; the file is damaged") from None
    return out
