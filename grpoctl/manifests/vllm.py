"""vLLM serving manifests: a ``vllm serve`` script, a Compose file and Kubernetes objects.

One :class:`VllmPlan` (the argv of ``vllm serve``, minus where the model lives) is rendered three
ways. Every user-supplied string reaches the shell through ``shlex.quote``, YAML through PyYAML's
emitter (with ``$`` doubled for Compose interpolation), so names and paths cannot inject anything.
Containers see only what is mounted: the export directory at ``/models`` and, for base + LoRA on a
base that is a local folder (not a Hub id), that folder at ``/base``.
:func:`vllm_files` plans them for an export (which modes, the run's settings); writing the files and recording
them is ``grpoctl.manifests.api``'s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpoctl.artifacts import VllmMode, VllmSection
from grpoctl.errors import UsageError
from grpoctl.exportlayout import LORA_DIR, MERGED_4BIT_DIR, MERGED_DIR, VLLM_DIR
from grpoctl.manifests.context import ManifestContext
from grpoctl.models import config_dtype, has_tokenizer
from grpoctl.names import safe_name
from grpoctl.version import __version__

IMAGE_REPO = "vllm/vllm-openai"
# vLLM's LoRAConfig.max_lora_rank accepts only these (vllm/config/lora.py, MaxLoRARanks).
DEFAULT_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONTAINER_PORT = 8000
MOUNT = "/models"  # the export directory inside containers
BASE_MOUNT = "/base"  # a local base model folder inside containers (base + LoRA)
MANIFESTS = "/manifests"  # this folder inside the Compose container
HF_CACHE = "/root/.cache/huggingface"


def tested_vllm_version() -> str | None:
    """The vLLM version the ``gpu`` extra pins (``vllm==X`` in grpoctl's package metadata): the one tested."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("grpoctl") or []
    except PackageNotFoundError:
        return None
    for req in reqs:
        if m := re.match(r"^vllm\s*==\s*([0-9][\w.]*)", req):
            return m.group(1)
    return None


def vllm_image() -> str:
    """The vLLM image of the tested version (Docker Hub tags releases ``vX.Y.Z``); ``latest`` only when this
    installation carries no pin."""
    version = tested_vllm_version()
    return f"{IMAGE_REPO}:v{version}" if version else f"{IMAGE_REPO}:latest"


def lora_unsupported(adapter_config: dict[str, Any]) -> list[str]:
    """What in this PEFT adapter vLLM refuses to load as a LoRA; empty when it serves it.

    The rules of ``PEFTHelper._validate_features`` and ``validate_legal`` in vLLM's vllm/lora/peft_helper.py:
    modules_to_save (other than a classifier/score head), DoRA, lora_bias, a bias other than "none", and
    initialisations that change the base weights (PiSSA, OLoRA, LoftQ, ...); plus a rank above the largest
    max_lora_rank (vllm/config/lora.py).
    """
    out = []
    saved = [m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        out.append(f"modules_to_save {', '.join(saved)} (fully trained copies of those modules)")
    if adapter_config.get("use_dora"):
        out.append("DoRA")
    if adapter_config.get("lora_bias"):
        out.append("lora_bias")
    if adapter_config.get("bias", "none") not in ("none", None):
        out.append(f"bias {adapter_config['bias']!r}")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        out.append(f"init_lora_weights {init!r}")
    ranks = [int(adapter_config.get("r", 8)), *(int(v) for v in (adapter_config.get("rank_pattern") or {}).values())]
    if max(ranks) > vllm_lora_ranks()[-1]:
        out.append(f"rank {max(ranks)} (vLLM serves LoRA ranks up to {vllm_lora_ranks()[-1]})")
    return out


def vllm_lora_ranks() -> tuple[int, ...]:
    """The ranks the installed vLLM accepts, else the list of recent releases."""
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks  # type: ignore[import-not-found]

        return tuple(sorted(get_args(MaxLoRARanks)))
    except Exception:
        return DEFAULT_LORA_RANKS


def max_lora_rank(r: int, ranks: tuple[int, ...] | None = None) -> int:
    """Smallest rank vLLM accepts that is >= the adapter's r."""
    ranks = ranks or vllm_lora_ranks()
    for allowed in ranks:
        if allowed >= r:
            return allowed
    raise UsageError(f"LoRA rank {r} is above the largest rank vLLM serves ({ranks[-1]}); serve the merged model")


@dataclass
class VllmPlan:
    """Everything ``vllm serve`` needs. Paths are relative to the export directory unless ``*_is_ref``."""

    mode: str  # "merged", "merged-4bit" or "lora"
    served_model_name: str
    model: str  # export-relative folder, or a Hub id / absolute path when model_is_ref
    model_is_ref: bool = False
    # lora mode on a local base: ``model`` is that folder on this machine, mounted at BASE_MOUNT in containers
    base_is_local: bool = False
    base_served_name: str | None = None  # what clients ask for to get the base without the adapter
    revision: str | None = None  # Hub revision of a Hub base (the commit trained on)
    lora_path: str | None = None  # export-relative adapter folder (lora mode)
    lora_rank: int | None = None
    tokenizer: str | None = None  # export-relative tokenizer folder (lora mode: the trained tokenizer/template)
    max_model_len: int | None = None
    dtype: str = "auto"
    sampling: dict[str, float | int] = field(default_factory=dict)  # training sampling -> generation defaults
    chat_template: str | None = None  # file in the manifests folder, only when the tokenizer lacks one
    export_dir: str = ".."  # the export directory as seen from the manifests folder (or an absolute path)
    reasoning_parser: str | None = None
    quantization: str | None = None
    gpu_memory_utilization: float = 0.90
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # full replicas behind one endpoint, each over tensor_parallel_size GPUs
    port: int = CONTAINER_PORT
    image: str = field(default_factory=vllm_image)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = self.served_model_name
        # vLLM reads `--lora-modules name=path` as JSON when the item holds a comma
        # vLLM reads an argument starting with '-' as an option (argparse), so such a name never arrives
        if not name or any(ch.isspace() or not ch.isprintable() for ch in name) or "=" in name or "," in name \
                or name.startswith("-"):
            raise UsageError(f"served model name {name!r} must be non-empty, not start with '-', and have no spaces, "
                             "control characters, '=' or ','; pass --served-model-name")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise UsageError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise UsageError(f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        if not 1 <= self.port <= 65535:
            raise UsageError(f"--port must be between 1 and 65535, got {self.port}")

    # argv ---------------------------------------------------------------------------------------
    def args(self, root: str, manifests: str, base: str | None = None) -> list[str]:
        """``vllm serve`` arguments with the export directory at ``root``, the manifests folder at
        ``manifests`` (paths, or placeholders the caller substitutes) and a local base at ``base``
        (default: where it is on this machine)."""

        def loc(rel: str) -> str:
            return f"{root}/{rel}"

        if self.base_is_local:
            model = base or self.model
        else:
            model = self.model if self.model_is_ref else loc(self.model)
        argv = [model, "--served-model-name", self.served_model_name if self.mode != "lora" else self.base_name]
        if self.revision and self.model_is_ref and not self.base_is_local:
            argv += ["--revision", self.revision]
        if self.mode == "lora":
            argv += ["--enable-lora", "--lora-modules", f"{self.served_model_name}={loc(self.lora_path or 'lora')}",
                     "--max-lora-rank", str(max_lora_rank(self.lora_rank or 16))]
        if self.tokenizer:
            argv += ["--tokenizer", loc(self.tokenizer)]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        argv += ["--dtype", self.dtype]
        # the model's own generation_config.json, with the sampling the policy was trained with on top
        argv += ["--generation-config", "auto"]
        if self.sampling:
            argv += ["--override-generation-config", json.dumps(self.sampling, sort_keys=True)]
        if self.chat_template:
            argv += ["--chat-template", f"{manifests}/{self.chat_template}"]
        if self.reasoning_parser:
            argv += ["--reasoning-parser", self.reasoning_parser]
        if self.quantization:
            argv += ["--quantization", self.quantization]
        argv += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}",
                 "--tensor-parallel-size", str(self.tensor_parallel_size),
                 "--data-parallel-size", str(self.data_parallel_size)]
        return argv

    @property
    def gpus(self) -> int:
        """GPUs one server occupies: vLLM runs data_parallel_size engines of tensor_parallel_size GPUs each."""
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def base_name(self) -> str:
        # In LoRA mode the base answers under its own name (its Hub id, or the local folder's name, never a
        # host path a client cannot know); the adapter under the served model name.
        if self.base_served_name:
            base = self.base_served_name
        elif self.model_is_ref and not self.base_is_local:
            base = self.model
        else:
            base = self.model.rstrip("/").split("/")[-1]
        bad = not base or any(ch.isspace() or ch in "=," for ch in base) or base == self.served_model_name
        return f"{self.served_model_name}-base" if bad else base

    @property
    def slug(self) -> str:
        s = re.sub(r"[^a-z0-9-]+", "-", self.served_model_name.lower()).strip("-")
        return (s[:40].strip("-") or "model")


# --- serve.sh -----------------------------------------------------------------------------------------

_ROOT_TOKEN = "\x00EXPORT_DIR\x00"
_HERE_TOKEN = "\x00HERE\x00"


def _shell_word(arg: str) -> str:
    """Quote ``arg`` for bash, turning the folder placeholders into quoted "$EXPORT_DIR" / "$HERE"."""
    for token, var in ((_ROOT_TOKEN, '"$EXPORT_DIR"'), (_HERE_TOKEN, '"$HERE"')):
        if token in arg:
            head, tail = arg.split(token, 1)
            return (shlex.quote(head) if head else "") + var + (shlex.quote(tail) if tail else "")
    return shlex.quote(arg)


def serve_sh(plan: VllmPlan) -> str:
    argv = plan.args(_ROOT_TOKEN, _HERE_TOKEN)
    export = ('"$(cd "$HERE/.." && pwd)"' if plan.export_dir == ".."
              else shlex.quote(plan.export_dir))
    lines = [
        "#!/usr/bin/env bash",
        f"# vLLM OpenAI-compatible server ({plan.mode} model), written by grpoctl {__version__}.",
        "# Run from anywhere: ./serve.sh   Overrides: PORT=9000 HOST=127.0.0.1 ./serve.sh --max-num-seqs 8",
        "# (extra arguments go to `vllm serve` unchanged).",
        *[f"# {n}" for note in plan.notes for n in note.splitlines()],
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"EXPORT_DIR={export}",
        "exec vllm serve \\",
    ]
    # one flag with its value per line; the model path first
    grouped = [_shell_word(argv[0])]
    for a in argv[1:]:
        if a.startswith("--") or not grouped[-1].startswith("--") or " " in grouped[-1]:
            grouped.append(_shell_word(a))
        else:
            grouped[-1] += " " + _shell_word(a)
    grouped += ['--host "${HOST:-0.0.0.0}"', f'--port "${{PORT:-{plan.port}}}"', '"$@"']
    lines += [f"  {g} \\" for g in grouped[:-1]] + [f"  {grouped[-1]}"]
    return "\n".join(lines) + "\n"


# --- docker-compose.yml -----------------------------------------------------------------------------------

def _compose_escape(obj: Any) -> Any:
    """Compose interpolates ``$VAR`` in every string; double literal dollars."""
    if isinstance(obj, str):
        return obj.replace("$", "$$")
    if isinstance(obj, list):
        return [_compose_escape(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _compose_escape(v) for k, v in obj.items()}
    return obj


def compose_dict(plan: VllmPlan) -> dict[str, Any]:
    argv = _compose_escape(plan.args(MOUNT, MANIFESTS, BASE_MOUNT)
                           + ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)])
    volumes = [_compose_escape(f"{plan.export_dir}:{MOUNT}:ro"), f".:{MANIFESTS}:ro", f"hf-cache:{HF_CACHE}"]
    if plan.base_is_local:
        volumes.insert(1, _compose_escape(f"{plan.model}:{BASE_MOUNT}:ro"))
    health = ("import urllib.request,sys; "
              f"sys.exit(urllib.request.urlopen('http://localhost:{CONTAINER_PORT}/health').status != 200)")
    service = {
        "image": plan.image,
        "entrypoint": ["vllm", "serve"],
        "command": argv,
        "ports": [f"{plan.port}:{CONTAINER_PORT}"],
        "ipc": "host",  # PyTorch workers share tensors through /dev/shm
        "volumes": volumes,
        "environment": {"HF_TOKEN": "${HF_TOKEN:-}"},
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": plan.gpus, "capabilities": ["gpu"]}]}}},
        "healthcheck": {"test": ["CMD", "python3", "-c", _compose_escape(health)], "interval": "30s",
                        "timeout": "5s", "retries": 5, "start_period": "600s"},
        "restart": "unless-stopped",
    }
    return {"services": {"vllm": service}, "volumes": {"hf-cache": {}}}


