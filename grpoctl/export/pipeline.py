"""``grpoctl export``: verify the adapter, then write every requested artifact into one staged folder.

    source (run dir | adapter folder) -> adapter + base
      verify   always; alone with --verify-only              -> verify.json
      merged   --merged 16bit: streaming merge               -> merged/
               --merged 4bit: 16-bit merge, nf4 once         -> merged-4bit/
      lora     --lora: the cleaned adapter                   -> lora/
      gguf     --gguf TYPES (grpoctl.export.gguf)            -> gguf/
      artifacts.json: every file with kind, size, sha256; provenance; the verify result

The export folder is built as a hidden sibling and renamed into place at the end, so a failure, a
full disk or Ctrl-C leaves nothing that looks like a finished export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import DependencyError, DiskFullError, InputNotFoundError, UsageError
from grpoctl.export.artifacts import ArtifactManifest
from grpoctl.export.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from grpoctl.fsutil import check_output_dir, staged_dir, staged_file
from grpoctl.rundir import BaseModelRef, RunDir

MERGED_KINDS = ("16bit", "4bit")
DTYPES = ("auto", "bf16", "fp16")


@dataclass
class ExportOptions:
    """What to export. With none of ``merged``/``lora``/``gguf`` set, the export is a 16-bit merge."""

    base: str | None = None  # base model override: local folder or Hub id
    merged: str | None = None  # "16bit" | "4bit"
    dtype: str = "auto"  # merged dtype: auto (the base's 16-bit dtype) | bf16 | fp16
    lora: bool = False
    gguf: list[str] = field(default_factory=list)  # llama.cpp types, validated by grpoctl.export.gguf
    output_dir: Path | None = None
    force: bool = False
    verify_only: bool = False
    strict: bool = False
    allow_pickle: bool = False
    llama_cpp_dir: Path | None = None
    parity_gate: bool = True
    progress: bool = True
    manifests: bool = True  # Ollama Modelfile + vLLM manifests for what was exported
    imatrix: str | None = None  # GGUF importance matrix: "auto" (from the run's data) or a matrix file
    calibration: Path | None = None  # text to compute the matrix over instead of the run's data


@dataclass
class ExportSource:
    """Where the adapter and its base are, and where the export goes by default."""

    adapter_dir: Path
    base: BaseModelRef
    default_output: Path
    name: str  # for GGUF file names: <name>-Q4_K_M.gguf
    tokenizer_dir: Path | None = None
    system_prompt: str | None = None
    run: RunDir | None = None


def _has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() or (folder / ADAPTER_WEIGHTS).is_file() \
        or (folder / "adapter_model.bin").is_file()


def _resolve_base(spec: str) -> BaseModelRef:
    from grpoctl.models import resolve_base_model

    return resolve_base_model(spec)


def _local_base(name: str) -> BaseModelRef | None:
    """The adapter's recorded base, if this machine has it without downloading anything."""
    from grpoctl.models import EMBEDDED_HUB_ID, EMBEDDED_ID

    if name in (EMBEDDED_HUB_ID, EMBEDDED_ID):
        return _resolve_base(EMBEDDED_ID)
    if Path(name).expanduser().is_dir():
        return _resolve_base(name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(name, local_files_only=True)
        except Exception:  # not in the cache (the Hub raises several types): not available locally
            return None
        return BaseModelRef(id=name, path=local, revision=Path(local).name)
    return None


def _short(model_id: str) -> str:
    from grpoctl.models import EMBEDDED_HUB_ID, EMBEDDED_ID

    if model_id == EMBEDDED_ID:
        model_id = EMBEDDED_HUB_ID
    return Path(model_id.rstrip("/")).name


def resolve_source(source: Path, base: str | None = None) -> ExportSource:
    """A run directory (its adapter and recorded base) or an adapter folder (``--base`` or the base its
    adapter_config names, when that is on this machine)."""
    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"{source} does not exist; give a run directory (from `grpoctl train`) or a "
                                 "PEFT adapter folder")
    if RunDir.is_run(source):
        run = RunDir(source)
        adapter = run.adapter_dir
        if not _has_adapter(adapter):
            hint = " (checkpoints/ exists: training may not have finished)" if run.checkpoints_dir.is_dir() else ""
            raise InputNotFoundError(f"run {source} has no adapter: {adapter} holds no {ADAPTER_CONFIG}{hint}")
        if base:
            ref = _resolve_base(base)
        else:
            ref = run.base_model
            if not Path(ref.path).is_dir():
                # the recorded folder is gone (cache cleared, other machine): rebuild or re-fetch by id
                ref = _resolve_base(ref.id)
        return ExportSource(adapter_dir=adapter, base=ref, default_output=run.export_dir,
                            name=f"{_short(ref.id)}-{source.resolve().name}",
                            tokenizer_dir=adapter, system_prompt=run.system_prompt, run=run)
    if _has_adapter(source):
        if base:
            ref = _resolve_base(base)
        else:
            cfg_file = source / ADAPTER_CONFIG
            named = json.loads(cfg_file.read_text()).get("base_model_name_or_path") if cfg_file.is_file() else None
            if not named:
                raise UsageError(f"adapter {source} does not name its base model; pass --base MODEL")
            found = _local_base(named)
            if found is None:
                raise InputNotFoundError(f"adapter {source} was trained on {named}, which is not available on this "
                                         "machine; pass --base MODEL (a local folder or a Hub id)")
            ref = found
        label = source.resolve().name if source.resolve().name != "adapter" else source.resolve().parent.name
        return ExportSource(adapter_dir=source, base=ref, default_output=source.resolve().parent / f"{label}-export",
                            name=f"{_short(ref.id)}-{label}", tokenizer_dir=source)
    raise InputNotFoundError(f"{source} holds no adapter: expected a run directory ({'run.json'}) or a PEFT adapter "
                             f"folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")


