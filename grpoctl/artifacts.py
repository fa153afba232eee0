"""The export contract: ``artifacts.json``, what ``grpoctl export`` wrote and every later stage reads.

    EXPORT/
      artifacts.json     this record
      verify.json        adapter verification report, every module
      merged/            merged 16-bit safetensors (+ config, tokenizer, chat template)
      merged-4bit/       bitsandbytes nf4 model
      lora/              cleaned adapter for ``--enable-lora`` serving
      gguf/              <Name>-<QUANT>.gguf files, Modelfile(s), parity.json (+ <Name>-imatrix.gguf and
                         <Name>-calibration.txt when quantized with an importance matrix, and
                         <Name>-<QUANT>.recipe.txt for a file made from a searched recipe)
      vllm/              serve.sh, docker-compose.yml, k8s.yaml (+ parity-<mode>.json from ``serve --parity``)

Each section is a dataclass below, written by one stage and read by the later ones through these types:

    provenance   export      the run, the base model (id, revision, Hub id, license), the adapter, versions
    files        every stage each file: path relative to the export, kind (``merged``, ``merged-4bit``,
                             ``lora``, ``gguf:<type>``, ``imatrix``, ``calibration``, ``recipe``, ``modelfile``,
                             ``manifest``, ``report``), size, sha256; a GGUF made with an importance matrix or a
                             searched recipe names it
    verify       export      the adapter verification summary
    merged       export      the merged weights: dtype, tensor counts, shards
    parity       export      every GGUF measured against base + adapter applied by PEFT (and each importance-matrix
                             quant against the plain quant of its type; task parity: held-out answers scored by
                             the run's rewards)
    imatrix      export      the importance matrix: where it came from, its calibration text, the types it made
    quant_recipe export      per-tensor types searched on the calibration text: groups, recipe files, the table
    manifests    manifests   what the Modelfiles and vLLM manifests say, and notes
    served_parity  serve     a running vLLM server measured against the same PEFT reference (``--parity``)

Loaded and saved here only, checked key by key against these types (a key no stage writes is an error,
not a guess). ``schema`` is 2 since the sections became these types (1 was the untyped record); a file of
any other schema is refused with one line saying to re-export. Nothing else in the export directory is
trusted by a later stage.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from grpoctl.errors import DataError, InputNotFoundError
from grpoctl.exportlayout import ARTIFACTS_FILE
from grpoctl.fsutil import final_of, sha256_file, staged_file
from grpoctl.jsonfiles import from_json, read_json, to_json
from grpoctl.rundir import ADAPTER_WEIGHTS, BaseModelRef, RunDir, adapter_sha256
from grpoctl.version import __version__, library_versions

SCHEMA_VERSION = 2
_LIBRARIES = ("torch", "transformers", "peft", "trl", "safetensors", "gguf", "llama_cpp_python",
              "huggingface_hub", "bitsandbytes", "unsloth")


def export_library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **library_versions(_LIBRARIES)}


# --- sections -------------------------------------------------------------------------------------------

@dataclass
class FileEntry:
    path: str
    kind: str
    size: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
    imatrix: str | None = None  # a GGUF quantized with an importance matrix: that matrix's file name (beside it)
    recipe: str | None = None  # a GGUF quantized with a searched per-tensor recipe: the recipe's file name (beside it)

    @property
    def quant(self) -> str | None:
        """The GGUF type of a ``gguf:<type>`` file (``q4_k_m``)."""
        return self.kind.split(":", 1)[1] if self.kind.startswith("gguf:") else None


@dataclass
class AdapterRecord:
    """The exported adapter: where it was read, its identity (sha256) and the LoRA settings that matter."""

    path: str
    sha256: str
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    peft_version: str | None = None


@dataclass
class Provenance:
    """Written by export: what the export was made from."""

    source: str | None = None  # the run directory or adapter folder, as named
    run: str | None = None  # the run's absolute path, when exported from a run
    run_step: int | None = None  # the run's training step when exported (summary.json), to tell it trained further
    base_model: BaseModelRef | None = None
    adapter: AdapterRecord | None = None
    grpoctl_version: str = __version__
    libraries: dict[str, str] = field(default_factory=export_library_versions)


@dataclass
class VerifySummary:
    modules: int  # LoRA modules (lora_A/lora_B pairs)
    zero_b: int  # of them with lora_B still all zero
    zero_delta: int  # of them whose update scale * B @ A is zero
    max_abs_b: float
    delta_norm_min: float
    delta_norm_max: float


@dataclass
class VerifySection:
    """Written by export (``grpoctl.export.verify``): the adapter verification; ``verify.json`` has every module."""

    status: str  # ok | warn
    strict: bool
    adapter: str  # the adapter folder verified, on the exporting machine
    base: str  # the base's id as the run recorded it
    adapter_sha256: str
    summary: VerifySummary
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)


@dataclass
class MergedSection:
    """Written by export: the merged weights (merged/, or the 16-bit source of merged-4bit/)."""

    dtype: str
    tensors: int
    merged_tensors: int  # tensors the adapter changed
    shards: int
    chat_template: bool
    quantization: str | None = None  # bitsandbytes-nf4 when merged-4bit/ was written


@dataclass
class ParityFloor:
    top1: float | None  # None: top-1 not gated (the reference too flat for argmax agreement to mean anything)
    kl: float | None
    # default: the type's starting point; noise: lowered to the rounding noise this run measured; given: the user's
    basis: str | None = None


@dataclass
class RewardDifference:
    """File minus reference in weighted reward, per prompt: the mean and its bootstrap interval."""

    mean: float
    low: float
    high: float


@dataclass
class TaskResult:
    """One GGUF's answers to the held-out prompts, scored with the run's rewards (``grpoctl.export.taskparity``)."""

    mean_reward: float  # weighted as in training
    rewards: dict[str, float]  # each reward's mean
    agreement: float  # share of answers identical to the reference's
    difference: RewardDifference
    significant_drop: bool  # the whole interval below zero
    passed: bool  # False only when the task gate is on and the drop is significant
    examples: list[str]  # the first answers
    seconds: float | None = None  # what answering and scoring cost


@dataclass
class TaskReference:
    mean_reward: float
    rewards: dict[str, float]
    examples: list[str]
    seconds: float | None = None  # what answering and scoring cost this export (scoring alone when kept)
    kept: bool = False  # the answers were kept from an earlier export of the same base, adapter and prompts


@dataclass
class TaskSection:
    """How task parity ran, and the reference's scores; ``skipped`` says why it did not run."""

    skipped: str | None = None
    source: str | None = None  # the run's held-out prompts, or the --eval-data file
    prompts: int | None = None
    max_new_tokens: int | None = None
    max_new_tokens_note: str | None = None
    weights: dict[str, float] | None = None  # reward name -> weight, as in training
    level: float | None = None
    resamples: int | None = None
    gate: bool | None = None
    reference: TaskReference | None = None
    questions: list[str] | None = None