class _PlainDumper(yaml.SafeDumper):
    """Safe dumper without anchors/aliases: repeated label maps are written out, as kubectl users expect."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=4096,
                     default_flow_style=False)


def docker_compose_yml(plan: VllmPlan) -> str:
    base = (f"# The base model folder {_comment(plan.model)} is mounted read-only at {BASE_MOUNT}.\n"
            if plan.base_is_local else "")
    header = (f"# vLLM ({plan.mode} model) with Docker Compose, written by grpoctl {__version__}.\n"
              "# Start from this folder: docker compose up -d   (needs the NVIDIA container toolkit)\n"
              f"# The export directory ({_comment(plan.export_dir)}) is mounted read-only at {MOUNT}.\n{base}")
    return header + _yaml(compose_dict(plan))


# --- Kubernetes ----------------------------------------------------------------------------------------

def k8s_objects(plan: VllmPlan) -> list[dict[str, Any]]:
    name = f"{plan.slug}-vllm"
    labels = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": "grpoctl"}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{name}-cache", "labels": labels},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "100Gi"}}}}
    probe_path = {"path": "/health", "port": "http"}
    container = {
        "name": "vllm",
        "image": plan.image,
        "command": ["vllm", "serve"],
        "args": plan.args(MOUNT, f"{MOUNT}/vllm", BASE_MOUNT) + ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                       "optional": True}}}],
        "resources": {"limits": {"nvidia.com/gpu": str(plan.gpus)},
                      "requests": {"cpu": "4", "memory": "16Gi"}},
        "volumeMounts": [{"name": "cache", "mountPath": HF_CACHE, "subPath": "huggingface"},
                         {"name": "cache", "mountPath": MOUNT, "subPath": "models", "readOnly": True},
                         *([{"name": "cache", "mountPath": BASE_MOUNT, "subPath": "base", "readOnly": True}]
                           if plan.base_is_local else []),
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        "startupProbe": {"httpGet": probe_path, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": probe_path, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": probe_path, "periodSeconds": 30, "failureThreshold": 3, "timeoutSeconds": 5},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "containers": [container],
                     "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": f"{name}-cache"}},
                                 {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                               "sizeLimit": f"{4 * plan.gpus}Gi"}}],
                 }}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"type": "ClusterIP", "selector": labels,
                        "ports": [{"name": "http", "port": plan.port, "targetPort": "http", "protocol": "TCP"}]}}
    return [pvc, deployment, service]


def k8s_yaml(plan: VllmPlan) -> str:
    base = (f"# The base model (the local folder {_comment(plan.model)}) goes into subPath base, mounted at "
            f"{BASE_MOUNT}:\n#   kubectl cp BASE_DIR <pod>:{BASE_MOUNT}\n") if plan.base_is_local else ""
    header = (f"# vLLM ({plan.mode} model) on Kubernetes, written by grpoctl {__version__}.\n"
              "# kubectl apply -f k8s.yaml. The PVC holds the Hugging Face cache (subPath huggingface) and the\n"
              "# export directory (subPath models, mounted at /models): copy the export into it first, e.g.\n"
              "#   kubectl cp EXPORT_DIR <pod>:/models  (from a helper pod mounting the claim read-write).\n"
              f"{base}"
              "# An optional Secret `hf-token` (key `token`) supplies HF_TOKEN for gated base models.\n")
    return header + "---\n".join(_yaml(o) for o in k8s_objects(plan))


def _comment(text: str) -> str:
    """``text`` safe inside a one-line ``#`` comment (a path with a line break cannot start YAML)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# --- The manifests of an export ----------------------------------------------------------------------------

