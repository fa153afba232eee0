"""``artifacts.json``: the export directory's inventory, the contract between export, manifests,
serve and push.

    EXPORT/
      artifacts.json     this manifest
      verify.json        adapter verification report
      merged/            merged 16-bit safetensors (+ config, tokenizer, chat template)
      merged-4bit/       bitsandbytes nf4 model
      lora/              cleaned adapter for ``--enable-lora`` serving
      gguf/              <Name>-<QUANT>.gguf files, Modelfile(s), parity.json
      vllm/              serve.sh, docker-compose.yml, k8s.yaml

Every file entry has a path relative to the export directory, a kind (``merged``, ``merged-4bit``,
``lora``, ``gguf:<type>``, ``modelfile``, ``manifest``, ``report``), its size and sha256. Stages add to
the manifest; nothing else in the directory is trusted by a later stage.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from grpoctl import __version__
from grpoctl.errors import DataError, InputNotFoundError
from grpoctl.fsutil import sha256_file, staged_file
from grpoctl.jsonfiles import check_types, read_json
from grpoctl.rundir import RunDir

ARTIFACTS_FILE = "artifacts.json"
SCHEMA_VERSION = 1
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {"path": (str,), "kind": (str,), "size": (int,), "sha256": (str,),
                                             "extra": (dict,)}
_LIBRARIES = ("torch", "transformers", "peft", "trl", "safetensors", "gguf", "llama_cpp_python",
              "huggingface_hub", "bitsandbytes", "unsloth")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class FileEntry:
    path: str
    kind: str
    size: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ArtifactManifest:
    """In-memory ``artifacts.json``. Load it, add files and sections, ``save()`` atomically."""

    root: Path
    provenance: dict[str, Any] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # verify, parity, manifests, ...
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()

    @classmethod
    def load(cls, root: Path) -> ArtifactManifest:
        p = Path(root) / ARTIFACTS_FILE
        if not p.is_file():
            raise InputNotFoundError(f"{root} has no {ARTIFACTS_FILE}; run `grpoctl export` first")
        data = read_json(p)
        check_types(data, {"files": (list,), "provenance": (dict,)}, p)
        files = []
        for i, f in enumerate(data.get("files") or []):
            if not isinstance(f, dict):
                raise DataError(f"{p}: files[{i}] should be an object, not {json.dumps(f)}")
            check_types(f, _ENTRY_TYPES, p, where=f"files[{i}].")
            missing = [k for k in ("path", "kind", "size", "sha256") if k not in f]
            if missing:
                raise DataError(f"{p}: files[{i}] lacks {', '.join(missing)}; re-run `grpoctl export`")
            files.append(FileEntry(**{k: f[k] for k in ("path", "kind", "size", "sha256", "extra") if k in f}))
        sections = {k: v for k, v in data.items()
                    if k not in {"schema", "grpoctl_version", "created", "provenance", "files"}}
        return cls(root=Path(root), provenance=data.get("provenance") or {}, files=files,
                   sections=sections, created=data.get("created", ""))

    @classmethod
    def load_or_new(cls, root: Path) -> ArtifactManifest:
        return cls.load(root) if (Path(root) / ARTIFACTS_FILE).is_file() else cls(root=Path(root))

    def add_file(self, path: Path, kind: str, **extra: Any) -> FileEntry:
        """Record (or refresh) one file; ``path`` may be absolute, relative to the export root, or relative to the
        working directory (as long as it lies inside the export root)."""
        p = Path(path)
        if p.is_absolute():
            abs_path = p
        elif (self.root / p).exists() or not p.absolute().is_relative_to(self.root):
            abs_path = self.root / p
        else:
            abs_path = p.absolute()
        rel = abs_path.resolve().relative_to(self.root.resolve()).as_posix()
        entry = FileEntry(path=rel, kind=kind, size=abs_path.stat().st_size, sha256=sha256_file(abs_path),
                          extra=extra)
        self.files = [f for f in self.files if f.path != rel] + [entry]
        return entry

    def add_tree(self, directory: Path, kind: str) -> list[FileEntry]:
        d = directory if directory.is_absolute() else self.root / directory
        return [self.add_file(p, kind) for p in sorted(d.rglob("*")) if p.is_file()]

    def remove_kind(self, prefix: str) -> None:
        self.files = [f for f in self.files if not f.kind.startswith(prefix)]

    def by_kind(self, prefix: str) -> list[FileEntry]:
        return [f for f in self.files if f.kind == prefix or f.kind.startswith(prefix + ":")]

    def to_dict(self) -> dict[str, Any]:
        prov = {"grpoctl_version": __version__, "libraries": library_versions(), **self.provenance}
        return {"schema": SCHEMA_VERSION, "grpoctl_version": __version__, "created": self.created,
                "provenance": prov, "files": [asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
                **self.sections}

    def save(self) -> Path:
        final = self.root / ARTIFACTS_FILE
        with staged_file(final) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return final


def run_of_export(export_dir: Path, manifest: ArtifactManifest | None = None) -> RunDir | None:
    """The training run an export came from: its parent (``RUN/export``) or the run its provenance records."""
    export_dir = Path(export_dir)
    if RunDir.is_run(export_dir.parent):
        return RunDir(export_dir.parent)
    manifest = manifest or ArtifactManifest.load(export_dir)
    recorded = manifest.provenance.get("run")
    if isinstance(recorded, str) and RunDir.is_run(Path(recorded)):
        return RunDir(Path(recorded))
    return None


def stale_export(manifest: ArtifactManifest, run: RunDir | None) -> str | None:
    """Why this export no longer matches the adapter it was made from, or None when it does (or cannot tell).

    ``artifacts.json`` records the exported adapter's sha256; training the run further (``--resume``) replaces
    ``RUN/adapter``, after which the export is someone else's model. Compared with the run's adapter, or for
    an export of a plain adapter folder with that folder when it was recorded by absolute path.
    """
    from grpoctl.export.lora import ADAPTER_WEIGHTS, adapter_sha256

    recorded = manifest.provenance.get("adapter") or {}
    if not recorded.get("sha256"):
        return None
    if run is not None:
        adapter_dir = run.adapter_dir
    elif recorded.get("path") and Path(recorded["path"]).is_absolute():
        adapter_dir = Path(recorded["path"])
    else:
        return None
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return None
    current = adapter_sha256(adapter_dir)
    if current == recorded["sha256"]:
        return None
    steps = run.summary().get("steps") if run is not None else None
    return (f"the export in {manifest.root} is stale: {adapter_dir} changed after it was exported (artifacts.json "
            f"records adapter sha256 {recorded['sha256'][:12]}, the adapter now has {current[:12]}"
            f"{f'; the run is at step {steps}' if steps else ''}), so it holds an older model than the run; "
            f"re-export with `{reexport_command(manifest, run.root if run is not None else adapter_dir)}`")


def reexport_command(manifest: ArtifactManifest, source: Path) -> str:
    """The ``grpoctl export`` line that rebuilds what this export holds, where it is."""
    parts = ["grpoctl", "export", str(source)]
    quants = sorted(f.kind.split(":", 1)[1] for f in manifest.by_kind("gguf"))
    if quants:
        parts += ["--gguf", ",".join(quants)]
    if manifest.by_kind("merged-4bit"):
        parts += ["--merged", "4bit"]
    elif manifest.by_kind("merged"):
        parts += ["--merged", "16bit"]
    if manifest.by_kind("lora"):
        parts.append("--lora")
    if manifest.root.resolve() != (Path(source) / "export").resolve():
        parts += ["-o", str(manifest.root)]
    return " ".join(parts + ["--force"])


def resolve_export(source: Path) -> tuple[Path, RunDir | None]:
    """What a user names after ``grpoctl push/manifests/serve``: a run directory (meaning its ``export/``) or
    an export directory; returns the export directory and, when known, its run."""
    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"{source} does not exist; give a run directory or an export directory")
    if RunDir.is_run(source):
        run = RunDir(source)
        if not (run.export_dir / ARTIFACTS_FILE).is_file():
            raise InputNotFoundError(f"run {source} has no export yet ({run.export_dir / ARTIFACTS_FILE} missing); "
                                     f"run `grpoctl export {source}` first")
        return run.export_dir, run
    if not (source / ARTIFACTS_FILE).is_file():
        raise InputNotFoundError(f"{source} holds no {ARTIFACTS_FILE}; give a run directory or the output of "
                                 "`grpoctl export`")
    return source, run_of_export(source)
