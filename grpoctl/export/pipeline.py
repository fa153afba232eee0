"""``grpoctl export``: verify the adapter, then write every requested artifact into one staged folder.

    source (run dir | adapter folder) -> adapter + base
      verify   always; alone with --verify-only              -> verify.json
      merged   --merged 16bit: streaming merge               -> merged/
               --merged 4bit: 16-bit merge, nf4 once         -> merged-4bit/
      lora     --lora: the cleaned adapter                   -> lora/
      gguf     --gguf TYPES (grpoctl.export.gguf)            -> gguf/
               --imatrix auto|FILE (grpoctl.export.imatrix)  -> gguf/<name>-imatrix.gguf (+ -calibration.txt)
               --quant-recipe search (grpoctl.export.recipe)  -> gguf/<name>-<QUANT>.recipe.txt
      artifacts.json: every file with kind, size, sha256; provenance; the verify result

The export folder is built as a hidden sibling and renamed into place at the end, so a failure, a
full disk or Ctrl-C leaves nothing that looks like a finished export. One export owns the folder at a
time (a lock beside it). An export into a folder that already holds an export of the same adapter on
the same base adds what that export lacks (another GGUF type, lora/, merged/) and keeps the rest: the
new tree is a hard-linked copy of the old one plus the new parts, swapped in whole at the end.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from grpoctl.argtypes import check_fields
from grpoctl.artifacts import ARTIFACTS_FILE, AdapterRecord, Artifacts, MergedSection, Provenance
from grpoctl.errors import InputNotFoundError, OutputExistsError, UsageError
from grpoctl.exportlayout import GGUF_DIR, LORA_DIR, MERGED_4BIT_DIR, MERGED_DIR, VERIFY_FILE
from grpoctl.fsutil import (
    check_free_space,
    check_output_dir,
    disk_full_is_one_line,
    output_lock,
    scratch_dir,
    staged_dir,
    staged_file,
    sweep_stale_scratch,
    sweep_stale_siblings,
    updated_dir,
)
from grpoctl.jsonfiles import adapter_config
from grpoctl.models import tokenizer_bytes
from grpoctl.names import safe_name
from grpoctl.options import option
from grpoctl.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModelRef, RunDir

if TYPE_CHECKING:
    from grpoctl.export.imatrix import ImatrixRequest
    from grpoctl.export.taskparity import TaskRequest

MERGED_KINDS = ("16bit", "4bit")
DTYPES = ("auto", "bf16", "fp16")
# how the parity reference holds the base (grpoctl.export.parity.reference.streams)
REFERENCE_MODES = ("memory", "stream")


@dataclass
class ExportOptions:
    """What to export, as ``grpoctl export`` takes it (each field is the flag of the same name). With none of
    ``merged``/``lora``/``gguf`` set, the export is a 16-bit merge. ``gguf`` is parsed once, here: after
    construction it holds the canonical type names (``"Q8_0, q4_k"`` -> ``["q8_0", "q4_k_m"]``)."""

    base: str | None = option(metavar="MODEL", help="Base model (local folder or Hub id). Default: the run's base, or "
                              "the base an adapter folder's adapter_config names when it is on this machine.")
    merged: str | None = option(choices=MERGED_KINDS, help="Write merged weights: 16bit safetensors (merged/) or "
                                "bitsandbytes nf4 (merged-4bit/, needs CUDA). Default 16bit when nothing else is "
                                "asked.")
    dtype: str = option("auto", choices=DTYPES, help="dtype of the merged weights; auto keeps the base's 16-bit dtype.")
    lora: bool = option(False, help="Also write the cleaned adapter alone (lora/) for --enable-lora.")
    gguf: str | list[str] = option(default_factory=list, metavar="TYPES",
                                   help="GGUF types to write, comma separated (e.g. q8_0,q4_k_m).")
    imatrix: str | None = option(metavar="auto|FILE", help="Quantize the GGUF types with an importance matrix: auto "
                                 "computes one with llama.cpp's llama-imatrix over the run's training prompts and "
                                 "completions sampled from the trained model; FILE is yours (GGUF or legacy .dat). "
                                 "Needed for the iq* and q2_k types.")
    calibration: Path | None = option(metavar="FILE", help="Text to compute the importance matrix over instead of the "
                                      "run's data (implies --imatrix auto).")
    # task parity (grpoctl.export.taskparity): held-out prompts instead of the run's, how many (0: none), gate
    eval_data: Path | None = option(metavar="FILE", help="Task parity: held-out prompts (jsonl/csv/parquet, the run's "
                                    "column mapping) instead of those the run held out of training; the reference and "
                                    "each GGUF answer them, scored by the run's rewards.")
    task_prompts: int | None = option(metavar="N", help="Task parity: how many held-out prompts (default 8 on a CPU, "
                                      "32 on a GPU; 0: no task parity).")
    task_gate: bool = option(False, help="Fail a GGUF whose task reward drops significantly (the whole 95% interval "
                             "of the paired difference below zero).")
    quant_recipe: str | None = option(metavar="search", help="Search per-tensor types for each quantized GGUF type on "
                                      "the calibration text: groups of tensors one type step higher or lower, "
                                      "measured by KL, within the type's size; ships the searched file and its "
                                      "llama-quantize --tensor-type-file recipe when it beats the importance-matrix "
                                      "quant there and on the held-out probes. Needs --imatrix auto or --calibration.")
    output_dir: Path | None = option(short="-o", help="Export folder. Default: RUN/export, or ADAPTER-export beside "
                                     "an adapter folder.")
    force: bool = option(False, help="Replace a non-empty output folder.")
    verify_only: bool = option(False, help="Only verify the adapter (table + verify.json).")
    strict: bool = option(False, help="Fail verification on warnings (e.g. some modules never trained).")
    allow_pickle: bool = option(False, help="Accept pickle .bin checkpoints (they can run code when loaded).")
    llama_cpp_dir: Path | None = option(metavar="DIR", help="llama.cpp checkout with the GGUF converter (default: "
                                        "$GRPOCTL_LLAMA_CPP_DIR, else the converter cached from llama-cpp-python's "
                                        "sdist).")
    pre_tokenizer: str | None = option(metavar="TYPE", help="llama.cpp pre-tokenizer type to write into the GGUF "
                                       "when the converter does not recognise the tokenizer's (e.g. qwen2, llama-bpe, "
                                       "gpt-2; default: $GRPOCTL_GGUF_PRE_TOKENIZER, else recognised).")
    parity_gate: bool = option(True, off="--no-parity-gate", help="Fail the export when a GGUF departs from the PEFT "
                               "reference beyond its floor (--no-parity-gate: report it only).")
    parity_floors: str | None = option(metavar="TYPE=TOP1[:KL],...", help="Parity floors over the built-in ones, "
                                       "e.g. q4_k_m=0.9:0.1 (default: $GRPOCTL_PARITY_FLOORS, else built-in).")
    parity_reference: str | None = option(choices=REFERENCE_MODES, help="How the float32 parity reference holds the "
                                          "base: memory, or stream its weights layer by layer (default: "
                                          "$GRPOCTL_PARITY_REFERENCE, else stream when it does not fit the device's "
                                          "free memory).")
    parity_cache: bool | None = option(off="--no-parity-cache", help="Keep the parity reference's results and reuse "
                                       "them for a later export of the same base, adapter and probes (default: "
                                       "$GRPOCTL_PARITY_CACHE, else on).")
    parity_device: str | None = option(metavar="DEVICE", help="torch device of the parity reference, e.g. cpu or "
                                       "cuda:1 (default: $GRPOCTL_PARITY_DEVICE, else the first GPU, else cpu).")
    manifests: bool = option(True, off="--no-manifests", help="Write the Ollama Modelfile and vLLM manifests "
                             "(--no-manifests: skip them).")
    push: str | None = option(metavar="OWNER/NAME", help="Push the finished export to the Hub (same as `grpoctl push "
                              "EXPORT --repo OWNER/NAME`).")
    progress: bool = option(True, off="--quiet", off_short="-q", help="Progress bars, tables and notes (--quiet: "
                            "one line per kind of artifact written, then the manifest's path).")

    def task(self) -> TaskRequest:
        from grpoctl.export.taskparity import TaskRequest

        return TaskRequest(eval_data=self.eval_data, prompts=self.task_prompts, gate=self.task_gate)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.gguf:
            from grpoctl.gguftypes import parse_types

            # one string ("q8_0,q4_k_m", as --gguf takes it) or a list of them
            self.gguf = parse_types(self.gguf if isinstance(self.gguf, str) else ",".join(self.gguf))
        else:
            self.gguf = []


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
                            name=safe_name(f"{_short(ref.id)}-{source.resolve().name}"),
                            tokenizer_dir=adapter, system_prompt=run.system_prompt, run=run)
    if _has_adapter(source):
        if base:
            ref = _resolve_base(base)
        else:
            cfg_file = source / ADAPTER_CONFIG
            named = adapter_config(source).get("base_model_name_or_path") if cfg_file.is_file() else None
            if not named:
                raise UsageError(f"adapter {source} does not name its base model; pass --base MODEL")
            found = _local_base(named)
            if found is None:
                raise InputNotFoundError(f"adapter {source} was trained on {named}, which is not available on this "
                                         "machine; pass --base MODEL (a local folder or a Hub id)")
            ref = found
        label = source.resolve().name if source.resolve().name != "adapter" else source.resolve().parent.name
        return ExportSource(adapter_dir=source, base=ref, default_output=source.resolve().parent / f"{label}-export",
                            name=safe_name(f"{_short(ref.id)}-{label}"), tokenizer_dir=source)
    raise InputNotFoundError(f"{source} holds no adapter: expected a run directory ({'run.json'}) or a PEFT adapter "
                             f"folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")


def _validate(options: ExportOptions) -> tuple[list[str], dict | None]:
    """Reject bad options before any heavy work; returns the GGUF types and the parity floors given (None: the
    environment's or the built-in ones)."""
    if options.merged not in (None, *MERGED_KINDS):
        raise UsageError(f"--merged {options.merged} is not one of {', '.join(MERGED_KINDS)}")
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype} is not one of {', '.join(DTYPES)}")
    if options.parity_reference not in (None, *REFERENCE_MODES):
        raise UsageError(f"--parity-reference {options.parity_reference} is not one of {', '.join(REFERENCE_MODES)}")
    floors = None
    if options.parity_floors is not None:
        from grpoctl.export.parity.scoring import parse_floors

        floors = parse_floors(options.parity_floors)
    types = list(options.gguf)
    if types or options.imatrix or options.calibration:
        from grpoctl.export.imatrix import check_types

        if not types:
            raise UsageError("--imatrix and --calibration apply to GGUF quants; add --gguf TYPES")
        check_types(types, with_matrix=bool(options.imatrix or options.calibration))
    if types:
        options.task().check()
    elif options.eval_data or options.task_gate:
        raise UsageError("--eval-data and --task-gate apply to GGUF files; add --gguf TYPES")
    if options.quant_recipe is not None:
        from grpoctl.export.recipe import check_request as check_recipe

        if not types:
            raise UsageError("--quant-recipe applies to GGUF quants; add --gguf TYPES")
        check_recipe(options.quant_recipe, options.imatrix == "auto" or options.calibration is not None)
    if options.merged == "4bit" and not options.verify_only:
        from grpoctl.export.merge4bit import check_nf4_available

        check_nf4_available()
    return types, floors