def _model_name(ctx: ManifestContext) -> str:
    if ctx.options.served_model_name:
        return ctx.options.served_model_name
    ggufs = ctx.artifacts.by_kind("gguf")
    if ggufs:
        stem = Path(ggufs[0].path).stem
        return safe_name(stem.rsplit("-", 1)[0] if "-" in stem else stem)
    base = ctx.run.base_model.id if ctx.run else ctx.export_dir.name
    return safe_name(base.split(":")[-1].rstrip("/").split("/")[-1]) + "-grpo"


def _dtype(ctx: ManifestContext) -> str:
    for folder in (MERGED_DIR, MERGED_4BIT_DIR):
        dt = config_dtype(ctx.export_dir / folder)
        if dt in ("bfloat16", "float16", "float32"):
            return dt
    return "auto"


def _reasoning_parser(tok: Any, ctx: ManifestContext) -> str | None:
    from grpoctl.manifests.templates import UntranslatableTemplate, probe_chat_format

    markers = ctx.run.reasoning_markers if ctx.run else None
    try:
        fmt = probe_chat_format(tok, markers)
    except UntranslatableTemplate:
        return None
    if not fmt.reasoning_markers:
        return None
    # vLLM's think parsers look both markers up as single tokens of the vocabulary and refuse to start
    # otherwise ("could not locate think start/end tokens", vllm/reasoning/basic_parsers.py); markers that are
    # plain text (SmolLM2 splits "<think>" into "<", "think", ">") stay in the answer instead
    vocab = tok.get_vocab()
    if not all(m in vocab for m in fmt.reasoning_markers):
        ctx.vllm_notes.append(f"no --reasoning-parser for vLLM: the tokenizer has no single tokens for the reasoning "
                              f"markers {' '.join(fmt.reasoning_markers)}, which vLLM's parsers need; the thinking "
                              "stays in the answer text")
        return None
    # deepseek_r1 tolerates a missing opening tag (templates that pre-fill it); qwen3 expects both tags.
    if fmt.family == "deepseek" or fmt.prefills_think:
        return "deepseek_r1"
    return "qwen3"


