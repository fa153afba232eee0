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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.argtypes import check_fields
from grpoctl.artifacts import Artifacts, ManifestsSection
from grpoctl.errors import (
    InputNotFoundError,
    OutputExistsError,
    UsageError,
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
from grpoctl.manifests.context import ManifestContext
from grpoctl.manifests.ollama import TEMPLATE_MODES
from grpoctl.models import has_tokenizer
from grpoctl.options import option
from grpoctl.rundir import RunDir

log = logging.getLogger(__name__)

MANIFEST_KINDS = ("modelfile", "manifest")


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


def _find_tokenizer_dir(export_dir: Path, run: RunDir | None, explicit: Path | None) -> Path:
    candidates = [explicit] if explicit else tokenizer_dirs(export_dir, run.adapter_dir if run else None)
    for c in candidates:
        if has_tokenizer(c):
            return c
    where = ", ".join(str(c) for c in candidates if c)
    raise InputNotFoundError(f"no tokenizer found (looked in {where}); the manifests need its chat template: "
                             "re-export from a run or adapter folder that holds the tokenizer files")


def _load_tokenizer(ctx: ManifestContext) -> Any:
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
    from grpoctl.manifests import ollama, vllm  # here: the planners load templates and YAML

    options = options or ManifestOptions()
    export_dir = Path(export_dir).absolute()
    artifacts = Artifacts.load(export_dir)
    out_dir = Path(options.output_dir).absolute() if options.output_dir else export_dir
    ctx = ManifestContext(export_dir=export_dir, out_dir=out_dir, artifacts=artifacts, run=run,
                   tokenizer_dir=_find_tokenizer_dir(export_dir, run, tokenizer_dir), options=options)
    tok = _load_tokenizer(ctx)
    tokenizer_has_template = options.chat_template is None

    modelfiles, ollama_section = ollama.modelfiles(ctx, tok)
    vllm_files, vllm_section = vllm.vllm_files(ctx, tok, tokenizer_has_template)
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
