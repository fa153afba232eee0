"""``write_manifests``: Ollama Modelfiles and vLLM manifests for an export directory.

Reads what earlier stages left behind -- ``artifacts.json`` (which GGUF, merged, 4-bit and LoRA
folders exist), the run's settings (system prompt, sequence length, sampling, reasoning markers,
LoRA rank, base model) and the tokenizer's own chat template -- and writes

    gguf/Modelfile            for ``--quant``, else the default type (``grpoctl.gguftypes.default_type``)
    gguf/Modelfile.<QUANT>    one per GGUF when there are several
    gguf/template, gguf/system, gguf/params   the same TEMPLATE, SYSTEM and PARAMETERs in the files the Hub gives
                              to ``ollama run hf.co/OWNER/REPO`` (pushed to the GGUF repo's root)
    vllm/serve.sh, vllm/docker-compose.yml, vllm/k8s.yaml        merged (or 4-bit) model, else base + LoRA
    vllm/serve-lora.sh, vllm/docker-compose-lora.yml, vllm/k8s-lora.yaml   base + LoRA, when both exist
    vllm/chat_template.jinja  only with --chat-template (the tokenizer has none)

and records them in ``artifacts.json`` (kinds ``modelfile`` and ``manifest``, section ``manifests``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.argtypes import check_fields
from grpoctl.artifacts import Artifacts, ManifestsSection, OllamaSection, VllmMode, VllmSection
from grpoctl.errors import (
    InputNotFoundError,
    OutputExistsError,
    UsageError,
    VerificationError,
)
from grpoctl.exportlayout import tokenizer_dirs
from grpoctl.fsutil import (
    check_writable,
    disk_full_is_one_line,
    output_lock,
    sha256_file,
    staged_file,
    updated_dir,
)
from grpoctl.manifests.ollama import TEMPLATE_MODES
from grpoctl.models import config_dtype, has_tokenizer
from grpoctl.names import safe_name
from grpoctl.options import option
from grpoctl.rundir import RunDir

log = logging.getLogger(__name__)

MANIFEST_KINDS = ("modelfile", "manifest")


class SystemPromptRefused(UsageError):
    """The training system prompt cannot go into a Modelfile as it is; ``no_system`` leaves it out."""


@dataclass
class ManifestOptions:
    """What ``grpoctl manifests`` takes (each field is the flag of the same name); everything else is derived from
    the run and the tokenizer."""

    output_dir: Path | None = option(help="Where gguf/ and vllm/ manifests go (default: the export directory).")
    no_system: bool = option(False, help="Leave the training system prompt out of the Modelfile.")
    chat_template: Path | None = option(metavar="FILE", help="Jinja chat template file, for a tokenizer that has none.")
    quant: str | None = option(help="GGUF type the plain Modelfile uses (default: Q4_K_M if exported).")
    served_model_name: str | None = option(help="Model name clients ask vLLM for (default: the GGUF name).")
    hub_repo: str | None = option(help="Serve the merged model from this Hub repo instead of the folder.")
    # bounds: VllmPlan, with the flags' names
    gpu_memory_utilization: float = option(0.90, help="Share of each GPU's memory vLLM may take.")
    # None = derived from the run (see _parallelism): the GPUs it trained on, one full replica per GPU
    tensor_parallel_size: int | None = option(help="GPUs one vLLM replica is split over (default: 1).")
    data_parallel_size: int | None = option(help="vLLM replicas behind the endpoint (default: the run's training "
                                            "process count divided by the tensor parallel size).")
    port: int = option(8000, help="Port the vLLM server listens on.")
    # Modelfile TEMPLATE: "auto" (what Ollama >= 0.30 renders faithfully), "go" (the translated Go template,
    # for Ollama < 0.30), "native" (never; the GGUF's chat template)
    ollama_template: str = option("auto", choices=TEMPLATE_MODES, help="Modelfile TEMPLATE: auto = what Ollama "
                                  "0.30+ renders exactly like the chat template (usually none: Ollama renders the "
                                  "GGUF's own template); go = the checked Go translation, for Ollama before 0.30; "
                                  "native = never.")
    # replace changed manifests; with ollama_template "go", write a Go template failing the check
    force: bool = option(False, help="Replace existing manifests, and write them even if the Ollama template check "
                         "fails.")
    unchecked_ok: bool = False  # no Go toolchain: write the template marked unchecked instead of failing

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class WrittenManifests:
    """What one run of the manifests stage wrote: the files, and the section it recorded in artifacts.json."""

    files: list[Path]
    section: ManifestsSection


@dataclass
class _Context:
    export_dir: Path
    out_dir: Path
    artifacts: Artifacts
    run: RunDir | None
    tokenizer_dir: Path
    options: ManifestOptions
    notes: list[str] = field(default_factory=list)
    vllm_notes: list[str] = field(default_factory=list)  # about the vLLM manifests: kept only when they are written


def _find_tokenizer_dir(export_dir: Path, run: RunDir | None, explicit: Path | None) -> Path:
    candidates = [explicit] if explicit else tokenizer_dirs(export_dir, run.adapter_dir if run else None)
    for c in candidates:
        if has_tokenizer(c):
            return c
    where = ", ".join(str(c) for c in candidates if c)
    raise InputNotFoundError(f"no tokenizer found (looked in {where}); the manifests need its chat template: "
                             "re-export from a run or adapter folder that holds the tokenizer files")


def _load_tokenizer(ctx: _Context) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ctx.tokenizer_dir))
    if ctx.options.chat_template is not None:
        path = Path(ctx.options.chat_template)
        if not path.is_file():
            raise InputNotFoundError(f"--chat-template {path} does not exist")
        tok.chat_template = path.read_text()
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"the tokenizer in {ctx.tokenizer_dir} has no chat template, so neither Ollama nor vLLM "
                         "would know the chat format the model was trained on; pass --chat-template FILE "
                         "(the Jinja template used in training)")
    return tok


def _model_name(ctx: _Context) -> str:
    if ctx.options.served_model_name:
        return ctx.options.served_model_name
    ggufs = ctx.artifacts.by_kind("gguf")
    if ggufs:
        stem = Path(ggufs[0].path).stem
        return safe_name(stem.rsplit("-", 1)[0] if "-" in stem else stem)
    base = ctx.run.base_model.id if ctx.run else ctx.export_dir.name
    return safe_name(base.split(":")[-1].rstrip("/").split("/")[-1]) + "-grpo"


# --- Ollama -------------------------------------------------------------------------------------------

def _bake_system(ctx: _Context, fmt: Any, system: str) -> str:
    """A TEMPLATE whose default system block is ``system``, for prompts no Modelfile quoting can carry.

    Ollama turns SYSTEM into a leading system message, which the template renders as
    sys_before + .System + sys_after; baking that text into the no-system branch gives the same bytes.
    Checked here with Go: baked template without SYSTEM == plain template with SYSTEM.
    """
    from grpoctl.chatprobes import conversations
    from grpoctl.manifests.gorender import render_go
    from grpoctl.manifests.templates import to_go_template

    baked = to_go_template(fmt.with_default_system(system))
    plain = to_go_template(fmt)
    convs = [c for c in conversations(markers=fmt.reasoning_markers) if c.messages[0]["role"] != "system"]
    cases = [{"messages": c.messages, "think": c.think} for c in convs]
    want = render_go(plain, [dict(c, default_system=system) for c in cases])
    got = render_go(baked, cases)
    if want != got:
        raise VerificationError("the system prompt cannot be quoted in a Modelfile and baking it into TEMPLATE "
                                "changes the prompt; rephrase it or pass --no-system")
    ctx.notes.append("the system prompt cannot be quoted in a Modelfile (lines ending in \" and \"\"\"), so it is "
                     "the TEMPLATE's default system block instead of a SYSTEM line")
    return baked


def _sampling_parameters(run: RunDir | None) -> dict[str, float | int]:
    if run is None:
        return {}
    out: dict[str, float | int] = {"num_ctx": run.max_seq_length}
    for key, val in run.sampling.items():
        out[key] = int(val) if key == "top_k" else float(val)
    return out


def _modelfiles(ctx: _Context, tok: Any) -> tuple[dict[Path, str], dict[str, Any]]:
    from grpoctl.manifests.modelfile import Modelfile, quote_value
    from grpoctl.manifests.ollama import plan_template

    by_quant = {q.upper(): f for q, f in ctx.artifacts.ggufs().items()}
    if not by_quant:
        ctx.notes.append("no GGUF in the export: no Modelfile written; add one with "
                         f"`{ctx.artifacts.export_command('--gguf', 'q4_k_m')}`")
        return {}, OllamaSection(written=False)
    from grpoctl.gguftypes import canonical_type, default_type

    wanted = canonical_type(ctx.options.quant).upper() if ctx.options.quant else None
    if wanted and wanted not in by_quant:
        raise UsageError(f"--quant {ctx.options.quant}: the export has {', '.join(sorted(by_quant))} GGUFs only")
    default = wanted or default_type(by_quant).upper()
    system = None if ctx.options.no_system else (ctx.run.system_prompt if ctx.run else None)
    plan = plan_template(tok, ctx.run.reasoning_markers if ctx.run else None, system, ctx.options.ollama_template,
                         force=ctx.options.force, unchecked_ok=ctx.options.unchecked_ok,
                         gguf=ctx.export_dir / by_quant[default].path)
    template, stops, section, fmt = plan.template, plan.stops, plan.section, plan.fmt
    ctx.notes += plan.notes
    if system and fmt is not None and not fmt.system_supported:
        ctx.notes.append("the chat template has no system role, so the training system prompt is left out of "
                         "the Modelfile")
        system = None
    if system:
        try:
            quote_value(system, "the system prompt")
        except UsageError as err:
            if not plan.go_faithful:
                raise SystemPromptRefused(str(err)) from None
            try:
                template, system = _bake_system(ctx, fmt, system), None
            except VerificationError as baked:
                raise SystemPromptRefused(str(baked)) from None
            section.update(system_in_template=True, template_written=True)
    gguf_out = ctx.out_dir / "gguf"
    base = ctx.artifacts.provenance.base_model
    license_ = base.license if base else None
    params = _sampling_parameters(ctx.run)
    comments = ["Ollama Modelfile written by grpoctl from the model's own chat template and training settings.",
                "Create the model: ollama create <name> -f <this file>"]
    if template is None:
        native = plan.prompt is None or plan.prompt.mode == "native"
        comments.append("No TEMPLATE: Ollama 0.30 and later render the chat template embedded in the GGUF "
                        "(llama.cpp's Jinja engine)." if native else f"No TEMPLATE: {plan.prompt.story()}.")
        if plan.go_faithful:
            comments.append("For Ollama before 0.30: grpoctl manifests RUN --ollama-template go")
    else:
        comments.append("TEMPLATE: the chat template in Ollama's Go template language, checked byte for byte "
                        "against transformers.")
    files: dict[Path, str] = {}
    for quant, entry in sorted(by_quant.items()):
        rel = os.path.relpath(ctx.export_dir / entry.path, gguf_out)
        mf = Modelfile(from_=f"./{rel}" if not rel.startswith("..") else rel, template=template, system=system,
                       parameters={"stop": stops, **params}, license=[license_] if license_ else [],
                       comments=comments)
        text = mf.render()
        if quant == default:
            files[gguf_out / "Modelfile"] = text
        if len(by_quant) > 1:
            files[gguf_out / f"Modelfile.{quant}"] = text
    hub = _hub_files(template if template is not None else plan.go_template if plan.go_faithful else None,
                     system, {"stop": stops, **params})
    files.update({gguf_out / name: text for name, text in hub.items()})
    if "template" not in hub:
        ctx.notes.append("no checked Go template: `ollama run hf.co/...` uses the template the Hub picks from the "
                         "GGUF's metadata")
    section.update(written=True, default_quant=default, quants=sorted(by_quant), system=bool(system),
                   parameters=params, license=license_, hub_files=sorted(hub))
    return files, OllamaSection(**section)


def _hub_files(template: str | None, system: str | None, parameters: dict[str, Any]) -> dict[str, str]:
    """The files the Hub hands to ``ollama run hf.co/OWNER/REPO``, at the GGUF repo's root (the Hub's Ollama docs:
    ``template``, a Go template; ``system``; ``params``, JSON): the Modelfile's TEMPLATE (else the checked Go
    template), SYSTEM and PARAMETERs. Ollama reads the first two as the file's bytes (server/images.go GetModel),
    so nothing is added to them, and ``params`` into api.Options (``FromMap``: JSON numbers, ``stop`` a list)."""
    out = {"params": json.dumps(parameters, indent=2, ensure_ascii=False) + "\n"}
    if template is not None:
        out["template"] = template
    if system:
        out["system"] = system
    return out


# --- vLLM ---------------------------------------------------------------------------------------------

def _dtype(ctx: _Context) -> str:
    for folder in ("merged", "merged-4bit"):
        dt = config_dtype(ctx.export_dir / folder)
        if dt in ("bfloat16", "float16", "float32"):
            return dt
    return "auto"


def _reasoning_parser(tok: Any, ctx: _Context) -> str | None:
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


def _parallelism(ctx: _Context) -> tuple[int, int]:
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


def _plans(ctx: _Context, tok: Any, tokenizer_has_template: bool) -> list[Any]:
    from grpoctl.manifests.vllm import BASE_MOUNT, VllmPlan, lora_unsupported

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
        plans.append(VllmPlan(mode="merged", model=o.hub_repo or "merged", model_is_ref=bool(o.hub_repo),
                              dtype=_dtype(ctx), **common, **extra))
    elif ctx.artifacts.by_kind("merged-4bit"):
        plans.append(VllmPlan(mode="merged-4bit", model="merged-4bit", quantization="bitsandbytes",
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
            tokenizer = "lora" if has_tokenizer(ctx.export_dir / "lora") else None
            plans.append(VllmPlan(mode="lora", model=location, model_is_ref=True, base_is_local=local,
                                  base_served_name=base_name, revision=revision, lora_path="lora",
                                  tokenizer=tokenizer, lora_rank=_lora_rank(ctx, adapter_cfg), dtype=_dtype(ctx),
                                  notes=notes, **common, **extra))
    return plans


def _lora_base(ctx: _Context) -> tuple[str, bool, str, str | None] | None:
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


def _exported_adapter_config(ctx: _Context) -> dict[str, Any]:
    from grpoctl.jsonfiles import adapter_config

    lora = ctx.export_dir / "lora"
    return adapter_config(lora) if (lora / "adapter_config.json").is_file() else {}


def _lora_rank(ctx: _Context, adapter_cfg: dict[str, Any]) -> int:
    """The adapter's largest rank (``r`` and any ``rank_pattern``), which ``--max-lora-rank`` must cover."""
    ranks = [int(adapter_cfg.get("r", 0))] + [int(v) for v in (adapter_cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > 0:
        return max(ranks)
    return ctx.run.lora_r if ctx.run else 16


def _vllm_files(ctx: _Context, tok: Any, tokenizer_has_template: bool) -> tuple[dict[Path, str], dict[str, Any]]:
    from grpoctl.manifests.vllm import docker_compose_yml, k8s_yaml, serve_sh

    plans = _plans(ctx, tok, tokenizer_has_template)
    if plans:
        ctx.notes.extend(ctx.vllm_notes)
    if not plans:
        ctx.notes.append("no merged model or LoRA adapter in the export: no vLLM manifests written; add the adapter "
                         f"for vLLM's --enable-lora with `{ctx.artifacts.export_command('--lora')}` (the manifests "
                         "are written again with it)")
        return {}, VllmSection(written=False)
    vdir = ctx.out_dir / "vllm"
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


# --- entry point ----------------------------------------------------------------------------------------

def write_manifests(export_dir: Path, *, run: RunDir | None = None, tokenizer_dir: Path | None = None,
                    options: ManifestOptions | None = None) -> WrittenManifests:
    """Write the Ollama Modelfile(s) and vLLM manifests for ``export_dir``; return what was written.

    Manifests inside the export replace the ones grpoctl wrote there before (a file changed since then, or one
    grpoctl did not write, needs ``force``), and the export changes in one step: the new manifests and the
    updated ``artifacts.json`` appear together or not at all.

    Arguments:
        export_dir: directory holding ``artifacts.json`` (``grpoctl export`` output).
        run: the training run (system prompt, sequence length, sampling, reasoning markers, LoRA rank,
            base model); None when the export stands alone.
        tokenizer_dir: folder with the tokenizer and chat template; default: the first that holds one of
            EXPORT/merged, EXPORT/lora, EXPORT/merged-4bit, RUN/adapter (``grpoctl.exportlayout.tokenizer_dirs``).
        options: overrides (see :class:`ManifestOptions`).
    """
    options = options or ManifestOptions()
    export_dir = Path(export_dir).absolute()
    out_dir = Path(options.output_dir).absolute() if options.output_dir else export_dir
    Artifacts.load(export_dir)  # "run `grpoctl export` first" before anything else
    check_writable(out_dir)
    with output_lock(export_dir, what="manifests"), disk_full_is_one_line(out_dir):
        if not out_dir.resolve().is_relative_to(export_dir.resolve()):
            return render_manifests(export_dir, run=run, tokenizer_dir=tokenizer_dir, options=options)
        rel = out_dir.resolve().relative_to(export_dir.resolve())
        with updated_dir(export_dir) as stage:
            written = render_manifests(stage, run=run, tokenizer_dir=tokenizer_dir,
                                       options=dataclasses.replace(options, output_dir=stage / rel))
        written.files = [export_dir / p.relative_to(stage) for p in written.files]
        return written


def check_manifests_unedited(artifacts: Artifacts) -> None:
    """Refuse (OutputExistsError) when a manifest grpoctl wrote into the export was changed since."""
    for entry in artifacts.files:
        if entry.kind not in MANIFEST_KINDS:
            continue
        path = artifacts.root / entry.path
        if path.is_file() and (path.stat().st_size != entry.size or sha256_file(path) != entry.sha256):
            raise OutputExistsError(f"{path} was changed since grpoctl wrote it; pass --force to replace it (or "
                                    "move your version out of the export first)")


def render_manifests(export_dir: Path, *, run: RunDir | None = None, tokenizer_dir: Path | None = None,
                     options: ManifestOptions | None = None) -> WrittenManifests:
    """What :func:`write_manifests` does, straight into ``export_dir``, for a caller that owns that folder (the
    export stage while it is being built)."""
    options = options or ManifestOptions()
    export_dir = Path(export_dir).absolute()
    artifacts = Artifacts.load(export_dir)
    out_dir = Path(options.output_dir).absolute() if options.output_dir else export_dir
    ctx = _Context(export_dir=export_dir, out_dir=out_dir, artifacts=artifacts, run=run,
                   tokenizer_dir=_find_tokenizer_dir(export_dir, run, tokenizer_dir), options=options)
    tok = _load_tokenizer(ctx)
    tokenizer_has_template = options.chat_template is None

    modelfiles, ollama_section = _modelfiles(ctx, tok)
    vllm_files, vllm_section = _vllm_files(ctx, tok, tokenizer_has_template)
    files = {**modelfiles, **vllm_files}
    if not files:
        raise InputNotFoundError(f"{export_dir} has no GGUF, merged model or LoRA adapter to write manifests for; "
                                 "run `grpoctl export` first")
    inside = out_dir.resolve().is_relative_to(export_dir.resolve())
    if inside:
        # the manifests grpoctl wrote before are replaced as a set: one this run does not write again goes too
        if not options.force:
            check_manifests_unedited(artifacts)
        for entry in [f for f in artifacts.files if f.kind in MANIFEST_KINDS]:
            (export_dir / entry.path).unlink(missing_ok=True)
            artifacts.files.remove(entry)
    existing = [p for p in files if p.exists()]
    if existing and not options.force:
        raise OutputExistsError(f"{existing[0]} already exists and grpoctl did not write it; pass --force to "
                                "replace it")

    # Everything is rendered before anything is written: a failure leaves the old files in place.
    written: list[Path] = []
    for path, text in files.items():
        with staged_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            if path.suffix == ".sh":
                tmp.chmod(0o755)
        written.append(path)
    if inside:
        for path in written:
            artifacts.add_file(path, "modelfile" if path.name.startswith("Modelfile") else "manifest")
    artifacts.manifests = ManifestsSection(ollama=ollama_section, vllm=vllm_section, notes=ctx.notes,
                                           output_dir=str(out_dir) if not inside else None)
    artifacts.save()
    return WrittenManifests(files=written, section=artifacts.manifests)