@dataclass
class ParityResult:
    """One GGUF file against the reference (``grpoctl.export.parity.measure``)."""

    type: str
    top1: float  # top-1 next-token agreement with the reference
    kl: float  # mean KL(reference || GGUF)
    positions: int
    floor: ParityFloor
    passed: bool
    tokenizer: dict[str, Any]  # one-BOS, same ids, end-of-turn, template checks
    answer: str  # the GGUF's greedy answer to the probe question
    kl_p99: float | None = None  # the 99th percentile of the per-position KL: the tail a mean hides
    task: TaskResult | None = None  # task parity, when it ran


@dataclass
class NoiseFloor:
    what: str
    top1: float
    kl: float


@dataclass
class QuantFigures:
    top1: float
    kl: float
    kl_p99: float | None = None


@dataclass
class ImatrixGain:
    """What the matrix bought: top-1 in points, KL reductions as fractions of the plain quant's (positive = better)."""

    top1: float
    kl: float | None = None
    kl_p99: float | None = None


@dataclass
class ImatrixTypeComparison:
    """One type made with the matrix, and the plain quant of that type, on the same probes."""

    imatrix: QuantFigures  # the file shipped
    plain: QuantFigures | None  # None: llama.cpp makes this type only with a matrix (``plain_note``)
    tensor_types: dict[str, int]  # llama-quantize's tensor types written, and how many of each
    without_matrix: list[str]  # tensors the matrix had no entry for
    gain: ImatrixGain | None = None
    plain_note: str | None = None


@dataclass
class ImatrixComparison:
    """Written by export (``grpoctl.export.imatrix``): plain vs importance-matrix quant, per type."""

    matrix: str  # the matrix's file name
    source: str  # computed | file
    held_out: bool | None  # True: the calibration text holds no probe text; None: unknown (a matrix given)
    calibration: str | None  # the calibration text's file name, when computed here
    types: dict[str, ImatrixTypeComparison]


