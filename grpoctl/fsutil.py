"""Filesystem habits shared by every stage: outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from grpoctl.errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory unless ``force`` is set."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output directory {path} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    A crash, Ctrl-C or a full disk leaves only a ``.<name>.partial-*`` directory behind, which is never
    mistaken for a finished output.
    """
    final = Path(final).absolute()  # relative paths would be joined twice by whoever records them
    check_output_dir(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a finished output gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; it is renamed onto ``final`` only on success."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; a finished output gets the usual permissions
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block.

    The kernel drops the lock when the holder exits, however it exits, so a killed process never leaves a
    stale lock behind. When another process holds it, ``waiting`` is printed once before blocking.
    """
    import fcntl  # POSIX only; imported here so that the rest of this module stays portable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path, chunk: int = 1 << 22, progress: bool = False) -> str:
    """sha256 of ``path``; with ``progress``, files of 512 MiB and more (multi-GB GGUFs) show a progress bar."""
    h = hashlib.sha256()
    size = Path(path).stat().st_size
    bar = None
    if progress and size >= (512 << 20):
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def cache_dir() -> Path:
    """grpoctl's cache root: ``$GRPOCTL_CACHE``, else ``$XDG_CACHE_HOME/grpoctl``, else ``~/.cache/grpoctl``."""
    if env := os.environ.get("GRPOCTL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grpoctl"