def _recipe_request(options: ExportOptions):
    if options.quant_recipe is None:
        return None
    from grpoctl.export.recipe import RecipeRequest

    return RecipeRequest(method=options.quant_recipe)


def _provenance(src: ExportSource, adapter, report) -> Provenance:
    from grpoctl.models import identify

    cfg = adapter.config
    return Provenance(
        source=str(src.run.root if src.run else src.adapter_dir),
        run=str(src.run.root.resolve()) if src.run else None,
        run_step=_run_step(src.run),
        base_model=identify(src.base),
        adapter=AdapterRecord(path=str(src.adapter_dir), sha256=report.adapter_sha256, r=adapter.r,
                              lora_alpha=adapter.alpha, use_rslora=bool(cfg.get("use_rslora")),
                              use_dora=adapter.use_dora, target_modules=cfg.get("target_modules"),
                              modules_to_save=cfg.get("modules_to_save"), peft_version=cfg.get("peft_version")))


def _run_step(run: RunDir | None) -> int | None:
    steps = run.summary().get("steps") if run is not None else None
    return steps if isinstance(steps, int) else None


class Finisher(Protocol):
    """A later stage that writes into the staged export before it is swapped into place, so that the export and
    what that stage derives from it appear together or not at all. Passed in from above the stages
    (``grpoctl.api.export`` passes the manifests stage): export never imports a later stage."""

    def check(self, existing: Artifacts) -> None:
        """Before any work: refuse to add to ``existing`` (the export being added to), e.g. when a file the later
        stage wrote there was edited since."""

    def write(self, stage: Path, source: ExportSource, say: Callable[[str], None]) -> None:
        """Write into ``stage``, whose ``artifacts.json`` is saved, and record what was written there."""