def _validate(options: ExportOptions) -> list[str]:
    """Reject bad options before any heavy work; returns the parsed GGUF types."""
    if options.merged not in (None, *MERGED_KINDS):
        raise UsageError(f"--merged {options.merged} is not one of {', '.join(MERGED_KINDS)}")
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype} is not one of {', '.join(DTYPES)}")
    types: list[str] = []
    if options.gguf:
        try:
            from grpoctl.export.gguf import parse_gguf_types
        except ImportError as err:
            raise DependencyError(f"GGUF export is not available in this installation ({err})") from None
        types = parse_gguf_types(",".join(options.gguf))
    if types or options.imatrix or options.calibration:
        from grpoctl.export.imatrix import check_types

        if not types:
            raise UsageError("--imatrix and --calibration apply to GGUF quants; add --gguf TYPES")
        check_types(types, with_matrix=bool(options.imatrix or options.calibration))
    if options.merged == "4bit" and not options.verify_only:
        from grpoctl.export.merge4bit import check_nf4_available

        check_nf4_available()
    return types


def _check_space(out: Path, need: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * 1.05 + (64 << 20):
        raise DiskFullError(f"not enough disk space for the export in {out}: about {need / 2**30:.2f} GiB needed, "
                            f"{free / 2**30:.2f} GiB free")


def _provenance(src: ExportSource, adapter, report) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "source": str(src.run.root if src.run else src.adapter_dir),
        **({"run": str(src.run.root.resolve())} if src.run else {}),
        "base_model": {"id": src.base.id, "revision": src.base.revision, "path": src.base.path},
        "adapter": {"path": str(src.adapter_dir), "sha256": report.adapter_sha256, "r": adapter.r,
                    "lora_alpha": adapter.alpha, "use_rslora": bool(cfg.get("use_rslora")),
                    "use_dora": adapter.use_dora, "target_modules": cfg.get("target_modules"),
                    "modules_to_save": cfg.get("modules_to_save"), "peft_version": cfg.get("peft_version")},
    }


def _write_manifests(stage: Path, src: ExportSource, say: Callable[[str], None]) -> None:
    """Serving manifests for the staged export; a template that does not translate faithfully fails the export,
    a machine without a Go toolchain only loses the template check (noted in artifacts.json)."""
    from grpoctl.manifests.api import TOKENIZER_FILES, ManifestOptions, write_manifests

    # the trained tokenizer (adapter folder) first, else the export's own merged/lora copies, else the base's
    candidates = [src.tokenizer_dir, stage / "merged", stage / "lora", Path(src.base.path)]
    tokenizer_dir = next((c for c in candidates if c and any((c / f).is_file() for f in TOKENIZER_FILES)), None)
    written = write_manifests(stage, run=src.run, tokenizer_dir=tokenizer_dir,
                              options=ManifestOptions(unchecked_ok=True))
    section = ArtifactManifest.load(stage).sections.get("manifests", {})
    for note in section.get("notes", []) if isinstance(section, dict) else []:
        say(f"note: {note}")
    say("wrote serving manifests: " + ", ".join(p.relative_to(stage).as_posix() for p in written))


