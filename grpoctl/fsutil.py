"""Filesystem habits shared by every stage: outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpoctl.errors import DiskFullError, OutputBusyError, OutputExistsError, OutputNotWritableError
from grpoctl.procs import alive, start_time


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What an OSError while creating an output means to the user (errno -> reason)
_CANNOT_WRITE = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system", errno.ENOENT: "no folder can be made there",
                 errno.ENOTDIR: "a part of the path is a file, not a folder"}


@contextlib.contextmanager
def creating(output: Path) -> Iterator[None]:
    """Within the block, an OSError that says nothing can be written where ``output`` goes becomes one
    OutputNotWritableError naming it."""
    try:
        yield
    except OSError as err:
        if isinstance(err, OutputNotWritableError) or err.errno not in _CANNOT_WRITE:
            raise
        where = f" ({err.filename})" if err.filename and Path(str(err.filename)) != Path(output) else ""
        raise OutputNotWritableError(f"cannot write to {output}: {_CANNOT_WRITE[err.errno]}{where}; choose an "
                                     "output folder you can write to") from None


def check_writable(path: Path) -> None:
    """Fail before any slow work when ``path`` (an output folder) cannot be created or written: a file is made
    and removed where its staging folder goes (its parent) and, if it exists, in it."""
    path = real_output(path)
    with creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in (path.parent, path) if path.is_dir() else (path.parent,):
            fd, name = tempfile.mkstemp(prefix=".grpoctl-probe-", dir=folder)
            os.close(fd)
            os.unlink(name)


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory unless ``force`` is set, or an output that cannot be written."""
    check_writable(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output directory {path} exists and is not empty; pass --force to replace it")


# --- one writer per output ------------------------------------------------------------------------------
# An output folder F is owned by the process holding an flock on F's sibling ``.F.lock``. The kernel drops
# the lock when its holder exits, however it exits, so a crashed owner never blocks the next one; the file
# itself is removed by a holder that leaves normally. Held locks are re-entrant within one process.
_held: dict[Path, int] = {}


def real_output(final: Path) -> Path:
    """The folder an output path names: a symlink (``-o link``) is followed, so its target is what is locked and
    replaced; replacing the link itself would turn it into a folder and leave the old target behind."""
    final = Path(final).absolute()
    return final.resolve() if final.is_symlink() else final


def lock_path(final: Path) -> Path:
    final = real_output(final)
    return final.with_name(f".{final.name}.lock")


def try_lock(path: Path, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if needed), or None when another holds it.

    The lock lives as long as any copy of the fd (a child given it with ``pass_fds`` keeps it after we close
    ours); whoever holds it may unlink the file, so a lock taken on a file that was unlinked meanwhile is
    dropped and taken again on the current one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_owner(path: Path) -> dict[str, Any]:
    """What the holder of the lock file ``path`` wrote about itself (pid, what), if anything."""
    try:
        info = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_lock_owner(fd: int, **info: Any) -> None:
    """Who holds the lock, for the message a second owner gets; optional (a full disk may refuse even this)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)


@contextlib.contextmanager
def output_lock(final: Path, what: str = "export", wait: bool = False) -> Iterator[None]:
    """Own ``final`` for the duration: a second owner fails at once with OutputBusyError (or, with ``wait``,
    blocks until the first is done)."""
    final = real_output(final)
    if final in _held:
        yield
        return
    path = lock_path(final)
    check_writable(final)
    fd = try_lock(path, wait)
    if fd is None:
        owner = lock_owner(path)
        holder = f" ({owner.get('what', 'grpoctl')}, pid {owner.get('pid')})" if owner.get("pid") else ""
        raise OutputBusyError(f"{final} is being written by another grpoctl process{holder}; wait for it to "
                              "finish or choose another output")
    write_lock_owner(fd, pid=os.getpid(), what=what)
    _held[final] = fd
    try:
        yield
    finally:
        del _held[final]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a waiter then sees a fresh file, never this one
        os.close(fd)


# --- staging ----------------------------------------------------------------------------------------------
# A staging folder is named ``.F.partial-<pid>-<random>`` next to F and recorded in the cache's staging
# journal, so that after a kill -9 the next writer of F, or ``grpoctl doctor``, can tell it from a live one.
def _journal_dir() -> Path:
    return cache_dir() / "staging"


def _journal(tmp: Path) -> Path:
    entry = _journal_dir() / f"{tmp.name.lstrip('.')}.json"
    with contextlib.suppress(OSError):  # a journal that cannot be written costs only the later sweep
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"path": str(tmp), "pid": os.getpid(), "start": start_time(os.getpid())}))
    return entry


def _new_stage(final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a finished output gets the usual permissions
    return tmp


def final_of(path: Path) -> Path:
    """The output a staging folder becomes (``.F.partial-<pid>-*`` -> ``F``); any other path as it is. What a
    stage writes about its own location (a command to run later) names the final output."""
    m = re.fullmatch(r"\.(.+)\.partial-\d+-[^/]*", Path(path).name)
    return Path(path).with_name(m.group(1)) if m else Path(path)


def _owner_pid(name: str) -> int | None:
    m = re.search(r"\.(?:partial|old)-(\d+)(?:-|$)", name)
    return int(m.group(1)) if m else None


def _remove(path: Path) -> None:
    """Remove a staging leftover: a folder with its content, a file or a link (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sweep_stale_siblings(final: Path) -> list[tuple[Path, int]]:
    """Remove ``.F.partial-*`` / ``.F.old-*`` folders left next to ``final`` by owners that are gone; call it
    while owning ``final`` (for a symlink, next to the link and next to its target). Returns what was removed,
    with sizes."""
    named, real = Path(final).absolute(), real_output(final)
    return _sweep_siblings(real) + (_sweep_siblings(named) if named != real else [])


def _sweep_siblings(final: Path) -> list[tuple[Path, int]]:
    removed: list[tuple[Path, int]] = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not (p.name.startswith(f".{final.name}.partial-") or p.name.startswith(f".{final.name}.old-")):
            continue
        pid = _owner_pid(p.name)
        if pid is None and not _untouched_for(p, 24 * 3600):
            continue  # named before owners were recorded: only the age can tell that nobody writes it
        if pid is not None and pid != os.getpid() and alive(pid) and not _journal_says_gone(p, pid):
            continue
        size = _tree_size(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_size
        _remove(p)
        (_journal_dir() / f"{p.name.lstrip('.')}.json").unlink(missing_ok=True)
        removed.append((p, size))
    return removed


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        newest = max([path.lstat().st_mtime, *(c.lstat().st_mtime for c in path.iterdir())] if path.is_dir()
                     else [path.lstat().st_mtime])
    except OSError:
        return False
    return time.time() - newest > seconds


def _journal_says_gone(path: Path, pid: int) -> bool:
    """True when the journal shows that ``pid`` now belongs to a later process than the folder's owner."""
    try:
        entry = json.loads((_journal_dir() / f"{path.name.lstrip('.')}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and entry.get("start") not in (None, start_time(pid))


def sweep_stale_staging() -> list[tuple[Path, int]]:
    """Every staging folder in the journal whose owner is gone (``grpoctl doctor``), with sizes."""
    removed = []
    for entry in sorted(_journal_dir().glob("*.json")) if _journal_dir().is_dir() else []:
        try:
            data = json.loads(entry.read_text())
            path, pid = Path(data["path"]), int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
            continue
        if alive(pid) and data.get("start") in (None, start_time(pid)):
            continue
        if ".partial-" in path.name and os.path.lexists(path):
            size = _tree_size(path) if path.is_dir() and not path.is_symlink() else path.lstat().st_size
            _remove(path)
            removed.append((path, size))
        _remove_unheld_lock(path.with_name(path.name.split(".partial-", 1)[0] + ".lock"))
        entry.unlink(missing_ok=True)
    return removed


def _remove_unheld_lock(path: Path) -> None:
    """A lock file whose owner is gone is harmless but clutter; remove it unless someone holds it now."""
    if not path.is_file():
        return
    fd = try_lock(path)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); elsewhere, two renames."""
    libc = _libc()
    if libc is not None:
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(b))
    old = b.with_name(f".{b.name}.old-{os.getpid()}")
    b.rename(old)
    a.rename(b)
    old.rename(a)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2  # noqa: B018 -- glibc >= 2.28
    except (OSError, AttributeError):
        return None
    return libc


def _install(tmp: Path, final: Path, force: bool) -> None:
    """Put the finished ``tmp`` at ``final``; never over a folder that appeared meanwhile, unless ``force``."""
    try:
        nonempty = final.is_dir() and any(final.iterdir())
    except FileNotFoundError:
        nonempty = False
    if final.exists() and not final.is_dir():
        raise OutputExistsError(f"output path {final} appeared while the output was being written and is not a "
                                "directory; nothing was replaced")
    if not final.exists():
        try:
            tmp.rename(final)  # onto nothing, or onto an empty folder made meanwhile: never over content
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            nonempty = True
    if nonempty and not force:
        raise OutputExistsError(f"{final} appeared while the output was being written; it was left as it is and "
                                "nothing was written (pass --force to replace it)")
    _exchange(tmp, final)
    _remove(tmp)  # now the old content


@contextlib.contextmanager
def staged_dir(final: Path, force: bool = False, wait: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    ``final`` is owned for the duration (:func:`output_lock`; ``wait`` queues behind another owner instead of
    failing). A crash, Ctrl-C or a full disk leaves at most a ``.<name>.partial-*`` directory, which is never
    mistaken for a finished output and which the next owner of ``final`` removes.
    """
    named = Path(final).absolute()  # relative paths would be joined twice by whoever records them
    final = real_output(named)
    with output_lock(final, wait=wait):
        sweep_stale_siblings(named)
        check_output_dir(final, force)
        tmp = _new_stage(final)
        entry = _journal(tmp)
        try:
            yield tmp
            _install(tmp, final, force)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            _forget(entry, tmp)


@contextlib.contextmanager
def updated_dir(final: Path) -> Iterator[Path]:
    """Yield a copy of the existing ``final`` to change; on success it takes ``final``'s place in one step.

    The copy is made of hard links (files are replaced, never written in place, by every grpoctl writer), so
    it costs no space; readers of ``final`` see the old tree or the new one, never a mix.
    """
    named = Path(final).absolute()
    final = real_output(named)
    with output_lock(final):
        sweep_stale_siblings(named)
        tmp = _new_stage(final)
        entry = _journal(tmp)
        try:
            _link_tree(final, tmp)
            yield tmp
            _exchange(tmp, final)
            _remove(tmp)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            _forget(entry, tmp)


def _forget(entry: Path, tmp: Path) -> None:
    """Drop the journal entry of a staging folder once it is gone; one that could not be removed stays listed,
    for the next owner or ``grpoctl doctor`` to remove and report."""
    if not os.path.lexists(tmp):
        entry.unlink(missing_ok=True)


def _link_tree(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_symlink():
            target.symlink_to(os.readlink(p))
        elif p.is_dir():
            target.mkdir(exist_ok=True)
        else:
            try:
                os.link(p, target)
            except OSError:  # no hard links here (another file system type): a real copy
                shutil.copy2(p, target)


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; it is renamed onto ``final`` only on success."""
    final = Path(final).absolute()
    with creating(final.parent):
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
    """Hold the lock on ``path`` (:func:`try_lock`, the one lock every output and cache uses) for the ``with``
    block, waiting for another holder; ``waiting`` is printed once before the wait, so a second process that
    blocks says why."""
    path = Path(path)
    fd = try_lock(path)
    if fd is None:
        if waiting:
            print(waiting, flush=True)
        fd = try_lock(path, wait=True)
    try:
        yield
    finally:
        os.close(fd)


# --- temporary work folders -------------------------------------------------------------------------
def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder ``grpoctl-<kind>-<pid>-*`` that :func:`sweep_stale_scratch` removes once its owner is
    gone (the ``with`` block removes it on any exit it sees; kill -9 is the one it cannot see)."""
    return tempfile.TemporaryDirectory(prefix=f"grpoctl-{kind}-{os.getpid()}-")


def sweep_stale_scratch() -> list[tuple[Path, int]]:
    removed = []
    for p in Path(tempfile.gettempdir()).glob("grpoctl-*-*-*"):
        m = re.fullmatch(r"grpoctl-[a-z]+-(\d+)-.+", p.name)
        if not m or not p.is_dir() or alive(int(m.group(1))):
            continue
        size = _tree_size(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append((p, size))
    return removed


# --- full disks ---------------------------------------------------------------------------------------
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: Path) -> int:
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(folder: Path, need: int, what: str, margin: float = 0.05) -> None:
    """Refuse to start when ``need`` bytes (plus ``margin`` of them) do not fit where ``folder`` goes."""
    free = free_bytes(folder)
    want = int(need * (1 + margin))
    if free < want:
        raise DiskFullError(f"not enough disk space for {what} in {folder}: about {human_bytes(want)} needed, "
                            f"{human_bytes(free)} free; free some space or choose another output folder")


def no_space_left(folder: Path) -> bool:
    """Less than 1 MiB left to write where ``folder`` is, or no inode: what a write that just failed without an
    errno (numpy's short ``tofile``, llama.cpp's stream errors) most likely ran into."""
    try:
        st = os.statvfs(Path(folder))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20) or (st.f_files > 0 and st.f_favail == 0)


def disk_full_cause(path: Path) -> OSError:
    """The ENOSPC a writer that reports no errno ran into, for ``raise DiskFullError(...) from disk_full_cause(p)``."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def disk_full_error(err: BaseException, where: Path, cleaned: bool = True) -> DiskFullError | None:
    """One DiskFullError naming ``where`` (the output the user asked for, not a staging folder) when ``err`` or
    what caused it is a full disk or quota; else None.

    ``cleaned``: the caller removes what it had written (staged outputs), and the message says so.
    """
    chain, seen = [], err
    while seen is not None and len(chain) < 32:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = next((e for e in chain if isinstance(e, OSError) and not isinstance(e, DiskFullError)
                 and e.errno in DISK_FULL), None)
    if full is None:
        return next((e for e in chain if isinstance(e, DiskFullError)), None)
    detail = ""
    if full.filename and not no_space_left(where) and no_space_left(Path(str(full.filename)).parent):
        detail = f" (the disk of {Path(str(full.filename)).parent} is full)"
    then = "nothing was kept. Free some space and run it again" if cleaned else "free some space and run it again"
    return DiskFullError(f"disk full while writing {where}{detail}: {full.strerror or 'no space left'}; {then}")


@contextlib.contextmanager
def disk_full_is_one_line(where: Path) -> Iterator[None]:
    """Within the block, a full disk (ENOSPC/EDQUOT from any writer) becomes one DiskFullError naming ``where``."""
    try:
        yield
    except Exception as err:  # libraries wrap OSError in their own types; the cause chain says what it was
        mapped = disk_full_error(err, where)
        if mapped is None or mapped is err:
            raise
        raise mapped from None


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
