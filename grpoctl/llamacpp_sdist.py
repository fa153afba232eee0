"""The installed llama-cpp-python's sdist: the one source of llama.cpp's converter and its C++ tools.

Both must be the llama.cpp inside the installed llama-cpp-python, and the sdist of that exact version is
where it lives (``vendor/llama.cpp``). The sdist is downloaded once with ``pip download`` (so pip's index
settings, proxies and hash checks apply), never cloned, and kept in ``<cache>/llama.cpp/sdist/`` so the
converter (``grpoctl.export.converter``) and the tools (``grpoctl.llamacpp_tools``) share one download.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from grpoctl.errors import DependencyError, OfflineError
from grpoctl.fsutil import cache_dir, file_lock, sha256_file, staged_file
from grpoctl.procs import run_captured

DIST = "llama-cpp-python"
VENDOR = ("vendor", "llama.cpp")
# llama-cpp-python's sdist carries the submodule's git metadata; its HEAD names the vendored commit
_COMMIT_MEMBER = (".git", "modules", "vendor", "llama.cpp", "HEAD")


def installed_version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        raise DependencyError("llama-cpp-python is not installed; GGUF export needs it: "
                              "pip install 'llama-cpp-python[server]==0.3.36'") from None


@dataclass(frozen=True)
class Sdist:
    path: Path
    version: str
    sha256: str
    llama_cpp_commit: str | None  # the vendored llama.cpp commit, when the sdist records it


def sdist_dir() -> Path:
    return cache_dir() / "llama.cpp" / "sdist"


def _record(version: str) -> Path:
    # written last: its presence says the tarball next to it is complete
    return sdist_dir() / f"{DIST}-{version}.json"


def cached_sdist(version: str | None = None) -> Sdist | None:
    """The kept sdist of ``version`` (default: the installed one), or None when it was never fetched."""
    record = _record(version or installed_version())
    try:
        info = json.loads(record.read_text())
        sdist = Sdist(path=sdist_dir() / info["file"], version=info["version"], sha256=info["sha256"],
                      llama_cpp_commit=info.get("llama_cpp_commit"))
    except (OSError, ValueError, KeyError):
        return None
    return sdist if sdist.path.is_file() else None


def fetch_sdist(version: str | None = None, hint: str = "") -> Sdist:
    """The sdist of ``version`` (default: the installed one), downloaded from PyPI unless already kept.

    ``hint`` ends the one-line OfflineError raised when it cannot be downloaded (what to do instead).
    """
    version = version or installed_version()
    if (sdist := cached_sdist(version)) is not None:
        return sdist
    folder = sdist_dir()
    with file_lock(folder / ".lock", waiting=f"grpoctl: waiting for another process fetching the {DIST} sdist"):
        if (sdist := cached_sdist(version)) is not None:  # fetched while we waited
            return sdist
        print(f"grpoctl: downloading the {DIST}=={version} sdist from PyPI (once, ~80 MB) -> {folder}", flush=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, f"{DIST}=={version}"]
            proc = run_captured(cmd)
            found = list(Path(tmp).glob("*.tar.gz"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise OfflineError(f"could not download the {DIST}=={version} sdist from PyPI ({tail[0]})"
                                   + (f"; {hint}" if hint else ""))
            sdist = Sdist(path=folder / found[0].name, version=version, sha256=sha256_file(found[0]),
                          llama_cpp_commit=_vendored_commit(found[0]))
            os.replace(found[0], sdist.path)
        with staged_file(_record(version)) as tmp_record:
            info = {k: v for k, v in asdict(sdist).items() if k != "path"} | {"file": sdist.path.name}
            tmp_record.write_text(json.dumps(info, indent=1) + "\n")
    return sdist


def _vendored_commit(sdist: Path) -> str | None:
    with tarfile.open(sdist) as tar:
        for member in tar:
            if Path(member.name).parts[1:] == _COMMIT_MEMBER and member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                head = src.read().decode("ascii", "replace").strip()
                return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
    return None


def extract_vendored(sdist: Path, dest: Path, keep: Callable[[tuple[str, ...]], bool]) -> None:
    """Extract the files of ``vendor/llama.cpp/`` whose path parts below it satisfy ``keep`` into ``dest``."""
    with tarfile.open(sdist) as tar:
        for member in tar:
            parts = Path(member.name).parts
            # <pkg>-<ver>/vendor/llama.cpp/<path>
            if len(parts) < 4 or parts[1:3] != VENDOR or not keep(parts[3:]):
                continue
            if not (member.isfile() or member.isdir()):
                continue
            rel = Path(*parts[3:])
            if ".." in rel.parts:
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            if member.mode & 0o111:  # keep scripts the build runs executable
                target.chmod(0o755)