@dataclass
class _Parts:
    """What an export writes: merged weights (16bit/4bit), the adapter alone, GGUF types."""

    merged: str | None
    lora: bool
    gguf: list[str]

    def __bool__(self) -> bool:
        return bool(self.merged or self.lora or self.gguf)


def _existing_export(out: Path, force: bool) -> Artifacts | None:
    """The export already in ``out`` that this one adds to; None when ``out`` is new or empty, is replaced
    (``force``), or holds only an earlier --verify-only report. Any other content is refused."""
    check_output_dir(out, force=True)  # a file where the folder should be
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if force or names <= {VERIFY_FILE}:
        return None
    if ARTIFACTS_FILE in names:
        return Artifacts.load(out)
    raise OutputExistsError(f"output directory {out} exists, is not empty and holds no export; pass --force to "
                            "replace it")


def _missing_parts(existing: Artifacts | None, src: ExportSource, adapter_sha256: str, merged_dtype: str,
                   wanted: _Parts, dtype_asked: bool, with_matrix: bool = False) -> _Parts:
    """What ``wanted`` adds to ``existing``. Only an export of the same adapter on the same base is added to;
    the parts it already has are kept as they are, never rebuilt (``--force`` rebuilds everything). A GGUF
    type already there made otherwise than asked (with or without an importance matrix), or new matrix quants
    beside an earlier matrix, are refused: the export would hold two answers to one question."""
    if existing is None:
        return wanted
    adapter, base = existing.provenance.adapter, existing.provenance.base_model
    theirs = (adapter and adapter.sha256, base and base.id, base and base.revision)
    if theirs != (adapter_sha256, src.base.id, src.base.revision):
        what = "another adapter" if theirs[0] != adapter_sha256 else f"the same adapter on another base ({theirs[1]})"
        raise OutputExistsError(f"{existing.root} holds an export of {what}; pass --force to replace it, or choose "
                                "another folder with -o")
    merged = wanted.merged
    if merged == "16bit" and existing.by_kind("merged"):
        have = existing.merged.dtype if existing.merged else None
        if dtype_asked and have != merged_dtype:
            raise OutputExistsError(f"{existing.root}/merged holds {have} weights, not the {merged_dtype} asked for; "
                                    "pass --force to rebuild the export")
        merged = None
    if merged == "4bit" and existing.by_kind("merged-4bit"):
        merged = None
    gguf = [t for t in wanted.gguf if not existing.by_kind(f"gguf:{t}")]
    if wanted.gguf:
        from grpoctl.gguftypes import TYPES

        for t in wanted.gguf:
            for entry in existing.by_kind(f"gguf:{t}"):
                if bool(entry.imatrix) != (with_matrix and TYPES[t].reads_imatrix):
                    made = "with" if entry.imatrix else "without"
                    raise OutputExistsError(f"{existing.root}/{entry.path} was made {made} an importance matrix; "
                                            "pass --force to rebuild the export as asked")
        if with_matrix and existing.by_kind("imatrix") and any(TYPES[t].reads_imatrix for t in gguf):
            raise OutputExistsError(f"{existing.root} already holds GGUF quants made with an importance matrix, and a "
                                    "second matrix would sit beside it; pass --force to rebuild every quant with the "
                                    "new one")
    return _Parts(merged=merged, lora=wanted.lora and not existing.by_kind("lora"), gguf=gguf)