@dataclass
class ParitySection:
    """Written by export (``grpoctl.export.parity.report``); ``files`` is keyed by GGUF file name."""

    reference: str
    probes: dict[str, Any]
    noise_floor: NoiseFloor
    reference_confidence: float
    top1_gated: bool
    reference_answer: str
    files: dict[str, ParityResult]
    passed: bool
    imatrix: ImatrixComparison | None = None
    task: TaskSection | None = None


@dataclass
class ServedParityRecord:
    """Written by ``grpoctl serve --engine vllm --parity``: a served model against export's PEFT reference."""

    mode: str  # the vLLM manifests' mode: merged | merged-4bit | lora
    model: str  # the served name asked for
    top1: float
    kl_topk: float  # KL(reference || server) over the server's top-k tokens, the rest pooled (a lower bound)
    positions: int
    kl_floor: float  # the gate: a multiple of the reference's bf16-vs-float32 KL
    passed: bool
    top_k: int
    reference: str
    noise_kl: float


@dataclass
class CalibrationRecord:
    """The text an importance matrix was computed over (``<name>-calibration.txt`` beside the GGUFs)."""

    source: str  # run: the run's training prompts + completions | file: the user's text
    file: str
    tokens: int
    characters: int
    given: str | None = None  # the user's file, as named
    dataset: str | None = None  # the run's dataset
    documents: int | None = None  # prompts (each with its completion) in the text
    rows: int | None = None  # training rows there were
    rows_with_probe_text: int | None = None  # of them left out: they hold parity probe text
    completions: str | None = None  # sampled from the trained model | the dataset's solutions
    max_new_tokens: int | None = None
    sampling: dict[str, float] | None = None
    seed: int | None = None
    system_prompt: str | None = None


@dataclass
class ImatrixSection:
    """Written by export (``grpoctl.export.imatrix``): the matrix the GGUF files marked ``imatrix`` were made with."""

    file: str  # gguf/<file>
    sha256: str
    source: str  # computed: by llama-imatrix here | file: the user's
    entries: int  # tensors it has an entry for
    types: list[str]  # the GGUF types quantized with it
    held_out: bool | None  # True: the calibration text holds no parity probe text; None: unknown (a matrix given)
    given: str | None = None  # the user's matrix file, as named
    calibration: CalibrationRecord | None = None
    tool: str | None = None  # llama-imatrix, when computed here; then its run:
    chunks: int | None = None
    chunk_tokens: int | None = None
    datasets: list[str] | None = None
    seconds: float | None = None
    threads: int | None = None


@dataclass
class RecipeGroup:
    """One tensor group of a searched recipe: what moving it one step on its type ladder did to the calibration KL."""

    name: str  # token_embd | output | blk.<first>-<last>.attn | blk.<first>-<last>.ffn
    tensors: int
    bytes: int  # its tensors' bytes in the importance-matrix quant
    chosen: str  # base | higher | lower | lower: <the parts lowered, e.g. ffn_up, ffn_down>
    higher_bytes: int | None = None  # None: no higher type on its ladder
    higher_kl: float | None = None  # mean KL on the calibration text with only this group one step higher
    higher_se: float | None = None  # standard error of its change from the importance-matrix quant's KL
    lower_bytes: int | None = None
    lower_kl: float | None = None
    lower_se: float | None = None


@dataclass
class RecipeTrade:
    """One trade of a searched recipe: an upgrade and the downgrades that paid for it, measured as the whole mix."""

    upgrade: str  # the group moved one step higher
    bytes: int  # what the upgrade adds
    kl_before: float  # mean KL on the calibration text of the mix before the trade
    kl_upgraded: float  # the same with the upgrade alone added to that mix
    kl_after: float | None = None  # with the upgrade and the payments kept (None: the upgrade gained nothing)
    se: float | None = None  # standard error of kl_after - kl_before, paired position by position
    paid_with: list[str] = field(default_factory=list)  # the downgrades kept (parts of groups: blk.12-15.ffn_up)
    refused: list[str] = field(default_factory=list)  # downgrades that cost more in the mix than they paid for
    taken: bool = False
    why: str = ""


@dataclass
class QuantRow:
    """One file of a type in the per-type comparison: its size and parity on the held-out probes."""

    variant: str  # plain | imatrix | searched
    bytes: int
    top1: float
    kl: float
    kl_p99: float | None = None
    shipped: bool = False  # the file exported as this type
    columns: dict[str, float] = field(default_factory=dict)  # further measures of the same file, by column name


