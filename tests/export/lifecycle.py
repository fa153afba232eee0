"""Helpers for tests that run `grpoctl` as a real process and look at what it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from grpoctl.fsutil import cache_dir

ROOT = Path(__file__).resolve().parents[2]


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose cache (staging journal, pid files) and temporary folder belong to this test alone;
    the shared caches that are slow to rebuild (GGUF converter, embedded model, Go renderer) are linked in."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    shared = cache_dir()
    if shared.is_dir():
        for entry in shared.iterdir():
            if entry.name not in ("staging", "serve") and not (cache / entry.name).exists():
                (cache / entry.name).symlink_to(entry)
    return {**os.environ, "GRPOCTL_CACHE": str(cache), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def grpoctl(*args, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grpoctl", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def children(pid: int, marker: bytes) -> list[int]:
    """Live processes whose parent is ``pid`` and whose command line holds ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes()
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid and marker in args:
            found.append(int(d.name))
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {check}")


def leftovers(folder: Path, tmp: Path, pid: int) -> list[str]:
    """Staging folders, locks and temporary folders an export with ``pid`` could have left."""
    here = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    scratch = [p.name for p in tmp.glob(f"grpoctl-*-{pid}-*")]
    return sorted(here + scratch)