def _estimate_bytes(parts: _Parts, weights, adapter, src: ExportSource, dtype: str, merged16_there: bool) -> int:
    """What the export will write, at its peak: merged shards at the output dtype, nf4 weights beside their
    16-bit intermediate, the adapter, each GGUF at its bits per weight beside the 16-bit GGUF intermediate."""
    from grpoctl.export.merge import estimate_bytes, output_dtype

    tokenizer_dir = src.tokenizer_dir or Path(src.base.path)
    tokenizer = tokenizer_bytes(tokenizer_dir)
    merged16 = estimate_bytes(weights, output_dtype(weights, dtype)) + tokenizer
    need = 0
    if parts.merged == "16bit":
        need += merged16
    elif parts.merged == "4bit":
        need += (0 if merged16_there else merged16) + merged16 // 3  # nf4: ~4.5 bits a weight + fp16 leftovers
    if parts.lora:
        need += adapter.weights_file.stat().st_size + tokenizer
    if parts.gguf:
        from grpoctl.gguftypes import estimate_gguf_bytes

        need += estimate_gguf_bytes(estimate_bytes(weights, "BF16"), parts.gguf, vocab_bytes=tokenizer)
    return need


def export(source: Path, options: ExportOptions, log: Callable[[str], None] | None = None, *,
           then: Finisher | None = None) -> Artifacts:
    """Verify the adapter at ``source`` and write the requested artifacts; returns the saved artifacts.

    ``log`` receives human-readable progress lines (the CLI passes ``click.echo``). ``then`` writes into the
    staged export before it is swapped into place (the manifests, from ``grpoctl.api.export``).
    """
    from grpoctl.export.merge import check_not_quantized, output_dtype
    from grpoctl.export.tensors import DTYPES as DTYPE_NAMES
    from grpoctl.export.tensors import ModelWeights
    from grpoctl.export.verify import open_adapter, verify_adapter

    say = log or (lambda _line: None)
    gguf_types, floors = _validate(options)
    src = resolve_source(Path(source), options.base)
    imatrix = None
    if options.imatrix or options.calibration:
        from grpoctl.export.imatrix import ImatrixRequest, check_request

        imatrix = ImatrixRequest.from_options(options.imatrix, options.calibration, src.run)
        if not options.verify_only:
            check_request(imatrix)
    out = Path(options.output_dir or src.default_output).absolute()
    wanted = _Parts(merged=options.merged or (None if (options.lora or gguf_types) else "16bit"), lora=options.lora,
                    gguf=gguf_types)

    with output_lock(out), disk_full_is_one_line(out):
        for path, size in sweep_stale_siblings(out) + sweep_stale_scratch():
            say(f"removed {path} ({size / 2**20:.1f} MiB), left by an export that was killed")
        existing = None if options.verify_only else _existing_export(out, options.force)
        with scratch_dir("export") as scratch:
            named = src
            src = _snapshot(src, Path(scratch) / "adapter-snapshot")
            adapter = open_adapter(src.adapter_dir, allow_pickle=options.allow_pickle,
                                   scratch=Path(scratch) / "adapter")
            weights = ModelWeights(Path(src.base.path), allow_pickle=options.allow_pickle)
            check_not_quantized(weights.config(), weights.dir)
            report = verify_adapter(adapter, weights, base_id=src.base.id, strict=options.strict)
            report.adapter = str(named.adapter_dir)
            say(report.table())
            if options.verify_only:
                with staged_file(out / VERIFY_FILE) as tmp:
                    report.save(tmp)
                say(f"wrote {out / VERIFY_FILE}")
                return Artifacts(root=out, verify=report.section())

            merged_dtype = DTYPE_NAMES[output_dtype(weights, options.dtype)][0]
            parts = _missing_parts(existing, src, report.adapter_sha256, merged_dtype, wanted, options.dtype != "auto",
                                   with_matrix=imatrix is not None)
            if existing is not None:
                if not parts:
                    say(f"{out} already holds everything asked for, from this adapter; nothing to do "
                        "(--force rebuilds it)")
                    return existing
                if then is not None:
                    then.check(existing)
            reuse = out / MERGED_DIR if existing is not None and existing.by_kind("merged") else None
            check_free_space(out, _estimate_bytes(parts, weights, adapter, src, options.dtype, reuse is not None),
                             "the export")
            # what is there now (--force, or a lone verify.json) may be replaced; what appears meanwhile may not
            replace = options.force or (out.is_dir() and any(out.iterdir()))
            with (updated_dir(out) if existing is not None else staged_dir(out, force=replace)) as stage:
                artifacts = Artifacts.load(stage) if existing is not None else Artifacts(root=stage)
                artifacts.provenance = _provenance(named, adapter, report)
                _write_parts(stage, artifacts, parts, src, adapter, weights, report, options,
                             reuse=stage / MERGED_DIR if reuse else None, say=say, imatrix=imatrix,
                             refused_report=refused_report(out), floors=floors)
                _check_snapshot(adapter, report.adapter_sha256, named, say)
                artifacts.save()
                if then is not None:
                    then.write(stage, src, say)
    refused_report(out).unlink(missing_ok=True)  # an earlier refusal's report no longer describes this export
    done = Artifacts.load(out)
    if done.parity is not None:
        from grpoctl.export.parity.report import unchecked_template_note

        if note := unchecked_template_note(done.parity.files):
            say(note)
    say(f"export complete: {out}")
    return done


