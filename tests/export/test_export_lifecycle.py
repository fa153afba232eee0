"""`grpoctl export` as real processes under signals, kill -9 and a second export into the same folder: exit
code, last line, and what is left on disk and in the process table."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from tests.conftest import make_run
from tests.export.lifecycle import children, grpoctl, isolated_env, leftovers, running, wait_for

WORKER = b"grpoctl.export.convert_worker"


@pytest.fixture
def env(tmp_path):
    return isolated_env(tmp_path)


@pytest.fixture(scope="module")
def spaced_run(tmp_path_factory, tiny_qwen3):
    """A run whose directory name has a space, as users make them."""
    return make_run(tmp_path_factory.mktemp("runs") / "my run", tiny_qwen3)


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


def _start_and_wait_for_converter(run, out, env):
    proc = grpoctl("export", run, "--gguf", "q4_k_m", "--merged", "16bit", "-o", out, "-q", env=env)
    worker = wait_for(lambda: children(proc.pid, WORKER) or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0]
    return proc, worker[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_during_conversion_stops_the_converter_and_leaves_nothing(spaced_run, tmp_path, env, sig):
    out = tmp_path / "out"
    proc, worker = _start_and_wait_for_converter(spaced_run, out, env)
    assert leftovers(out, tmp_path / "tmp", proc.pid)  # staging and temporary folders exist while it runs
    proc.send_signal(sig)  # grpoctl alone: the converter sits in its own process group
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, output
    assert _last_line(output) == f"grpoctl: interrupted ({sig.name})"
    assert "Traceback" not in output
    assert not running(worker)  # stopped and reaped before the staging folder was removed
    assert not out.exists() and leftovers(out, tmp_path / "tmp", proc.pid) == []


def test_after_kill_9_doctor_removes_what_the_dead_export_left(spaced_run, tmp_path, env):
    out = tmp_path / "out"
    proc, worker = _start_and_wait_for_converter(spaced_run, out, env)
    proc.kill()
    proc.wait(30)
    wait_for(lambda: not running(worker), timeout=30)  # the kernel's parent-death signal, not grpoctl
    left = leftovers(out, tmp_path / "tmp", proc.pid)
    assert any(".partial-" in n for n in left) and any(n.startswith("grpoctl-export-") for n in left), left
    assert list((tmp_path / "cache" / "staging").iterdir())  # the journal knows the staging folder

    doctor = grpoctl("doctor", env=env)
    output, _ = doctor.communicate(timeout=120)
    line = next(ln for ln in output.splitlines() if "leftovers" in ln)
    assert "removed" in line and ".out.partial-" in line, output
    assert leftovers(out, tmp_path / "tmp", proc.pid) == []
    assert not list((tmp_path / "cache" / "staging").iterdir())


def test_after_kill_9_the_next_export_removes_the_dead_ones_staging(spaced_run, tmp_path, env):
    out = tmp_path / "out"
    proc, _ = _start_and_wait_for_converter(spaced_run, out, env)
    proc.kill()
    proc.wait(30)
    assert leftovers(out, tmp_path / "tmp", proc.pid)
    nxt = grpoctl("export", spaced_run, "--lora", "-o", out, env=env)
    output, _ = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, output
    assert "left by an export that was killed" in output
    assert leftovers(out, tmp_path / "tmp", proc.pid) == [] and leftovers(out, tmp_path / "tmp", nxt.pid) == []
    assert (out / "lora" / "adapter_model.safetensors").is_file()


def test_second_export_into_a_busy_folder_fails_at_once_and_the_first_keeps_its_files(spaced_run, tmp_path, env):
    out = tmp_path / "out"
    first = grpoctl("export", spaced_run, "--gguf", "q8_0", "--merged", "16bit", "-o", out, "-q", env=env)
    lock = tmp_path / ".out.lock"
    wait_for(lambda: lock.is_file() and str(first.pid) in lock.read_text() or first.poll() is not None)
    second = grpoctl("export", spaced_run, "--lora", "-o", out, env=env)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 14, output
    assert _last_line(output) == (f"grpoctl: {out} is being written by another grpoctl process (export, pid "
                                  f"{first.pid}); wait for it to finish or choose another output")
    assert first.poll() is None  # it was refused while the first one was still at work
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    kinds = {f["kind"] for f in json.loads((out / "artifacts.json").read_text())["files"]}
    assert {"merged", "gguf:q8_0"} <= kinds and "lora" not in kinds
    assert not lock.exists() and leftovers(out, tmp_path / "tmp", first.pid) == []


def test_adding_a_quant_keeps_what_the_export_has(spaced_run, tmp_path, env):
    """The practitioner's second export: one more GGUF type into an export of the same adapter, no --force."""
    from grpoctl.artifacts import Artifacts
    from grpoctl.push.hub import plan

    out = tmp_path / "out"
    first = grpoctl("export", spaced_run, "--gguf", "q8_0", "--merged", "16bit", "-o", out, "-q", env=env)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    q8 = out / "gguf" / "qwen3-my-run-Q8_0.gguf"  # the space became a '-': a name vLLM and files accept
    kept = {p: os.stat(p).st_ino for p in [q8, out / "merged" / "model.safetensors"]}
    serve_sh = (out / "vllm" / "serve.sh").read_text()
    assert "--served-model-name qwen3-my-run " in serve_sh

    second = grpoctl("export", spaced_run, "--gguf", "q4_k_m", "-o", out, env=env)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert "using the merged model already in the export (merged/)" in output
    assert {p: os.stat(p).st_ino for p in kept} == kept  # the very same files: kept, not rebuilt
    assert (out / "vllm" / "serve.sh").read_text() == serve_sh
    manifest = Artifacts.load(out)
    ggufs = sorted(f.kind for f in manifest.by_kind("gguf"))
    assert ggufs == ["gguf:q4_k_m", "gguf:q8_0"] and manifest.by_kind("merged")
    assert sorted(manifest.parity.files) == ["qwen3-my-run-Q4_K_M.gguf", "qwen3-my-run-Q8_0.gguf"]
    assert json.loads((out / "gguf" / "parity.json").read_text())["files"].keys() == \
        manifest.parity.files.keys()
    assert (out / "gguf" / "Modelfile.Q4_K_M").is_file() and (out / "gguf" / "Modelfile.Q8_0").is_file()
    for entry in manifest.files:  # the inventory describes the files on disk exactly
        assert (out / entry.path).stat().st_size == entry.size
    (gguf_repo, card), = [(p, c) for p, c in plan(manifest, {"gguf": "a/b-GGUF"}, "main")]
    assert "qwen3-my-run-Q4_K_M.gguf" in card.decode() and "qwen3-my-run-Q8_0.gguf" in card.decode()

    again = grpoctl("export", spaced_run, "--gguf", "q4_k_m,q8_0", "-o", out, env=env)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "nothing to do" in output, output