def _parallelism(ctx: ManifestContext) -> tuple[int, int]:
    """(tensor_parallel_size, data_parallel_size) for vLLM.

    The user's flags win. Otherwise the server takes as many GPUs as training did
    (``distributed.num_processes``): a LoRA run's model fits one GPU for inference whenever it trained
    there, so the GPUs become data-parallel replicas (throughput) rather than tensor-parallel shards
    (latency, plus divisibility rules on attention heads that only the user can check). With only
    ``--tensor-parallel-size T`` given, the replicas fill the same GPU count when T divides it.
    """
    o = ctx.options
    trained_on = int(ctx.run.section("distributed").get("num_processes") or 1) if ctx.run else 1
    tp = o.tensor_parallel_size if o.tensor_parallel_size is not None else 1
    if tp < 1:
        raise UsageError(f"--tensor-parallel-size must be >= 1, got {tp}")
    if o.data_parallel_size is not None:
        dp = o.data_parallel_size
    else:
        dp = trained_on // tp if trained_on % tp == 0 else 1
    if o.data_parallel_size is None and trained_on > 1:
        strategy = ctx.run.section("distributed").get("strategy", "ddp") if ctx.run else "ddp"
        ctx.notes.append(f"trained with {trained_on} processes ({strategy}): vLLM serves on {tp * dp} GPUs "
                         f"(--tensor-parallel-size {tp} --data-parallel-size {dp}); pass --data-parallel-size 1 "
                         "for one GPU")
    return tp, dp