def export(source: Path, options: ExportOptions, log: Callable[[str], None] | None = None) -> ArtifactManifest:
    """Verify the adapter at ``source`` and write the requested artifacts; returns the saved manifest.

    ``log`` receives human-readable progress lines (the CLI passes ``click.echo``).
    """
    from grpoctl.export.merge import check_not_quantized, estimate_bytes, merge_16bit, output_dtype, write_lora
    from grpoctl.export.tensors import DTYPES as DTYPE_NAMES
    from grpoctl.export.tensors import ModelWeights
    from grpoctl.export.verify import VERIFY_FILE, open_adapter, verify_adapter

    say = log or (lambda _line: None)
    gguf_types = _validate(options)
    src = resolve_source(Path(source), options.base)
    imatrix = None
    if options.imatrix or options.calibration:
        from grpoctl.export.imatrix import ImatrixRequest, check_request

        imatrix = ImatrixRequest.from_options(options.imatrix, options.calibration, src.run)
        if not options.verify_only:
            check_request(imatrix)
    out = Path(options.output_dir) if options.output_dir else src.default_output
    merged = options.merged or (None if (options.lora or gguf_types) else "16bit")
    force = options.force
    if out.is_dir() and {p.name for p in out.iterdir()} == {VERIFY_FILE}:
        force = True  # only an earlier --verify-only report, which this export writes again
    if not options.verify_only:
        check_output_dir(out, force)

    with tempfile.TemporaryDirectory(prefix="grpoctl-export-") as scratch:
        adapter = open_adapter(src.adapter_dir, allow_pickle=options.allow_pickle, scratch=Path(scratch) / "adapter")
        weights = ModelWeights(Path(src.base.path), allow_pickle=options.allow_pickle)
        check_not_quantized(weights.config(), weights.dir)
        report = verify_adapter(adapter, weights, base_id=src.base.id, strict=options.strict)
        say(report.table())
        verify_section = {k: v for k, v in report.to_dict().items() if k != "modules"}

        if options.verify_only:
            with staged_file(out / VERIFY_FILE) as tmp:
                report.save(tmp)
            say(f"wrote {out / VERIFY_FILE}")
            return ArtifactManifest(root=out, sections={"verify": verify_section})

        need = estimate_bytes(weights, output_dtype(weights, options.dtype)) if merged else 0
        _check_space(out, need + adapter.weights_file.stat().st_size * options.lora)
        with staged_dir(out, force=force) as stage:
            manifest = ArtifactManifest(root=stage, provenance=_provenance(src, adapter, report))
            manifest.sections["verify"] = verify_section
            manifest.add_file(report.save(stage / VERIFY_FILE), "report")

            merged16: Path | None = None
            if merged:
                merged16 = stage / ("merged" if merged == "16bit" else ".merged-16bit")
                say(f"merging {src.adapter_dir} into {src.base.id} -> {merged16.name}/")
                result = merge_16bit(weights.dir, adapter, merged16, dtype=options.dtype,
                                     tokenizer_dir=src.tokenizer_dir, allow_pickle=options.allow_pickle,
                                     progress=options.progress, weights=weights)
                manifest.sections["merged"] = {
                    "dtype": DTYPE_NAMES[result.dtype][0], "tensors": result.tensors, "merged_tensors": result.merged,
                    "shards": sum(p.suffix == ".safetensors" for p in result.files),
                    "chat_template": result.chat_template}
                if not result.chat_template:
                    say("warning: neither the adapter folder nor the base carries a chat template")
                if merged == "16bit":
                    manifest.add_tree(merged16, "merged")
                else:
                    from grpoctl.export.merge4bit import quantize_nf4

                    say("quantizing the merged model to bitsandbytes nf4 -> merged-4bit/")
                    quantize_nf4(merged16, stage / "merged-4bit")
                    manifest.add_tree(stage / "merged-4bit", "merged-4bit")
                    manifest.sections["merged"]["quantization"] = "bitsandbytes-nf4"

            if options.lora:
                write_lora(adapter, stage / "lora", src.tokenizer_dir, weights.dir)
                manifest.add_tree(stage / "lora", "lora")
                say("wrote the cleaned adapter -> lora/")

            if gguf_types:
                from grpoctl.export.gguf import export_gguf

                export_gguf(weights.dir, adapter.path, stage / "gguf", gguf_types, name=src.name, manifest=manifest,
                            merged_dir=merged16, llama_cpp_dir=options.llama_cpp_dir,
                            parity_gate=options.parity_gate, system_prompt=src.system_prompt, imatrix=imatrix)

            if merged16 is not None and merged16.name.startswith("."):
                shutil.rmtree(merged16)  # the 16-bit intermediate of a 4-bit-only export
            manifest.save()
            if options.manifests:
                _write_manifests(stage, src, say)
    say(f"export complete: {out}")
    return ArtifactManifest.load(out)