def _snapshot(src: ExportSource, into: Path) -> ExportSource:
    """``src`` reading a private copy of its adapter folder (and of its tokenizer, when that is the adapter
    folder): the adapter is hashed, verified, merged, converted and used as the parity reference from the same
    bytes even while training replaces the original. A run is copied under its lock (RunBusyError while a
    training process holds it)."""
    from grpoctl.export.merge import TEMPLATE_DIR
    from grpoctl.rundir import snapshot_hold

    def copy() -> Path:
        # the files of the adapter folder (weights, config, tokenizer, chat templates), not its subfolders
        # (an adapter folder may be a trainer checkpoint)
        into.mkdir()
        for f in Path(src.adapter_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, into / f.name)
            elif f.name == TEMPLATE_DIR and f.is_dir():
                shutil.copytree(f, into / f.name)
        return into

    if src.run is not None:
        with snapshot_hold(src.run.root):
            copy()
    else:
        copy()
    tokenizer = into if src.tokenizer_dir is not None and Path(src.tokenizer_dir) == Path(src.adapter_dir) \
        else src.tokenizer_dir
    return replace(src, adapter_dir=into, tokenizer_dir=tokenizer)


def _check_snapshot(adapter, sha256: str, named: ExportSource, say: Callable[[str], None]) -> None:
    """At the end: every part was made from the adapter hashed at the start (the copy is unchanged), and a note
    when the original changed meanwhile (trained further), since the export holds the adapter as it was."""
    from grpoctl.errors import VerificationError
    from grpoctl.rundir import adapter_sha256

    if adapter_sha256(adapter.path) != sha256:
        raise VerificationError(f"the copy of the adapter this export read ({adapter.path}) changed during the "
                                "export; nothing was kept, run it again")
    original = Path(named.adapter_dir)
    if (original / ADAPTER_WEIGHTS).is_file() and adapter_sha256(original) != sha256:
        say(f"note: {original} changed while this export ran (trained further?); the export holds the adapter as it "
            f"was when the export started (sha256 {sha256[:12]}), and serve/push will call it stale")