@dataclass
class RecipeType:
    """The searched recipe of one GGUF type: how it was found, the file it made, and the comparison."""

    recipe: str  # the recipe's file name beside the GGUF files (llama-quantize --tensor-type-file)
    sha256: str
    shipped: bool  # the searched file is the exported file of this type (else the importance-matrix quant is)
    reason: str  # why it is or is not shipped
    budget_bytes: int  # no larger than this: the smaller of the plain and importance-matrix quants
    bytes: int  # the searched file's size
    calibration_kl: float  # mean KL on the calibration positions, the searched file
    base_calibration_kl: float  # the same for the importance-matrix quant it started from
    predicted_kl: float  # what the measurements one group at a time sum to for the recipe's changes
    tensor_types: dict[str, int]  # tensor types of the searched file, and how many of each
    changed: int  # tensors whose type differs from the importance-matrix quant
    groups: list[RecipeGroup]
    variants: int  # files measured by the search: one group moved in each, then the mixes of the trades
    seconds: float
    rows: list[QuantRow] = field(default_factory=list)
    trades: list[RecipeTrade] = field(default_factory=list)  # in the order tried


@dataclass
class QuantRecipeSection:
    """Written by export (``grpoctl.export.recipe``): per-tensor types searched on the calibration text."""

    method: str  # what the search did, in words
    calibration: str  # the calibration text's file name
    positions: int  # calibration positions the KL is measured on
    reference: str  # the 16-bit GGUF every KL is measured against
    types: dict[str, RecipeType]


@dataclass
class OllamaSection:
    """Written by manifests: the Modelfile's chat format and what each Ollama version renders it with."""

    written: bool
    template_mode: str | None = None  # --ollama-template: auto | go | native
    translated: bool | None = None  # the chat template translates to a Go template
    reason: str | None = None  # why it does not, or why the translation is not faithful
    family: str | None = None
    reasoning: str | None = None
    bos_added_by_runtime: bool | None = None
    stops: list[str] | None = None
    fidelity: dict[str, Any] | str | None = None  # the Go check, or why it did not run
    native_check: dict[str, Any] | str | None = None  # the llama.cpp check, or why it did not run
    template_written: bool | None = None
    system_in_template: bool | None = None
    renders_with: dict[str, str] | None = None  # per Ollama version range
    faithful: dict[str, bool | None] | None = None
    go_template: str | None = None  # the checked Go template, when not written (for Ollama < 0.30)
    llama_cpp_departures: list[str] | None = None
    summary: str | None = None
    default_quant: str | None = None  # the GGUF type the plain Modelfile uses
    quants: list[str] | None = None
    system: bool | None = None
    parameters: dict[str, float | int] | None = None
    license: str | None = None
    hub_files: list[str] | None = None  # gguf/template, system, params: what `ollama run hf.co/...` reads


@dataclass
class VllmMode:
    mode: str  # merged | merged-4bit | lora
    files: list[str]
    argv: list[str]


@dataclass
class VllmSection:
    written: bool
    modes: list[VllmMode] = field(default_factory=list)


@dataclass
class ManifestsSection:
    """Written by manifests (``grpoctl.manifests``)."""

    ollama: OllamaSection
    vllm: VllmSection
    notes: list[str] = field(default_factory=list)
    output_dir: str | None = None  # where they were written, when outside the export


# --- the record -----------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class _Stored:
    """``artifacts.json`` as stored (what ``from_json`` checks)."""

    schema: int
    grpoctl_version: str
    created: str
    provenance: Provenance
    files: list[FileEntry]
    verify: VerifySection | None = None
    merged: MergedSection | None = None
    parity: ParitySection | None = None
    imatrix: ImatrixSection | None = None
    quant_recipe: QuantRecipeSection | None = None
    manifests: ManifestsSection | None = None
    served_parity: dict[str, ServedParityRecord] | None = None  # keyed engine:mode (``vllm:merged``)