def _plans(ctx: ManifestContext, tok: Any, tokenizer_has_template: bool) -> list[VllmPlan]:
    o = ctx.options
    name = _model_name(ctx)
    tp, dp = _parallelism(ctx)
    common = dict(served_model_name=name, max_model_len=ctx.run.max_seq_length if ctx.run else None,
                  reasoning_parser=_reasoning_parser(tok, ctx), gpu_memory_utilization=o.gpu_memory_utilization,
                  tensor_parallel_size=tp, data_parallel_size=dp, port=o.port)
    sampling = {k: (int(v) if k == "top_k" else float(v)) for k, v in (ctx.run.sampling if ctx.run else {}).items()}
    inside = ctx.out_dir.resolve() == ctx.export_dir.resolve()
    extra = dict(sampling=sampling, chat_template=None if tokenizer_has_template else "chat_template.jinja",
                 export_dir=".." if inside else str(ctx.export_dir.resolve()))
    plans = []
    if ctx.artifacts.by_kind("merged") or o.hub_repo:
        plans.append(VllmPlan(mode="merged", model=o.hub_repo or MERGED_DIR, model_is_ref=bool(o.hub_repo),
                              dtype=_dtype(ctx), **common, **extra))
    elif ctx.artifacts.by_kind("merged-4bit"):
        plans.append(VllmPlan(mode="merged-4bit", model=MERGED_4BIT_DIR, quantization="bitsandbytes",
                              dtype=_dtype(ctx), **common, **extra))
    lora = ctx.artifacts.by_kind("lora")
    adapter_cfg = _exported_adapter_config(ctx)
    refused = lora_unsupported(adapter_cfg) if lora else []
    if refused:
        merged = " (export with --merged 16bit)" if not plans else ""
        ctx.notes.append(f"no base + LoRA vLLM manifests: vLLM does not load an adapter with {'; '.join(refused)} "
                         f"as a LoRA (its rules in vllm/lora/peft_helper.py), so serve the merged model{merged}")
    elif lora:
        base = _lora_base(ctx)
        if base is None:
            ctx.notes.append("LoRA adapter exported but its base model is unknown: no base + LoRA manifests")
        else:
            location, local, base_name, revision = base
            notes = [] if not local else [
                f"The base model is the local folder {location}: serve.sh uses it in place, Compose mounts it at "
                f"{BASE_MOUNT}, Kubernetes expects a copy in the claim (subPath base)."]
            # the base's tokenizer may carry another chat template than the one trained with
            tokenizer = LORA_DIR if has_tokenizer(ctx.export_dir / LORA_DIR) else None
            plans.append(VllmPlan(mode="lora", model=location, model_is_ref=True, base_is_local=local,
                                  base_served_name=base_name, revision=revision, lora_path=LORA_DIR,
                                  tokenizer=tokenizer, lora_rank=_lora_rank(ctx, adapter_cfg), dtype=_dtype(ctx),
                                  notes=notes, **common, **extra))
    return plans