def refused_report(out: Path) -> Path:
    """Where the parity report of a refused export is kept: beside the output folder, as the staged folder it was
    written into is removed with the refusal (and a finished export in ``out`` is left as it was)."""
    return out.parent / f"{out.name}.refused-parity.json"


def _write_parts(stage: Path, artifacts: Artifacts, parts: _Parts, src: ExportSource, adapter, weights,
                 report, options: ExportOptions, reuse: Path | None, say: Callable[[str], None],
                 imatrix: ImatrixRequest | None = None, refused_report: Path | None = None,
                 floors: dict | None = None) -> None:
    """Write ``parts`` into ``stage`` and record them; ``reuse`` is a merged 16-bit folder already there."""
    from grpoctl.export.merge import merge_16bit, write_lora
    from grpoctl.export.tensors import DTYPES as DTYPE_NAMES
    artifacts.verify = report.section()
    with staged_file(stage / VERIFY_FILE) as tmp:  # a new file: the old one may be linked to the live export
        report.save(tmp)
    artifacts.add_file(stage / VERIFY_FILE, "report")

    merged16 = reuse
    if parts.merged == "16bit" or (parts.merged == "4bit" and reuse is None):
        merged16 = stage / (MERGED_DIR if parts.merged == "16bit" else ".merged-16bit")
        say(f"merging the adapter into {src.base.id} -> {merged16.name}/")
        result = merge_16bit(weights.dir, adapter, merged16, dtype=options.dtype,
                             tokenizer_dir=src.tokenizer_dir, allow_pickle=options.allow_pickle,
                             progress=options.progress, weights=weights)
        artifacts.merged = MergedSection(dtype=DTYPE_NAMES[result.dtype][0], tensors=result.tensors,
                                        merged_tensors=result.merged,
                                        shards=sum(p.suffix == ".safetensors" for p in result.files),
                                        chat_template=result.chat_template)
        if not result.chat_template:
            say("warning: neither the adapter folder nor the base carries a chat template")
        if parts.merged == "16bit":
            artifacts.add_tree(merged16, "merged")
    elif reuse is not None and (parts.merged or parts.gguf):
        say(f"using the merged model already in the export ({reuse.name}/) as the 16-bit source")
    if parts.merged == "4bit":
        from grpoctl.export.merge4bit import quantize_nf4

        say("quantizing the merged model to bitsandbytes nf4 -> merged-4bit/")
        quantize_nf4(merged16, stage / MERGED_4BIT_DIR)
        artifacts.add_tree(stage / MERGED_4BIT_DIR, "merged-4bit")
        artifacts.merged.quantization = "bitsandbytes-nf4"

    if parts.lora:
        write_lora(adapter, stage / LORA_DIR, src.tokenizer_dir, weights.dir)
        artifacts.add_tree(stage / LORA_DIR, "lora")
        say("wrote the cleaned adapter -> lora/")

    if parts.gguf:
        from grpoctl.export.gguf import export_gguf

        export_gguf(weights.dir, adapter.path, stage / GGUF_DIR, parts.gguf, name=src.name,
                    artifacts=artifacts, merged_dir=merged16, llama_cpp_dir=options.llama_cpp_dir,
                    parity_gate=options.parity_gate, system_prompt=src.system_prompt, imatrix=imatrix,
                    refused_report=refused_report, task=options.task(), run=src.run,
                    recipe=_recipe_request(options), floors=floors, parity_device=options.parity_device,
                    parity_reference=options.parity_reference, pre_tokenizer=options.pre_tokenizer,
                    parity_cache=options.parity_cache, say=say)

    if merged16 is not None and merged16.name.startswith("."):
        shutil.rmtree(merged16)  # the 16-bit intermediate of a 4-bit-only export