def test_another_adapter_is_not_added_to_an_export(tiny_qwen3, tmp_path, env):
    run_a = make_run(tmp_path / "a", tiny_qwen3)
    run_b = make_run(tmp_path / "b", tiny_qwen3, {"seed": 1})
    out = tmp_path / "out"
    first = grpoctl("export", run_a, "--lora", "-o", out, "-q", env=env)
    assert first.wait(300) == 0, first.stdout.read()
    before = (out / "artifacts.json").read_text()
    second = grpoctl("export", run_b, "--gguf", "q8_0", "-o", out, env=env)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 5, output
    assert _last_line(output) == (f"grpoctl: {out} holds an export of another adapter; pass --force to replace it, "
                                  "or choose another folder with -o")
    assert (out / "artifacts.json").read_text() == before and not (out / "gguf").exists()


def test_manifests_re_derive_in_place_after_an_export(spaced_run, tmp_path, env):
    """`grpoctl manifests RUN --tensor-parallel-size 2` as the README shows it, after `grpoctl export RUN`."""
    run = tmp_path / "run"
    shutil.copytree(spaced_run, run)
    first = grpoctl("export", run, "--lora", "-q", env=env)
    assert first.wait(300) == 0, first.stdout.read()
    again = grpoctl("manifests", run, "--tensor-parallel-size", "2", env=env)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert "--tensor-parallel-size 2" in (run / "export" / "vllm" / "serve.sh").read_text()
    from grpoctl.artifacts import Artifacts
    from grpoctl.fsutil import sha256_file

    for entry in Artifacts.load(run / "export").files:
        assert sha256_file(run / "export" / entry.path) == entry.sha256
    assert leftovers(run / "export", tmp_path / "tmp", again.pid) == []