def _lora_base(ctx: ManifestContext) -> tuple[str, bool, str, str | None] | None:
    """(where the base is, whether that is a local folder, the name vLLM serves it under, Hub revision).

    A base that came from the Hub is named by its id (vLLM downloads it, at the revision trained on); any
    other base (a local folder, the embedded SmolLM2 built from its GGUF) is the folder trained on."""
    ref = ctx.artifacts.provenance.base_model
    if ref is None:
        return None
    if ref.id and not ref.id.startswith("embedded:") and not os.path.exists(ref.id):
        return ref.id, False, ref.id, ref.revision
    name = ref.id.split(":", 1)[1] if ref.id.startswith("embedded:") else Path(ref.path).name
    return ref.path, True, name, None


def _exported_adapter_config(ctx: ManifestContext) -> dict[str, Any]:
    from grpoctl.jsonfiles import adapter_config

    lora = ctx.export_dir / LORA_DIR
    return adapter_config(lora) if (lora / "adapter_config.json").is_file() else {}


def _lora_rank(ctx: ManifestContext, adapter_cfg: dict[str, Any]) -> int:
    """The adapter's largest rank (``r`` and any ``rank_pattern``), which ``--max-lora-rank`` must cover."""
    ranks = [int(adapter_cfg.get("r", 0))] + [int(v) for v in (adapter_cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > 0:
        return max(ranks)
    return ctx.run.lora_r if ctx.run else 16


def vllm_files(ctx: ManifestContext, tok: Any, tokenizer_has_template: bool) -> tuple[dict[Path, str], VllmSection]:
    """serve.sh, docker-compose.yml and k8s.yaml for each way the export can be served (the merged or 4-bit
    model first, then base + LoRA), by path, and what they run (artifacts.json ``manifests.vllm``)."""
    plans = _plans(ctx, tok, tokenizer_has_template)
    if plans:
        ctx.notes.extend(ctx.vllm_notes)
    if not plans:
        ctx.notes.append("no merged model or LoRA adapter in the export: no vLLM manifests written; add the adapter "
                         f"for vLLM's --enable-lora with `{ctx.artifacts.export_command('--lora')}` (the manifests "
                         "are written again with it)")
        return {}, VllmSection(written=False)
    vdir = ctx.out_dir / VLLM_DIR
    files: dict[Path, str] = {}
    if not tokenizer_has_template:
        files[vdir / "chat_template.jinja"] = tok.chat_template
    modes = []
    for i, plan in enumerate(plans):
        suffix = "" if i == 0 else f"-{plan.mode}"
        files[vdir / f"serve{suffix}.sh"] = serve_sh(plan)
        files[vdir / f"docker-compose{suffix}.yml"] = docker_compose_yml(plan)
        files[vdir / f"k8s{suffix}.yaml"] = k8s_yaml(plan)
        modes.append(VllmMode(mode=plan.mode, files=[f"serve{suffix}.sh", f"docker-compose{suffix}.yml",
                                                     f"k8s{suffix}.yaml"], argv=plan.args("$EXPORT_DIR", "$HERE")))
    return files, VllmSection(written=True, modes=modes)
