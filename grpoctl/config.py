"""Typed training configuration: the seed recipe's numbers as defaults, a TOML file and overrides on top.

Precedence (lowest first): dataclass defaults, ``--config FILE`` (TOML), ``--set section.key=value``
overrides, then the plain CLI flags (``--model``, ``--max-steps`` ...). Every key is checked against the
dataclass fields, so a typo fails with the list of valid keys instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from grpoctl.argtypes import check_fields
from grpoctl.errors import ConfigError, InputNotFoundError
from grpoctl.options import config_flags, option

# The seed's system prompt, rendered in English: reason about the problem, show the working, and think in
# Indonesian (the language-consistency reward then checks the target language).
DEFAULT_SYSTEM_PROMPT = (
    "You are given a problem.\n"
    "Think about the problem and provide your working out.\n"
    "You must think in Indonesian."
)

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_REWARDS = ["format_exact", "format_approx", "answer", "numbers", "language"]

BACKENDS = ("auto", "trl", "unsloth")
GENERATIONS = ("auto", "vllm", "hf")  # who writes the completions (grpoctl.train.generation)
VLLM_MODES = ("auto", "colocate", "server")
TRACKING_MODES = ("none", "cloud", "local", "offline")
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")


@dataclass
class ModelConfig:
    name: str | None = None  # Hub id or local folder; None = the embedded SmolLM2-135M-Instruct
    revision: str | None = None
    max_seq_length: int = 1024
    load_in_4bit: bool = False  # GPU only (bitsandbytes); the seed loads the 8B base in 4-bit
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    # the GPU memory share of vLLM's engine when it generates in the training process (Unsloth, TRL colocate)
    gpu_memory_utilization: float = 0.7
    # Jinja chat template file, for a base whose tokenizer has none (or to replace its own); the adapter's
    # tokenizer carries it from then on, so export, manifests and serve use it without being told again
    chat_template: str | None = None


@dataclass
class LoraSection:
    r: int = 32
    alpha: int | None = None  # None = 2 * r (the seed: "*2 speeds up training")
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    bias: str = "none"
    use_rslora: bool = False
    # None: on with unsloth (its "unsloth" mode, activations offloaded; the tutorial's setting), off with trl
    gradient_checkpointing: bool | None = None


@dataclass
class DataConfig:
    dataset: str | None = None  # datasets name, local jsonl/csv/parquet/json file; None = shipped arith_gsm.jsonl
    subset: str | None = None  # datasets config name (the seed: "en" for DAPO-Math-17k-Processed)
    split: str = "train"
    prompt_field: str = "question"
    solution_field: str = "answer"
    answer_field: str | None = None  # a column that already holds the bare answer; else derived from solution
    extract_hash_answer: bool = True  # GSM8K: the answer follows "####"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None (or "") = no system message
    length_quantile: float = 0.9  # drop prompts longer than this quantile of token length
    max_samples: int | None = None
    # prompts kept out of training (at most a tenth of the rows) and written to RUN/held_out.jsonl: export's task
    # parity answers them with the trained model and with each GGUF, so it measures on prompts training never saw
    held_out: int = 16
    reasoning_start: str = "<think>"  # used only when the tokenizer has no reasoning tokens of its own
    reasoning_end: str = "</think>"


@dataclass
class RewardsConfig:
    functions: list[str] = field(default_factory=lambda: list(DEFAULT_REWARDS))
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight; missing names weigh 1.0
    language: str = "id"  # langid code the language-consistency reward asks for


@dataclass
class TrainerConfig:
    backend: str = "auto"
    generation: str = "auto"  # vllm | hf | auto (vLLM when a CUDA GPU and vLLM are there): grpoctl.train.generation
    vllm_mode: str = "auto"  # TRL: colocate | server (a vLLM server on a spare GPU) | auto
    # TRL's correction of the loss for vLLM's sampling log-probabilities; None = the backend's default (TRL: on,
    # Unsloth: off). On, the trainer also logs vLLM's gap to the trained policy (metrics' vllm_logp_diff)
    vllm_importance_sampling_correction: bool | None = None
    learning_rate: float = 5e-6
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "linear"
    optim: str = "auto"  # auto: adamw_8bit with bitsandbytes on CUDA (not under FSDP), else adamw_torch
    per_device_train_batch_size: int | None = None  # completions per device and step; None = num_generations
    gradient_accumulation_steps: int = 1
    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = 0.1
    beta: float = 0.04  # KL weight; the seed's trainer logged a kl column, which needs beta > 0
    max_steps: int = 100
    save_steps: int = 100
    logging_steps: int = 1
    seed: int = 3407
    max_prompt_length: int | None = None  # None = the length_quantile of prompt lengths + 1, as the seed does
    max_completion_length: int | None = None  # None = max_seq_length - max_prompt_length; else capped by it


@dataclass
class TrackingConfig:
    mode: str = "none"  # none | cloud | local | offline (SwanLab)
    project: str = "grpoctl"
    experiment: str | None = None
    logdir: str | None = None  # None = RUN/swanlog
    sample_completions: int = 2  # completions kept per logged step in RUN/samples.jsonl (0: none)


@dataclass
class DistributedConfig:
    num_processes: int = 1
    strategy: str = "ddp"
    accelerate_config: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/grpo"
    resume: bool = False
    force: bool = False

    # Derived values -------------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> int:
        return self.lora.alpha if self.lora.alpha is not None else 2 * self.lora.r

    @property
    def batch_size(self) -> int:
        return self.trainer.per_device_train_batch_size or self.trainer.num_generations

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["alpha"] = self.lora_alpha
        d["trainer"]["per_device_train_batch_size"] = self.batch_size
        return d

    def validate(self) -> None:
        """Checks that need no library: choices and ranges, each with the fix in the message."""
        t = self.trainer
        if t.backend not in BACKENDS:
            raise ConfigError(f"trainer.backend must be one of {', '.join(BACKENDS)}, not {t.backend!r}")
        if t.generation not in GENERATIONS:
            raise ConfigError(f"trainer.generation must be one of {', '.join(GENERATIONS)}, not {t.generation!r}")
        if t.vllm_mode not in VLLM_MODES:
            raise ConfigError(f"trainer.vllm_mode must be one of {', '.join(VLLM_MODES)}, not {t.vllm_mode!r}")
        if not 0 < self.model.gpu_memory_utilization < 1:
            raise ConfigError("model.gpu_memory_utilization must be in (0, 1): the share of GPU memory vLLM takes")
        if self.tracking.mode not in TRACKING_MODES:
            raise ConfigError(f"tracking.mode must be one of {', '.join(TRACKING_MODES)}, not {self.tracking.mode!r}")
        if self.distributed.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, "
                              f"not {self.distributed.strategy!r}")
        if self.tracking.sample_completions < 0:
            raise ConfigError("tracking.sample_completions must be 0 (keep none) or more")
        if t.num_generations < 2:
            raise ConfigError("trainer.num_generations must be at least 2 (GRPO compares completions of one prompt)")
        if self.lora.r < 1:
            raise ConfigError("lora.r must be a positive integer")
        if t.max_steps < 1:
            raise ConfigError("trainer.max_steps must be at least 1")
        if not 0 < self.data.length_quantile <= 1:
            raise ConfigError("data.length_quantile must be in (0, 1]")
        if not self.rewards.functions:
            raise ConfigError("rewards.functions is empty; name at least one reward")
        unknown_w = set(self.rewards.weights) - set(self.rewards.functions)
        if unknown_w:
            raise ConfigError(f"rewards.weights names {', '.join(sorted(unknown_w))}, which "
                              f"rewards.functions does not list ({', '.join(self.rewards.functions)})")
        check_batch_divisibility(self.batch_size, t.gradient_accumulation_steps, t.num_generations,
                                 self.distributed.num_processes)


def check_batch_divisibility(per_device: int, grad_accum: int, num_generations: int, num_processes: int) -> None:
    """TRL groups completions per prompt across all processes; say so here instead of deep in GRPOConfig."""
    generation_batch = per_device * num_processes * grad_accum
    if generation_batch % num_generations:
        raise ConfigError(
            f"the generation batch (per_device_train_batch_size {per_device} x {num_processes} process(es) x "
            f"gradient_accumulation_steps {grad_accum} = {generation_batch}) must be divisible by "
            f"trainer.num_generations ({num_generations}); e.g. set trainer.per_device_train_batch_size="
            f"{num_generations} or trainer.num_generations to a divisor of {generation_batch}")


# Loading ------------------------------------------------------------------------------------------
_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


class _SetText(str):
    """A ``--set`` value: the text as typed, and its TOML reading (``parsed``). A string setting keeps the
    text (``--set data.system_prompt=true`` is the word "true", ``1e3`` stays "1e3"); others take the reading."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any) -> _SetText:
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a TOML/--set value into the field's type, or fail naming the key and the expected type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, _SetText) and hint is not str and origin not in (types.UnionType, typing.Union):
        value = value.parsed
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: ConfigError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{key}: invalid value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, _SetText):
            return value.parsed if isinstance(value.parsed, str) else str.__str__(value)
        if not isinstance(value, str):  # TOML: `system_prompt = true` is a typo, not the word "True"
            raise ConfigError(f"{key} expects a string, got {_toml(value)}; quote it")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return {}  # `--set rewards.weights=none` clears the table
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a table like {{name = 1.0}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def _parse_override_value(raw: str) -> _SetText:
    """``--set`` values are TOML literals where they parse (numbers, booleans, lists, tables), else strings;
    the typed text is kept beside the reading for string settings."""
    try:
        parsed = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = raw
    return _SetText(raw, parsed)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def apply(cfg: TrainConfig, values: dict[str, Any], origin: str, strict: bool = True) -> None:
    """Set nested ``{section: {key: value}}`` (or top-level keys) onto ``cfg``, rejecting unknown keys.

    ``strict=False`` skips keys this version does not know (a run.json written by another grpoctl)."""
    sections = _section_classes()
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(sections)
    for name, value in values.items():
        if name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [{name}] must be a table of keys")
            section = getattr(cfg, name)
            hints = typing.get_type_hints(type(section))
            for key, v in value.items():
                if key not in hints:
                    if not strict:
                        continue
                    raise ConfigError(f"{origin}: unknown key {name}.{key}; valid keys in [{name}]: "
                                      f"{', '.join(hints)}")
                setattr(section, key, _coerce(v, hints[key], f"{name}.{key}"))
        elif name in top:
            hints = typing.get_type_hints(TrainConfig)
            setattr(cfg, name, _coerce(value, hints[name], name))
        else:
            raise ConfigError(f"{origin}: unknown section or key {name!r}; valid: {', '.join([*sections, *top])}")


def parse_overrides(items: list[str] | tuple[str, ...], keep_text: bool = False) -> dict[str, Any]:
    """``["lora.r=16", "trainer.max_steps=5"]`` -> ``{"lora": {"r": 16}, "trainer": {"max_steps": 5}}``.

    ``keep_text``: each value also carries the text as typed, which string settings keep (see ``_SetText``).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        value = _parse_override_value(raw)
        value = value if keep_text else value.parsed
        if len(parts) == 1:
            out[parts[0]] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def load_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def from_dict(values: dict[str, Any], origin: str = "config") -> TrainConfig:
    cfg = TrainConfig()
    apply(cfg, values, origin)
    return cfg


@dataclass
class ColumnOptions:
    """Which dataset columns hold what: the usual ``data.*`` keys as flags (``grpoctl train`` and ``eval``)."""

    config_class: ClassVar[type] = TrainConfig  # where the help finds the defaults of the config keys below

    prompt_field: str | None = option(metavar="COLUMN", config_key="data.prompt_field",
                                      help="Column with the question/prompt.")
    solution_field: str | None = option(metavar="COLUMN", config_key="data.solution_field",
                                        help="Column with the worked solution; the answer is taken from it.")
    answer_field: str | None = option(metavar="COLUMN", config_key="data.answer_field", help="Column that already "
                                      "holds the bare answer (then the solution column is optional).")
    extract_hash_answer: bool | None = option(off="--no-extract-hash-answer", config_key="data.extract_hash_answer",
                                              help="Take the answer after '####' in the solution, as GSM8K writes "
                                              "it.")

    def columns(self) -> dict[str, Any]:
        """The column keys given, as ``data.*`` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ColumnOptions)
                if getattr(self, f.name) is not None}


