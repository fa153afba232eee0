"""From what the user names (a run, an export directory or a .gguf file) to the one GGUF to serve.

    RUN/                 -> RUN/export/artifacts.json
    EXPORT/              -> artifacts.json entries of kind ``gguf:<type>`` (gguf/<Name>-<QUANT>.gguf)
    path/to/file.gguf    -> that file; its export and run are used when it sits inside one

The run, when there is one, supplies what training used: the system prompt, the sequence length
and the sampling settings, so the served model is prompted the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpoctl.artifacts import ARTIFACTS_FILE, ArtifactManifest, run_of_export
from grpoctl.errors import InputNotFoundError, ServeError, UsageError
from grpoctl.fsutil import sha256_file
from grpoctl.rundir import RunDir

GGUF_KIND = "gguf"
# Picked when several quantizations were exported and none was asked for: the usual local default.
PREFERRED_QUANT = "q4_k_m"


@dataclass
class ServeTarget:
    """The GGUF to serve and the training context that goes with it."""

    gguf: Path
    quant: str | None = None
    export_dir: Path | None = None
    run: RunDir | None = None
    manifest_sha256: str | None = None
    modelfiles: list[Path] = field(default_factory=list)

    @property
    def system_prompt(self) -> str | None:
        return self.run.system_prompt if self.run is not None else None

    @property
    def max_seq_length(self) -> int | None:
        if self.run is None or "max_seq_length" not in self.run.section("model"):
            return None
        return self.run.max_seq_length

    @property
    def sampling(self) -> dict[str, float]:
        return self.run.sampling if self.run is not None else {}

    @property
    def reasoning_markers(self) -> tuple[str, str] | None:
        return self.run.reasoning_markers if self.run is not None else None

    def verify_digest(self) -> str:
        """sha256 of the GGUF, checked against artifacts.json so a file changed since export is caught."""
        digest = sha256_file(self.gguf, progress=True)
        if self.manifest_sha256 and digest != self.manifest_sha256:
            raise ServeError(f"{self.gguf} does not match the sha256 recorded in {ARTIFACTS_FILE} "
                             "(modified or replaced since export); re-run `grpoctl export`")
        return digest


def normalize_quant(quant: str) -> str:
    return quant.strip().lower()


def _quant_of(kind: str) -> str:
    return normalize_quant(kind.split(":", 1)[1]) if ":" in kind else ""


def _from_export(export_dir: Path, quant: str | None, run: RunDir | None) -> ServeTarget:
    manifest = ArtifactManifest.load(export_dir)
    ggufs = manifest.by_kind(GGUF_KIND)
    if not ggufs:
        raise InputNotFoundError(f"{export_dir} holds no GGUF export; run `grpoctl export "
                                 f"{run.root if run else export_dir} --gguf q4_k_m`")
    by_quant = {_quant_of(f.kind): f for f in ggufs}
    available = ", ".join(sorted(by_quant))
    if quant is not None:
        entry = by_quant.get(normalize_quant(quant))
        if entry is None:
            raise InputNotFoundError(f"quantization {normalize_quant(quant)} was not exported to {export_dir}; "
                                     f"exported: {available} (add it with `grpoctl export ... --gguf "
                                     f"{normalize_quant(quant)}`)")
    elif len(by_quant) == 1:
        entry = ggufs[0]
    elif PREFERRED_QUANT in by_quant:
        entry = by_quant[PREFERRED_QUANT]
    else:
        raise UsageError(f"{export_dir} has several GGUF exports ({available}); pick one with --quant")
    path = export_dir / entry.path
    if not path.is_file():
        raise InputNotFoundError(f"{path} is listed in {export_dir / ARTIFACTS_FILE} but missing on disk; "
                                 "re-run `grpoctl export`")
    if run is None:
        run = run_of_export(export_dir, manifest)
    modelfiles = [export_dir / f.path for f in manifest.by_kind("modelfile") if (export_dir / f.path).is_file()]
    return ServeTarget(gguf=path, quant=_quant_of(entry.kind), export_dir=export_dir, run=run,
                       manifest_sha256=entry.sha256, modelfiles=modelfiles)


def resolve_target(source: Path, quant: str | None = None) -> ServeTarget:
    """Find the GGUF to serve in a run directory, an export directory, or take a .gguf path as is."""
    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"{source} does not exist (expected a run directory, an export directory "
                                 "or a .gguf file)")
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise UsageError(f"{source} is not a .gguf file, a run directory or an export directory")
        export_dir = source.resolve().parent.parent
        if (export_dir / ARTIFACTS_FILE).is_file():
            manifest = ArtifactManifest.load(export_dir)
            rel = source.resolve().relative_to(export_dir.resolve()).as_posix()
            entry = next((f for f in manifest.files if f.path == rel), None)
            if entry is not None:
                if quant is not None and normalize_quant(quant) != _quant_of(entry.kind):
                    raise UsageError(f"{source.name} is {_quant_of(entry.kind)}, not {normalize_quant(quant)}; "
                                     "name the export directory to pick a quantization with --quant")
                target = _from_export(export_dir, _quant_of(entry.kind), None)
                target.gguf = source
                return target
        return ServeTarget(gguf=source)
    if RunDir.is_run(source):
        run = RunDir(source)
        if not (run.export_dir / ARTIFACTS_FILE).is_file():
            raise InputNotFoundError(f"run {source} has no export yet; run `grpoctl export {source} --gguf q4_k_m`")
        return _from_export(run.export_dir, quant, run)
    if (source / ARTIFACTS_FILE).is_file():
        return _from_export(source, quant, None)
    raise InputNotFoundError(f"{source} is neither a run directory (no run.json) nor an export directory "
                             f"(no {ARTIFACTS_FILE})")
