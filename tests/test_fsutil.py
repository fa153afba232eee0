from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from grpoctl.errors import OutputExistsError
from grpoctl.fsutil import check_output_dir, sha256_file, staged_dir, staged_file


def test_staged_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory is removed too
    with staged_dir(final) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert (final / "done.bin").read_bytes() == b"y"


def test_staged_dir_refuses_non_empty_without_force(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("keep")
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_dir(final):
            pass
    assert (final / "old").read_text() == "keep"
    with staged_dir(final, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]


def test_check_output_dir_accepts_empty_dir(tmp_path):
    check_output_dir(tmp_path, force=False)
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputExistsError):
        check_output_dir(tmp_path, force=False)


def test_staged_file_keeps_old_content_on_failure(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("old")
    with pytest.raises(ValueError):
        with staged_file(f) as tmp:
            tmp.write_text("new")
            raise ValueError
    assert f.read_text() == "old"
    with staged_file(f) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new"
    assert sha256_file(f) == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"


def test_staged_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "d"):
            pass
        with staged_file(tmp_path / "f.json") as tmpf:
            tmpf.write_text("{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


# --- one owner per output ---------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from grpoctl.fsutil import output_lock
with output_lock(Path(sys.argv[1]), what="holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(final):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(final)], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_fails_at_once_and_a_killed_owner_frees_the_folder(tmp_path):
    from grpoctl.errors import OutputBusyError
    from grpoctl.fsutil import lock_path

    final = tmp_path / "out"
    holder = _holder(final)
    try:
        with pytest.raises(OutputBusyError, match=rf"out is being written by another grpoctl process \(holder, pid "
                                                  rf"{holder.pid}\)"):
            with staged_dir(final):
                pass
        assert not final.exists() and not list(tmp_path.glob(".out.partial-*"))
    finally:
        holder.kill()  # SIGKILL: no cleanup in the holder; the kernel drops its lock
        holder.wait()
    assert lock_path(final).exists()  # the file stays behind a kill -9 ...
    with staged_dir(final) as tmp:  # ... but it binds nobody
        (tmp / "done").write_text("x")
    assert (final / "done").read_text() == "x" and not lock_path(final).exists()


def test_final_rename_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while the output was being written"):
        with staged_dir(final) as tmp:
            (tmp / "ours").write_text("ours")
            final.mkdir()
            (final / "theirs").write_text("theirs")  # another tool wrote here while we worked
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock
    with staged_dir(final, force=True) as tmp:  # --force at the start: replacing it was asked for
        (tmp / "ours").write_text("ours")
    assert sorted(p.name for p in final.iterdir()) == ["ours"]


def test_updated_dir_swaps_in_a_changed_copy_and_keeps_the_live_files_untouched(tmp_path):
    import os

    from grpoctl.fsutil import updated_dir

    final = tmp_path / "out"
    (final / "sub").mkdir(parents=True)
    (final / "sub" / "big.bin").write_bytes(b"w" * 4096)
    (final / "index.json").write_text("old")
    inode = os.stat(final / "sub" / "big.bin").st_ino
    with pytest.raises(RuntimeError):
        with updated_dir(final) as tmp:
            with staged_file(tmp / "index.json") as f:
                f.write_text("half")
            raise RuntimeError("interrupted")
    assert (final / "index.json").read_text() == "old"
    with updated_dir(final) as tmp:
        with staged_file(tmp / "index.json") as f:
            f.write_text("new")
        (tmp / "added").write_text("+")
        assert (final / "index.json").read_text() == "old"  # readers see the old tree until the swap
    assert (final / "index.json").read_text() == "new" and (final / "added").read_text() == "+"
    assert os.stat(final / "sub" / "big.bin").st_ino == inode  # kept, not copied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_staging_of_a_dead_owner_is_swept_and_a_live_ones_is_not(tmp_path, monkeypatch):
    import subprocess

    from grpoctl.fsutil import sweep_stale_siblings, sweep_stale_staging

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    final = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        for pid in (dead.pid, live.pid):
            stage = tmp_path / f".out.partial-{pid}-abc"
            (stage / "merged").mkdir(parents=True)
            (stage / "merged" / "model.safetensors").write_bytes(b"x" * 1000)
        removed = sweep_stale_siblings(final)
        assert [(p.name, size) for p, size in removed] == [(f".out.partial-{dead.pid}-abc", 1000)]
        assert (tmp_path / f".out.partial-{live.pid}-abc").is_dir()
    finally:
        live.kill()
        live.wait()
    # doctor's sweep works from the journal, wherever the folder is
    journal = tmp_path / "cache" / "staging"
    journal.mkdir(parents=True)
    (journal / f"out.partial-{live.pid}-abc.json").write_text(
        f'{{"path": "{tmp_path / f".out.partial-{live.pid}-abc"}", "pid": {live.pid}, "start": null}}')
    assert [p.name for p, _ in sweep_stale_staging()] == [f".out.partial-{live.pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] and not list(journal.iterdir())


def test_disk_full_from_any_layer_is_one_error_naming_the_output(tmp_path):
    import errno
    import os

    from grpoctl.errors import DiskFullError
    from grpoctl.fsutil import disk_full_is_one_line

    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as caught:
        with disk_full_is_one_line(out):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".out.partial-1-x" / "a"))
            except OSError as err:
                raise RuntimeError("a library's own wrapper") from err
    assert str(caught.value) == (f"disk full while writing {out}: No space left on device; nothing was kept. "
                                 "Free some space and run it again")
    with pytest.raises(PermissionError):  # anything else passes through untouched
        with disk_full_is_one_line(out):
            raise PermissionError(errno.EACCES, "denied")


def test_output_that_is_a_symlink_is_followed_the_link_stays_and_nothing_is_left(tmp_path, monkeypatch):
    from grpoctl.fsutil import staged_dir, updated_dir

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    with staged_dir(link, force=True) as stage:
        (stage / "new").write_text("new")
    assert link.is_symlink() and link.resolve() == target  # the link is not replaced by a folder
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    with updated_dir(link) as stage:
        (stage / "added").write_text("+")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["added", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "link", "target"]  # no .link.partial-*


def test_output_through_a_symlink_and_its_target_share_one_lock(tmp_path):
    from grpoctl.fsutil import lock_path, output_lock, try_lock

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert lock_path(tmp_path / "link") == tmp_path / ".target.lock"
    with output_lock(tmp_path / "link"):
        assert try_lock(tmp_path / ".target.lock") is None  # a writer of the target would be refused


def test_file_lock_waits_for_a_holder_of_the_same_lock_and_says_so_once(tmp_path, capsys):
    import os
    import threading

    from grpoctl.fsutil import file_lock, try_lock

    path = tmp_path / ".cache.lock"
    held = try_lock(path)  # another owner, as output_lock and serve's port lock take it
    entered = threading.Event()

    def second() -> None:
        with file_lock(path, waiting="waiting for the other owner"):
            entered.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    assert not entered.wait(0.5)
    os.close(held)
    waiter.join(10)
    assert entered.is_set()
    assert capsys.readouterr().out == "waiting for the other owner\n"
    assert try_lock(path) is not None  # released when the block ended


def test_a_staging_leftover_that_is_a_symlink_is_removed_not_followed(tmp_path, monkeypatch):
    import subprocess

    from grpoctl.fsutil import sweep_stale_siblings, sweep_stale_staging

    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    keep = tmp_path / "target"
    keep.mkdir()
    (keep / "weights").write_text("x")
    left = tmp_path / f".link.partial-{dead.pid}-abc"
    left.symlink_to(keep)
    assert [p for p, _ in sweep_stale_siblings(tmp_path / "link")] == [left]
    assert not os.path.lexists(left) and (keep / "weights").is_file()
    # and doctor's sweep from the journal, wherever the leftover is
    left.symlink_to(keep)
    journal = tmp_path / "cache" / "staging"
    journal.mkdir(parents=True)
    (journal / f"{left.name.lstrip('.')}.json").write_text(json.dumps({"path": str(left), "pid": dead.pid}))
    assert [p for p, _ in sweep_stale_staging()] == [left]
    assert not os.path.lexists(left) and (keep / "weights").is_file()


@pytest.mark.parametrize("where", ["/proc/x", "/proc/self/x/y", "read-only"])
def test_an_output_nothing_can_be_written_to_is_one_error(where, tmp_path):
    from grpoctl.errors import OutputNotWritableError
    from grpoctl.fsutil import check_writable, output_lock, staged_dir, staged_file

    if where == "read-only":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        # root ignores permission bits: sysfs refuses new entries to everyone
        where = "/sys/x" if os.geteuid() == 0 else str(ro / "out")
    out = Path(where)
    for attempt in (lambda: check_writable(out), lambda: output_lock(out).__enter__(),
                    lambda: staged_dir(out).__enter__(), lambda: staged_file(out / "f").__enter__()):
        with pytest.raises(OutputNotWritableError, match=f"cannot write to {out}") as info:
            attempt()
        assert info.value.exit_code == 15 and "choose an output folder you can write to" in str(info.value)
