"""llama.cpp's C++ tools built from the installed llama-cpp-python's sdist: they run, quantize, serve
/apply-template, and a missing toolchain, no network, a failed or killed build all end cleanly."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from grpoctl import llamacpp_sdist as sd
from grpoctl import llamacpp_tools as lt
from grpoctl.errors import DependencyError, InputNotFoundError, ToolBuildError
from grpoctl.fsutil import file_lock, sha256_file
from tests.conftest import convert_tiny
from tests.export.gguf_support import read_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_f16_gguf(tiny_qwen3, tmp_path_factory) -> Path:
    """The tiny Qwen3 fixture converted to F16 by llama.cpp's converter."""
    return convert_tiny(tiny_qwen3, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")


@pytest.fixture(scope="session")
def kept_sdist(llama_tools) -> sd.Sdist:
    """The sdist the session's tools were built from, in the user cache (set up before any cache is replaced)."""
    sdist = sd.cached_sdist() if llama_tools.source == "cache" else None
    if sdist is None:
        pytest.skip(f"needs the sdist of a build done here ({lt.ENV_BIN} is set)")
    return sdist


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """A grpoctl cache with nothing in it, and no tools directory from the environment."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRPOCTL_CACHE", str(cache))
    monkeypatch.delenv(lt.ENV_BIN, raising=False)
    return cache


def _grpoctl(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoctl", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, **kw)


def _seed_sdist(cache: Path, real: sd.Sdist) -> None:
    """Make ``cache`` hold the real sdist (a link to the user cache's copy), as if it had been fetched there."""
    dest = cache / "llama.cpp" / "sdist"
    dest.mkdir(parents=True)
    (dest / real.path.name).symlink_to(real.path)
    shutil.copy(real.path.parent / sd._record(real.version).name, dest)


# --- the real build ----------------------------------------------------------------------------------

def test_build_is_recorded_with_its_sdist_flags_and_compiler(llama_tools):
    assert llama_tools.source in ("cache", "env")
    if llama_tools.source == "env":
        pytest.skip(f"{lt.ENV_BIN} is set: nothing was built here")
    info = llama_tools.info
    sdist = sd.cached_sdist()
    assert sdist is not None, "the build's sdist is kept for the converter to share"
    assert info["llama_cpp_python"] == sd.installed_version() == sdist.version
    assert info["sdist_sha256"] == sha256_file(sdist.path)
    assert info["llama_cpp_commit"] == sdist.llama_cpp_commit and len(sdist.llama_cpp_commit) == 40
    lib_dir = lt.shared_lib_dir()
    if lib_dir is None:
        assert info["linked_to"] is None and info["cmake_flags"] == lt.cmake_flags(sdist.llama_cpp_commit)
    else:  # linked against the installed package's libraries, which are recorded to notice a reinstall
        assert info["linked_to"] == str(lib_dir) and f"-DGRPOCTL_LIB_DIR={lib_dir}" in info["cmake_flags"]
        assert info["libraries"] == lt.library_signature(lib_dir) and len(info["libraries"]) == len(lt.SHARED_LIBS)
    assert Path(info["compiler_path"]).is_file() and info["compiler"]
    assert lt.built_tools() == {name: llama_tools.bin_dir / name for name in lt.TOOLS}
    # only the executables stay: no source tree or build folder is kept in the cache
    assert sorted(p.name for p in llama_tools.bin_dir.parent.iterdir()) == ["bin", lt.INFO_FILE]
    assert lt.build_log().is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="reads the executables' ELF dependencies with ldd")
def test_tools_run_on_the_libraries_llama_cpp_python_installed(llama_tools):
    """No second copy of llama.cpp: each tool loads the libllama and libggml* of the installed package (the
    code the Python bindings run), found without LD_LIBRARY_PATH."""
    import llama_cpp

    if llama_tools.source != "cache" or not llama_tools.info.get("linked_to"):
        pytest.skip("the tools were not built here against llama-cpp-python's libraries")
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    assert lt.shared_lib_dir() == lib_dir
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for name in lt.TOOLS:
        out = subprocess.run(["ldd", str(llama_tools.bin_dir / name)], capture_output=True, text=True, env=env,
                             check=True).stdout
        found = dict(re.findall(r"^\s*(lib(?:llama|ggml[\w-]*|mtmd)\.so[.\d]*) => (\S+)", out, re.M))
        assert {Path(p).parent for p in found.values()} == {lib_dir}, out
        assert any(k.startswith("libllama.") for k in found) and "not found" not in out, out


def test_linked_tools_are_rebuilt_when_the_package_replaces_its_libraries(empty_cache, tmp_path, monkeypatch):
    """A reinstall of the same version (other build flags, another backend) replaces the libraries the cached
    tools run on: the cache no longer counts as built; the same files unchanged still do."""
    lib_dir = tmp_path / "llama_cpp" / "lib"
    lib_dir.mkdir(parents=True)
    for path in lt._lib_files(lib_dir):
        path.write_bytes(b"\x7fELF stand-in")
    monkeypatch.setattr(lt, "shared_lib_dir", lambda: lib_dir)
    root = lt.cached_root()
    assert root.name.startswith(f"{sd.DIST}-{sd.installed_version()}-tools-")  # per library folder
    (root / "bin").mkdir(parents=True)
    for name in lt.TOOLS:
        (root / "bin" / name).write_text("#!/bin/sh\n")
    (root / lt.INFO_FILE).write_text(json.dumps({"linked_to": str(lib_dir),
                                                 "libraries": lt.library_signature(lib_dir)}))
    assert set(lt.built_tools()) == set(lt.TOOLS)
    lt._lib_files(lib_dir)[3].write_bytes(b"\x7fELF another build of libllama")
    assert lt.built_tools() == {}
    with pytest.raises(DependencyError, match="not built"):
        lt.find_tools(build=False)


def test_another_environment_of_the_same_version_keeps_its_own_tools(empty_cache, tmp_path, monkeypatch):
    roots = set()
    for env in ("venv-a", "venv-b"):
        monkeypatch.setattr(lt, "shared_lib_dir", lambda env=env: tmp_path / env / "llama_cpp" / "lib")
        roots.add(lt.cached_root())
    monkeypatch.setattr(lt, "shared_lib_dir", lambda: None)  # no shared libraries: one full build per version
    roots.add(lt.cached_root())
    assert len(roots) == 3 and lt.cached_root().name == f"{sd.DIST}-{sd.installed_version()}-tools"


@pytest.mark.parametrize("name", ["llama-server", "llama-imatrix", "llama-perplexity"])
def test_tool_reports_the_vendored_llama_cpp_commit(llama_tools, name):
    proc = subprocess.run([str(lt.tool(name, build=False)), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = (sd.cached_sdist().llama_cpp_commit or "")[:8] if llama_tools.source == "cache" else ""
    assert f"commit {expected}" in proc.stdout + proc.stderr


def test_quantize_tool_lists_its_types(llama_tools):
    proc = subprocess.run([str(lt.tool("llama-quantize", build=False)), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "usage:" in proc.stdout + proc.stderr and "Q8_0" in proc.stdout + proc.stderr


def test_quantize_tool_writes_q8_0_that_llama_cpp_python_reads(llama_tools, tiny_f16_gguf, tmp_path):
    import numpy as np
    from llama_cpp import Llama

    out = tmp_path / "tiny-q8_0.gguf"
    proc = subprocess.run([str(lt.tool("llama-quantize")), str(tiny_f16_gguf), str(out), "Q8_0", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta, tensors = read_gguf(out)
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"][0] == "Q8_0" and tensors["blk.0.ffn_down.weight"][0] == "Q8_0"

    def logits(path: Path) -> np.ndarray:
        llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
        try:
            llm.eval(llm.tokenize(b"Tom has 12 apples and eats 7.", add_bos=False))
            return np.array(llm.scores[:llm.n_tokens])
        finally:
            llm.close()

    ref, got = logits(tiny_f16_gguf), logits(out)
    assert ref.shape == got.shape and ref.shape[0] > 5
    # the same model, quantized: logits follow the F16 ones closely (a wrong or empty file would not)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_server_apply_template_renders_the_gguf_chat_template(llama_tools, tiny_f16_gguf, tiny_qwen3, tmp_path):
    """llama-server's C++ Jinja engine, on 127.0.0.1, against transformers' rendering of the same template."""
    from transformers import AutoTokenizer

    from grpoctl.serve.llamacpp import free_port

    messages = [{"role": "system", "content": "You are a careful math tutor."},
                {"role": "user", "content": "What is 12 + 7?"}]
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(lt.tool("llama-server")), "-m", str(tiny_f16_gguf), "--host", "127.0.0.1",
                               "--port", str(port), "-c", "256", "-t", "1", "--jinja"],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with no_proxy.open(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become ready"
            time.sleep(0.5)
        req = urllib.request.Request(f"{base}/apply-template", data=json.dumps({"messages": messages}).encode(),
                                     headers={"Content-Type": "application/json"})
        with no_proxy.open(req, timeout=30) as r:
            prompt = json.loads(r.read())["prompt"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    expected = AutoTokenizer.from_pretrained(tiny_qwen3).apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
    assert prompt == expected


# --- the environment override --------------------------------------------------------------------------

def test_env_directory_is_used_without_building(llama_tools, empty_cache, tmp_path, monkeypatch):
    prebuilt = tmp_path / "llama.cpp" / "build"
    (prebuilt / "bin").mkdir(parents=True)
    for name in lt.TOOLS:
        (prebuilt / "bin" / name).symlink_to(llama_tools.bin_dir / name)
    monkeypatch.setenv(lt.ENV_BIN, str(prebuilt))  # the build folder: its bin/ is found
    assert lt.tool("llama-server", build=False) == prebuilt.resolve() / "bin" / "llama-server"
    assert set(lt.built_tools()) == set(lt.TOOLS)
    monkeypatch.setenv(lt.ENV_BIN, str(tmp_path / "nowhere"))
    with pytest.raises(InputNotFoundError, match=lt.ENV_BIN):
        lt.tool("llama-server")


def test_env_tools_of_another_llama_cpp_commit_are_reported(llama_tools, tmp_path, monkeypatch, capsys):
    """A stand-in for someone's own llama.cpp build: it answers --version as llama.cpp does, with another commit."""
    if llama_tools.source != "cache":
        pytest.skip(f"{lt.ENV_BIN} is set: the vendored commit is not known here")
    other = tmp_path / "bin"
    other.mkdir()
    for name in lt.TOOLS:
        exe = other / name
        exe.write_text("#!/bin/sh\necho 'version: 0.9.0 (build 9999, commit 1234abcd)'\n")
        exe.chmod(0o755)
    monkeypatch.setenv(lt.ENV_BIN, str(other))
    monkeypatch.setattr(lt, "_warned", set())
    assert lt.tool("llama-imatrix") == other.resolve() / "llama-imatrix"
    out = capsys.readouterr().out
    assert "1234abcd" in out and llama_tools.info["llama_cpp_commit"][:8] in out and out.count("\n") == 1
    # the matching commit is not reported
    for name in lt.TOOLS:
        (other / name).unlink()
        (other / name).symlink_to(llama_tools.bin_dir / name)
    assert lt.check_version(lt.find_tools()) is None


# --- failures end in one line, nothing half-built looks finished ----------------------------------------

@pytest.mark.parametrize("keep,missing", [((), "cmake not found"), (("cmake",), "no C/C++ compiler")])
def test_missing_toolchain_is_one_line_naming_what_to_install(empty_cache, tmp_path, keep, missing):
    bin_dir = tmp_path / "path"
    bin_dir.mkdir()
    for name in keep:
        (bin_dir / name).symlink_to(shutil.which(name))
    proc = _grpoctl("doctor", "--build-llama-tools", env={"PATH": str(bin_dir), "GRPOCTL_CACHE": str(empty_cache)})
    assert proc.returncode == DependencyError.exit_code
    assert proc.stderr.startswith(f"grpoctl: {missing}") and proc.stderr.count("\n") == 1, proc.stderr
    assert "install" in proc.stderr and lt.ENV_BIN in proc.stderr
    assert not (empty_cache / "llama.cpp" / "sdist").exists()  # refused before downloading anything


def test_no_network_for_the_sdist_is_one_line(empty_cache):
    """A real pip run against an index that refuses connections, as on a machine without network."""
    proc = _grpoctl("doctor", "--build-llama-tools", env={
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": ""})
    assert proc.returncode == 10
    assert proc.stderr.startswith("grpoctl: could not download the llama-cpp-python==") and \
        proc.stderr.count("\n") == 1, proc.stderr
    assert "--build-llama-tools" in proc.stderr and lt.ENV_BIN in proc.stderr
    assert not lt.cached_root().exists() and lt.built_tools() == {}


def test_failed_build_shows_the_log_tail_and_keeps_the_log(empty_cache, monkeypatch, capsys):
    """A real CMake build of a source tree that does not compile, packed like the llama-cpp-python sdist."""
    version = sd.installed_version()
    folder = empty_cache / "llama.cpp" / "sdist"
    folder.mkdir(parents=True)
    tarball = folder / "broken.tar.gz"
    top = f"llama_cpp_python-{version}/vendor/llama.cpp"
    files = {f"{top}/CMakeLists.txt": "cmake_minimum_required(VERSION 3.18)\nproject(broken CXX)\n"
                                      "add_executable(llama-quantize broken.cpp)\n",
             f"{top}/broken.cpp": "int main() { return undeclared_symbol_xyz; }\n"}
    with tarfile.open(tarball, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    sd._record(version).write_text(json.dumps({"file": tarball.name, "version": version, "sha256": "0" * 64}))
    monkeypatch.setattr(lt, "TOOLS", ("llama-quantize",))
    with pytest.raises(ToolBuildError) as err:
        lt.build_tools()
    if lt.shared_lib_dir() is not None:  # the linked build cannot configure a tree without common/: full build
        assert "building all of llama.cpp instead" in capsys.readouterr().out
    msg = str(err.value)
    assert msg.startswith("llama.cpp's tools failed to build") and str(lt.build_log()) in msg
    assert "undeclared_symbol_xyz" in msg  # the compiler's own words, from the log's last lines
    assert "undeclared_symbol_xyz" in lt.build_log().read_text()
    assert not lt.cached_root().exists() and lt.built_tools() == {}
    assert not [p for p in lt.cached_root().parent.iterdir() if ".partial-" in p.name]


def _start_build(cache: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """`grpoctl doctor --build-llama-tools` in its own session, its output lines fed to a queue."""
    proc = subprocess.Popen([sys.executable, "-m", "grpoctl", "doctor", "--build-llama-tools"], cwd=ROOT,
                            env={**os.environ, "GRPOCTL_CACHE": str(cache)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    return proc, lines


def _wait_for_compiling(proc: subprocess.Popen, lines: queue.Queue) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if "%" in line and "compiling" in line:
            return seen
    raise AssertionError("the build never reported compiling:\n" + "".join(seen))


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _wait_gone(sid: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the build's processes through /proc")
def test_killed_build_leaves_nothing_that_looks_finished(kept_sdist, empty_cache, tmp_path):
    """Every process of the build killed at once (as by a reboot): no finished-looking folder; the next build
    removes the leftovers before it even checks for cmake."""
    _seed_sdist(empty_cache, kept_sdist)
    proc, lines = _start_build(empty_cache)
    try:
        seen = _wait_for_compiling(proc, lines)
        assert any("ETA" in line for line in seen) or "%" in seen[-1]
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not _wait_gone(proc.pid)
    root = lt.cached_root()
    assert not root.exists() and lt.built_tools() == {}
    with pytest.raises(DependencyError, match="not built"):
        lt.find_tools(build=False)
    leftovers = [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.partial-")]
    assert leftovers, "the kill came mid-build: its staging folder is still there"
    proc2 = _grpoctl("doctor", "--build-llama-tools", env={"PATH": str(tmp_path), "GRPOCTL_CACHE": str(empty_cache)})
    assert "cmake not found" in proc2.stderr
    assert not any(p.exists() for p in leftovers)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the build's processes through /proc")
def test_interrupted_build_stops_its_compilers_and_removes_its_staging_folder(kept_sdist, empty_cache):
    """Ctrl-C: one line, exit 130, no compiler left running, no staging folder left behind."""
    _seed_sdist(empty_cache, kept_sdist)
    proc, lines = _start_build(empty_cache)
    try:
        _wait_for_compiling(proc, lines)
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert rc == 130
    # the compilers run under cmake in their own process group: stopped by grpoctl, not left to finish
    assert not _wait_gone(proc.pid, timeout=20)
    root = lt.cached_root()
    assert not root.exists()
    assert not [p for p in root.parent.iterdir() if ".partial-" in p.name]


def test_concurrent_first_use_waits_for_the_running_build(llama_tools, empty_cache):
    """A second process asking for a tool while another builds waits on the lock, then uses that build."""
    if llama_tools.source != "cache":
        pytest.skip(f"{lt.ENV_BIN} is set: nothing was built here")
    root = lt.cached_root()
    code = "from grpoctl.llamacpp_tools import tool; print('PATH', tool('llama-quantize'))"
    # without the lock it would try to build, and the unreachable index would fail it at once
    env = {**os.environ, "GRPOCTL_CACHE": str(empty_cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    with file_lock(root.with_name(root.name + ".lock")):  # "another process is building"
        waiter = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        first = waiter.stdout.readline()
        assert "waiting" in first, first + waiter.stdout.read()
        time.sleep(1)
        assert waiter.poll() is None
        shutil.copytree(llama_tools.bin_dir.parent, root, symlinks=True)  # the other build completes
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, out
    assert out.strip().splitlines()[-1] == f"PATH {root / 'bin' / 'llama-quantize'}"
    assert "building" not in out