@dataclass
class Artifacts:
    """``artifacts.json`` in memory: each stage adds its files and its section, then ``save()`` (atomic)."""

    root: Path
    provenance: Provenance = field(default_factory=Provenance)
    files: list[FileEntry] = field(default_factory=list)
    verify: VerifySection | None = None
    merged: MergedSection | None = None
    parity: ParitySection | None = None
    imatrix: ImatrixSection | None = None
    quant_recipe: QuantRecipeSection | None = None
    manifests: ManifestsSection | None = None
    served_parity: dict[str, ServedParityRecord] | None = None  # keyed engine:mode (``vllm:merged``)
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()

    @classmethod
    def load(cls, root: Path) -> Artifacts:
        path = Path(root) / ARTIFACTS_FILE
        if not path.is_file():
            raise InputNotFoundError(f"{root} has no {ARTIFACTS_FILE}; run `grpoctl export` first")
        data = read_json(path)
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:  # checked before the shape: another schema's keys are not a corrupt file
            raise DataError(f"{path} has schema {json.dumps(schema)}; this grpoctl ({__version__}) reads schema "
                            f"{SCHEMA_VERSION} only: re-export with `grpoctl export ... --force`")
        stored = from_json(_Stored, data, path)
        return cls(root=Path(root), provenance=stored.provenance, files=stored.files, verify=stored.verify,
                   merged=stored.merged, parity=stored.parity, imatrix=stored.imatrix,
                   quant_recipe=stored.quant_recipe, manifests=stored.manifests,
                   served_parity=stored.served_parity, created=stored.created)

    def save(self) -> Path:
        stored = _Stored(schema=SCHEMA_VERSION, grpoctl_version=__version__, created=self.created,
                         provenance=self.provenance, files=sorted(self.files, key=lambda f: f.path),
                         verify=self.verify, merged=self.merged, parity=self.parity, imatrix=self.imatrix,
                         quant_recipe=self.quant_recipe, manifests=self.manifests,
                         served_parity=self.served_parity)
        final = self.root / ARTIFACTS_FILE
        with staged_file(final) as tmp:
            tmp.write_text(json.dumps(to_json(stored), indent=2) + "\n")
        return final

    # files ---------------------------------------------------------------------------------------------
    def add_file(self, path: Path | str, kind: str, *, imatrix: str | None = None, recipe: str | None = None,
                 **extra: Any) -> FileEntry:
        """Record (or refresh) one file; ``path`` may be absolute, relative to the export root, or relative to the
        working directory (as long as it lies inside the export root). ``imatrix``: the matrix a GGUF was made with;
        ``recipe``: its per-tensor recipe."""
        p = Path(path)
        if p.is_absolute():
            abs_path = p
        elif (self.root / p).exists() or not p.absolute().is_relative_to(self.root):
            abs_path = self.root / p
        else:
            abs_path = p.absolute()
        rel = abs_path.resolve().relative_to(self.root.resolve()).as_posix()
        entry = FileEntry(path=rel, kind=kind, size=abs_path.stat().st_size, sha256=sha256_file(abs_path),
                          extra=extra, imatrix=imatrix, recipe=recipe)
        self.files = [f for f in self.files if f.path != rel] + [entry]
        return entry

    def add_tree(self, directory: Path, kind: str) -> list[FileEntry]:
        d = directory if directory.is_absolute() else self.root / directory
        return [self.add_file(p, kind) for p in sorted(d.rglob("*")) if p.is_file()]

    def remove_kind(self, prefix: str) -> None:
        self.files = [f for f in self.files if not f.kind.startswith(prefix)]

    def by_kind(self, prefix: str) -> list[FileEntry]:
        return [f for f in self.files if f.kind == prefix or f.kind.startswith(prefix + ":")]

    def ggufs(self) -> dict[str, FileEntry]:
        """The GGUF files by type (``q4_k_m``), in file order."""
        return {f.quant: f for f in sorted(self.by_kind("gguf"), key=lambda f: f.path) if f.quant}

    # the run it came from, and whether it still matches ------------------------------------------------
    @cached_property
    def run(self) -> RunDir | None:
        """The training run this export came from: its parent (``RUN/export``) or the run the provenance records."""
        if RunDir.is_run(self.root.parent):
            return RunDir(self.root.parent)
        recorded = self.provenance.run
        return RunDir(Path(recorded)) if recorded and RunDir.is_run(Path(recorded)) else None

    def stale(self) -> str | None:
        """Why this export no longer matches the adapter it was made from, or None when it does (or cannot tell).

        The provenance records the exported adapter's sha256; training the run further (``--resume``) replaces
        ``RUN/adapter``, after which the export is someone else's model. Compared with the run's adapter, or for
        an export of a plain adapter folder with that folder when it was recorded by absolute path.
        """
        recorded = self.provenance.adapter
        if recorded is None or not recorded.sha256:
            return None
        run = self.run
        if run is not None:
            adapter_dir = run.adapter_dir
        elif recorded.path and Path(recorded.path).is_absolute():
            adapter_dir = Path(recorded.path)
        else:
            return None
        if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
            return None
        current = adapter_sha256(adapter_dir)
        if current == recorded.sha256:
            return None
        return (f"the export in {self.root} is stale: {self._what_changed(adapter_dir, run)} (artifacts.json "
                f"records adapter sha256 {recorded.sha256[:12]}, the adapter now has {current[:12]}), so it holds an "
                f"older model than the run; re-export with `{self.reexport_command()}`")

    def _what_changed(self, adapter_dir: Path, run: RunDir | None) -> str:
        steps = run.summary().get("steps") if run is not None else None
        then = self.provenance.run_step
        if isinstance(steps, int) and isinstance(then, int) and steps > then:
            return f"the run was trained further after this export (step {then} then, step {steps} now: --resume)"
        if run is not None and run.summary().get("resumed_from"):
            at = f" (now at step {steps})" if isinstance(steps, int) else ""
            return f"the run was trained further with --resume after this export{at}"
        return f"{adapter_dir} changed after it was exported"

    def command_source(self) -> tuple[str, list[str]]:
        """What ``grpoctl export`` is given to write into this export again: the run directory, or the adapter
        folder with ``--base`` naming the recorded base (so it is taken for the same base, and added to)."""
        if (run := self.run) is not None:
            return str(run.root), []
        adapter = self.provenance.adapter
        source = adapter.path if adapter is not None and adapter.path else (self.provenance.source or ".")
        base = self.provenance.base_model
        return source, (["--base", base.id] if base is not None and base.id else [])

    def export_command(self, *flags: str, force: bool = False) -> str:
        """A ``grpoctl export`` line that writes ``flags`` into this export where it is (``-o`` unless it is
        the run's default folder), quoted for a POSIX shell, that runs as printed."""
        import shlex

        source, base = self.command_source()
        parts = ["grpoctl", "export", source, *base, *flags]
        root = final_of(self.root)  # written from the staged export: the folder it becomes
        if root.resolve() != (Path(source) / "export").resolve():
            parts += ["-o", str(root)]
        return " ".join(shlex.quote(p) for p in parts + (["--force"] if force else []))

    def reexport_command(self) -> str:
        """The ``grpoctl export`` line that rebuilds what this export holds, where it is."""
        parts: list[str] = []
        if quants := sorted(self.ggufs()):
            parts += ["--gguf", ",".join(quants)]
        if (matrix := self.imatrix) is not None:  # the quants marked imatrix are rebuilt with the same kind of matrix
            if matrix.given is not None:
                parts += ["--imatrix", matrix.given]
            elif matrix.calibration is not None and matrix.calibration.given is not None:
                parts += ["--calibration", matrix.calibration.given]
            else:
                parts += ["--imatrix", "auto"]
        if any(f.recipe for f in self.by_kind("gguf")):
            parts += ["--quant-recipe", "search"]
        if self.by_kind("merged-4bit"):
            parts += ["--merged", "4bit"]
        elif self.by_kind("merged"):
            parts += ["--merged", "16bit"]
        if self.by_kind("lora"):
            parts.append("--lora")
        return self.export_command(*parts, force=True)


def export_dir_of(source: Path, export_flags: str = "") -> Path:
    """The export directory a user means after ``grpoctl push/manifests/serve``: a run directory's ``export/``, or
    an export directory. InputNotFoundError otherwise; for a run not exported yet it names the ``grpoctl export``
    line (with ``export_flags``, what the caller needs: `` --gguf q4_k_m``) that makes one."""
    import shlex

    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"{source} does not exist (expected a run directory or an export directory)")
    if RunDir.is_run(source):
        export_dir = RunDir(source).export_dir
        if not (export_dir / ARTIFACTS_FILE).is_file():
            raise InputNotFoundError(f"run {source} has no export yet; run `grpoctl export "
                                     f"{shlex.quote(str(source))}{export_flags}` first")
        return export_dir
    if not (source / ARTIFACTS_FILE).is_file():
        raise InputNotFoundError(f"{source} is neither a run directory (no run.json) nor an export directory "
                                 f"(no {ARTIFACTS_FILE})")
    return source


def find_export(source: Path) -> Artifacts:
    """The export a user names after ``grpoctl push/manifests/serve`` (see :func:`export_dir_of`)."""
    return Artifacts.load(export_dir_of(source))