@dataclass
class TrainOptions(ColumnOptions):
    """What ``grpoctl train`` takes: a config file, ``--set`` overrides, and flags for the usual config keys (each
    field is the flag of the same name; None: the config's value). :meth:`load` layers them as
    :func:`load_config` does."""

    config_file: Path | None = option(flag="--config", short="-c", help="TOML config file.")
    overrides: tuple[str, ...] = option(default_factory=tuple, flag="--set", multiple=True, metavar="SECTION.KEY=VALUE",
                                        help="Override one config value (repeatable), e.g. --set lora.r=16 --set "
                                        "trainer.beta=0.")
    model: str | None = option(short="-m", config_key="model.name", default_text="embedded SmolLM2-135M-Instruct",
                               help="Base model: Hub id or local folder.")
    dataset: str | None = option(short="-d", config_key="data.dataset", default_text="shipped arith_gsm",
                                 help="datasets name or local .jsonl/.csv/.parquet.")
    output_dir: Path | None = option(short="-o", config_key="output_dir", help="Run directory.")
    backend: str | None = option(choices=BACKENDS, config_key="trainer.backend", help="Training backend.")
    generation: str | None = option(choices=GENERATIONS, config_key="trainer.generation", help="Who writes the "
                                    "completions: vLLM, transformers' generate, or auto (vLLM when a CUDA GPU and "
                                    "vLLM are there).")
    max_steps: int | None = option(config_key="trainer.max_steps", help="GRPO steps.")
    tracking: str | None = option(choices=TRACKING_MODES, config_key="tracking.mode", help="SwanLab tracking mode.")
    num_processes: int | None = option(config_key="distributed.num_processes",
                                       help="Processes to launch through accelerate.")
    strategy: str | None = option(choices=STRATEGIES, config_key="distributed.strategy",
                                  help="Multi-process strategy.")
    accelerate_config: Path | None = option(config_key="distributed.accelerate_config",
                                            help="accelerate config file to launch with.")
    chat_template: Path | None = option(metavar="FILE", config_key="model.chat_template", help="Jinja chat template, "
                                        "for a base whose tokenizer has none (config key model.chat_template).")
    resume: bool = option(False, config_key="resume", help="Continue the run in --output-dir from its newest "
                          "checkpoint.")
    force: bool = option(False, config_key="force", help="Delete what --output-dir holds (a previous run included) "
                         "and start again.")

    def __post_init__(self) -> None:
        check_fields(self)

    def load(self, base: dict[str, Any] | None = None) -> TrainConfig:
        """The config these options give: defaults <- ``base`` <- --config <- --set <- the flags."""
        return load_config(self.config_file, self.overrides, config_flags(self), base=base)


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- ``base`` (e.g. a resumed run's config) <- TOML file <- ``--set`` overrides <- CLI flags."""
    cfg = TrainConfig()
    if base:
        apply(cfg, base, "run.json", strict=False)
    if path is not None:
        apply(cfg, load_toml(path), str(path))
    apply(cfg, parse_overrides(overrides, keep_text=True), "--set")
    if flags:
        apply(cfg, flags, "command line")
    cfg.validate()
    return cfg
