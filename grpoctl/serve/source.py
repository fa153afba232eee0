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

from grpoctl.artifacts import ARTIFACTS_FILE, Artifacts, export_dir_of
from grpoctl.errors import InputNotFoundError, ServeError, UsageError
from grpoctl.fsutil import sha256_file
from grpoctl.gguftypes import canonical_type, default_type, parse_types
from grpoctl.rundir import RunDir
from grpoctl.serve.common import RecordedAnswer


@dataclass
class ServeTarget:
    """The GGUF to serve and the training context that goes with it."""

    gguf: Path
    quant: str | None = None
    artifacts: Artifacts | None = None  # the export it belongs to, when it belongs to one
    manifest_sha256: str | None = None
    modelfiles: list[Path] = field(default_factory=list)

    @property
    def export_dir(self) -> Path | None:
        return self.artifacts.root if self.artifacts is not None else None

    @property
    def run(self) -> RunDir | None:
        return self.artifacts.run if self.artifacts is not None else None

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

    @property
    def recorded_answer(self) -> RecordedAnswer | None:
        """The greedy answer the export's parity check recorded for this file, to hold the served one to."""
        from grpoctl.export.parity.probes import DEFAULT_SYSTEM_PROMPT, GREEDY_QUESTION, GREEDY_TOKENS

        parity = self.artifacts.parity if self.artifacts is not None else None
        measured = parity.files.get(self.gguf.name) if parity is not None else None
        if measured is None:
            return None
        system = parity.probes.get("system_prompt") if isinstance(parity.probes, dict) else None
        return RecordedAnswer(system_prompt=system if isinstance(system, str) else DEFAULT_SYSTEM_PROMPT,
                              question=GREEDY_QUESTION, answer=measured.answer, max_tokens=GREEDY_TOKENS)

    def verify_digest(self) -> str:
        """sha256 of the GGUF, checked against artifacts.json so a file changed since export is caught."""
        digest = sha256_file(self.gguf, progress=True)
        if self.manifest_sha256 and digest != self.manifest_sha256:
            raise ServeError(f"{self.gguf} does not match the sha256 recorded in {ARTIFACTS_FILE} "
                             "(modified or replaced since export); re-run `grpoctl export`")
        return digest


def _from_export(export_dir: Path, quant: str | None) -> ServeTarget:
    artifacts = Artifacts.load(export_dir)
    by_quant = artifacts.ggufs()
    if quant is not None:
        quant = parse_types(quant)[0]  # a name export would refuse is refused here, before it is suggested
    if not by_quant:
        raise InputNotFoundError(f"{export_dir} holds no GGUF file; add one with "
                                 f"`{artifacts.export_command('--gguf', quant or 'q4_k_m')}`")
    if quant is not None and quant not in by_quant:
        add = artifacts.export_command("--gguf", quant)
        raise InputNotFoundError(f"quantization {quant} was not exported to {export_dir}; exported: "
                                 f"{', '.join(sorted(by_quant))} (add it with `{add}`)")
    chosen = canonical_type(quant) if quant is not None else default_type(by_quant)
    entry = by_quant[chosen]
    path = export_dir / entry.path
    if not path.is_file():
        raise InputNotFoundError(f"{path} is listed in {export_dir / ARTIFACTS_FILE} but missing on disk; "
                                 "re-run `grpoctl export`")
    modelfiles = [export_dir / f.path for f in artifacts.by_kind("modelfile") if (export_dir / f.path).is_file()]
    return ServeTarget(gguf=path, quant=chosen, artifacts=artifacts, manifest_sha256=entry.sha256,
                       modelfiles=modelfiles)


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
            artifacts = Artifacts.load(export_dir)
            rel = source.resolve().relative_to(export_dir.resolve()).as_posix()
            entry = next((f for f in artifacts.files if f.path == rel), None)
            if entry is not None and entry.quant:
                if quant is not None and canonical_type(quant) != entry.quant:
                    raise UsageError(f"{source.name} is {entry.quant}, not {canonical_type(quant)}; "
                                     "name the export directory to pick a quantization with --quant")
                target = _from_export(export_dir, entry.quant)
                target.gguf = source
                return target
        return ServeTarget(gguf=source)
    return _from_export(export_dir_of(source, f" --gguf {parse_types(quant)[0] if quant else 'q4_k_m'}"), quant)
