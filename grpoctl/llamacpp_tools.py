"""llama.cpp's own C++ tools (llama-quantize, llama-imatrix, llama-server, llama-perplexity): built once, and
every run of them (:func:`run_tool` to the end, :func:`llama_server` while a block runs).

Some work needs the real command-line tools rather than the Python bindings: ``llama-quantize --imatrix`` reads an
importance matrix file with llama.cpp's own loader (the C API takes the already loaded values: the loader, its
normalisation and the ``quantize.imatrix.*`` metadata live in the tool), ``llama-imatrix`` computes one,
``llama-perplexity`` measures KL-divergence against a base's logits, and
``llama-server``'s ``POST /apply-template`` renders a chat template with llama.cpp's C++ Jinja engine.

They come from one of, in order:

1. ``$GRPOCTL_LLAMA_CPP_BIN``: a directory of llama.cpp tools the user already built (used as is; a
   llama.cpp commit other than the one inside the installed llama-cpp-python is reported, not refused);
2. the cache ``<cache_dir>/llama.cpp/llama-cpp-python-<version>-tools[-<lib dir hash>]/bin/``;
3. on first use, a CMake build of ``vendor/llama.cpp`` from the sdist of the installed llama-cpp-python
   (the same download as the converter's, ``grpoctl.llamacpp_sdist``). Never a git clone.

The build is CPU only, Release, without the web UI, HTTPS or downloads. Where the installed llama-cpp-python
keeps its shared libraries (``llama_cpp/lib``: libllama, libggml*, libmtmd, compiled from the same sdist at
install), only llama.cpp's ``common`` code and the four tools are compiled, linked against those libraries
(``grpoctl/data/llama_tools_linked.cmake``): the tools compute with exactly the code llama-cpp-python runs,
and the build takes a fraction of a full one. The cache of such a build is keyed on that library folder and
rebuilt when its libraries change. Otherwise (no shared libraries, or the linked build fails) all of
llama.cpp is compiled, static and for this machine's CPU (``GGML_NATIVE``): a cache copied to an older CPU
may fail with an illegal instruction, so rebuild there. It runs in a staging folder renamed into place when
complete, under a lock so that concurrent first uses wait for one build.
``grpoctl doctor --build-llama-tools`` builds ahead (``make setup`` does, when cmake and a compiler are there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from grpoctl.errors import DependencyError, InputNotFoundError, ToolBuildError, UsageError
from grpoctl.fsutil import cache_dir, file_lock, staged_dir
from grpoctl.llamacpp_sdist import DIST, Sdist, cached_sdist, extract_vendored, fetch_sdist, installed_version
from grpoctl.procs import run_captured, run_child, start_child, stop_process_group
from grpoctl.threads import default_threads

ENV_BIN = "GRPOCTL_LLAMA_CPP_BIN"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-server", "llama-perplexity")
INFO_FILE = "build.json"
MIN_CMAKE = (3, 18)  # llama.cpp's own scripts/ui-assets.cmake requires it
# Parts of vendor/llama.cpp the build never reads: vocab test models, docs, tests, examples, the converter.
_SKIP = frozenset({"models", "docs", "media", "benches", "examples", "pocs", "tests", "gguf-py", "conversion",
                   ".github", ".devops"})
_BUILD_TAIL = 25  # log lines quoted in a build failure


# The libraries llama-cpp-python installs that the tools link against (llama_tools_linked.cmake)
SHARED_LIBS = ("ggml-base", "ggml-cpu", "ggml", "llama", "mtmd")
LINKED_CMAKE = Path(__file__).parent / "data" / "llama_tools_linked.cmake"


def cmake_flags(commit: str | None, lib_dir: Path | None = None, version: tuple[int, int, int] | None = None
                ) -> list[str]:
    """The configure flags, recorded with every build (why each one matters in the comments): of the build
    linked against the libraries in ``lib_dir`` (``version``: the sdist's llama.cpp version), or of the
    full static build when ``lib_dir`` is None."""
    if lib_dir is not None:
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            # what is compiled here is glue around the libraries (arguments, JSON, HTTP, chat templates): -O1
            # compiles it in 0.6x the time of -O3; the computing runs in the package's optimised libraries, and
            # without -ffast-math the tools' own float loops give the same results at either level
            "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG",
            f"-DGRPOCTL_LIB_DIR={lib_dir}",  # llama-cpp-python's libllama, libggml*, libmtmd
            "-DBUILD_SHARED_LIBS=OFF",  # common and the tools' own code go into the executables
            *(f"-DLLAMA_VERSION_{k}={v}" for k, v in zip(("MAJOR", "MINOR", "PATCH"), version or (0, 0, 0),
                                                           strict=True)),
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no npm, no web UI download from the Hub
            "-DLLAMA_OPENSSL=OFF",  # offline: no model downloads
            "-DLLAMA_ALL_WARNINGS=OFF",
        ]
    else:
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",  # the staging folder is renamed: no RPATH may point into it
            "-DGGML_NATIVE=ON",  # this CPU's instruction set; the cache is per machine
            "-DGGML_METAL=OFF", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF",  # CPU only (Metal is on by default on macOS)
            "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no npm, no web UI download from the Hub
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",  # offline: no model downloads (LLAMA_CURL: older trees)
            "-DLLAMA_ALL_WARNINGS=OFF",
        ]
        if _cpu_has_amx():  # ggml's AMX kernels crash on the first quantized matmul (llama.cpp issue 20824)
            flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    if commit:  # the sdist has no .git work tree: `--version` would say "unknown"
        flags.append(f"-DLLAMA_BUILD_COMMIT={commit[:8]}")
    return flags


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # -march=native would turn them on


def _cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def shared_lib_dir() -> Path | None:
    """The installed llama-cpp-python's ``llama_cpp/lib`` when it holds every library of SHARED_LIBS as a
    shared library of this platform (.so, .dylib); None otherwise (Windows, a static build, not installed)."""
    suffix = {"Linux": ".so", "Darwin": ".dylib"}.get(platform.system())
    if suffix is None:
        return None
    try:
        lib_dir = Path(metadata.distribution(DIST).locate_file("llama_cpp/lib")).resolve()
    except (metadata.PackageNotFoundError, OSError):
        return None
    if all((lib_dir / f"lib{name}{suffix}").is_file() for name in SHARED_LIBS):
        return lib_dir
    return None


def _lib_files(lib_dir: Path) -> list[Path]:
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    return [lib_dir / f"lib{name}{suffix}" for name in SHARED_LIBS]


def library_signature(lib_dir: Path) -> dict[str, list[int]]:
    """{file name: [size, mtime in ns]} of the libraries a linked build uses: a reinstall that replaces them
    (other build flags, another backend) makes the cached tools stale."""
    out = {}
    for path in _lib_files(lib_dir):
        try:
            st = path.stat()
        except OSError:
            continue
        out[path.name] = [st.st_size, st.st_mtime_ns]
    return out


@dataclass(frozen=True)
class Tools:
    """A directory of llama.cpp tools: ``source`` is "cache" (built here) or "env" ($GRPOCTL_LLAMA_CPP_BIN)."""

    bin_dir: Path
    source: str
    info: dict = field(default_factory=dict)  # build.json of a cached build

    def path(self, name: str) -> Path:
        _check_name(name)
        exe = self.bin_dir / name
        if not exe.is_file():
            raise InputNotFoundError(f"{self.bin_dir} has no {name}" + (f" (set by {ENV_BIN})" if self.source == "env"
                                                                         else ""))
        return exe

    def available(self) -> dict[str, Path]:
        return {name: self.bin_dir / name for name in TOOLS if (self.bin_dir / name).is_file()}


_warned: set[Path] = set()  # $GRPOCTL_LLAMA_CPP_BIN directories whose version note was printed


def tool(name: str, *, build: bool = True) -> Path:
    """Path of llama.cpp's tool ``name`` (one of TOOLS), building all of them on first use when ``build``."""
    _check_name(name)
    tools = find_tools(build=build)
    if tools.source == "env" and tools.bin_dir not in _warned:
        _warned.add(tools.bin_dir)
        if note := check_version(tools):
            print(f"grpoctl: warning: {note}", flush=True)
    return tools.path(name)


def built_tools() -> dict[str, Path]:
    """The tools usable now without building: {name: path}, empty when none are."""
    try:
        return find_tools(build=False).available()
    except (DependencyError, InputNotFoundError):
        return {}


def find_tools(build: bool = False) -> Tools:
    """The tools to use: $GRPOCTL_LLAMA_CPP_BIN, else the cache, else (when ``build``) a build into the cache."""
    if os.environ.get(ENV_BIN):
        return _env_tools(Path(os.environ[ENV_BIN]))
    if (found := _cached(cached_root())) is not None:
        return found
    if not build:
        raise DependencyError(f"llama.cpp's tools are not built ({cached_root()} is missing); build them once with "
                              f"`grpoctl doctor --build-llama-tools` (needs cmake and a C++ compiler), or set "
                              f"{ENV_BIN} to a directory of llama.cpp tools")
    return build_tools()


def cached_root(version: str | None = None) -> Path:
    """The cache folder of the tools for the installed llama-cpp-python: per version, and per library folder
    when they are linked against its libraries (two environments of one version keep their own)."""
    name = f"{DIST}-{version or installed_version()}-tools"
    if (lib_dir := shared_lib_dir()) is not None:
        name += "-" + hashlib.sha256(str(lib_dir).encode()).hexdigest()[:10]
    return cache_dir() / "llama.cpp" / name


def build_log(version: str | None = None) -> Path:
    """The log of the latest build attempt, kept next to the cached build (also when the build failed)."""
    root = cached_root(version)
    return root.with_name(root.name + ".log")


def build_tools(force: bool = False, jobs: int | None = None) -> Tools:
    """Build TOOLS from the installed llama-cpp-python's sdist into the cache (once; ``force`` rebuilds).

    Raises DependencyError when cmake or a C/C++ compiler is missing, OfflineError when the sdist cannot be
    downloaded, ToolBuildError (with the log's last lines) when the build fails.
    """
    version = installed_version()
    root = cached_root(version)
    if not force and (found := _cached(root)) is not None:
        return found
    with file_lock(root.with_name(root.name + ".lock"),
                   waiting="grpoctl: another process is building llama.cpp's tools; waiting for it"):
        if not force and (found := _cached(root)) is not None:  # built while we waited
            return found
        _remove_leftovers(root)  # we hold the lock: any staging folder is from a build that was killed
        cmake, compiler = _toolchain()
        sdist = fetch_sdist(version, hint=f"when offline, build once on a machine with access (`grpoctl doctor "
                            f"--build-llama-tools`, then copy {root}) or set {ENV_BIN} to a directory of llama.cpp "
                            "tools")
        return _build(root, sdist, cmake, compiler, jobs or default_threads())


def check_version(tools: Tools) -> str | None:
    """For tools from $GRPOCTL_LLAMA_CPP_BIN: a note when their llama.cpp commit differs from the one inside the
    installed llama-cpp-python; None when they match or either side cannot tell."""
    expected = _expected_commit()
    found = _reported_commit(tools.bin_dir)
    if not expected or not found or expected.startswith(found):
        return None
    return (f"{ENV_BIN} tools are llama.cpp {found}, the installed {DIST}=={installed_version()} carries "
            f"{expected[:8]}; their results may differ")


# --- llama-server's chat templating ------------------------------------------------------------------

@contextmanager
def llama_server(gguf: Path, chat_template_file: Path | None = None) -> Iterator[str]:
    """llama-server (built by this module; never built here) on ``gguf`` at a free 127.0.0.1 port, with its
    Jinja chat templating on (and ``chat_template_file`` instead of the GGUF's template, when given); yields
    its URL and stops it however the block ends. DependencyError when the tools are not built or the GGUF
    does not load."""
    server = tool("llama-server", build=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile("w+") as log:
        proc = start_child([str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                            "-c", "256", "-t", "1", "--jinja", "--no-warmup",
                            *(["--chat-template-file", str(chat_template_file)] if chat_template_file else [])],
                           stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = " ".join(log.read().strip().splitlines()[-2:])
                    raise DependencyError(f"llama-server could not load {gguf.name} (exit {proc.returncode}: "
                                          f"{tail[-300:]})")
                with contextlib.suppress(OSError):
                    with _OPENER.open(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise DependencyError(f"llama-server did not load {gguf.name} within 300 s")
                time.sleep(0.3)
            yield url
        finally:
            stop_process_group(proc.pid, grace=30, wait=proc.wait)


def apply_template(url: str, messages: list[dict[str, str]], kwargs: dict | None = None) -> tuple[str, str]:
    """(prompt, error): what llama-server at ``url`` renders for ``messages`` (``POST /apply-template``, the
    same chat layer as /v1/chat/completions; ``kwargs`` go as ``chat_template_kwargs``), or why it refused."""
    body = {"messages": messages, **({"chat_template_kwargs": kwargs} if kwargs else {})}
    req = urllib.request.Request(url + "/apply-template", headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode())
    try:
        with _OPENER.open(req, timeout=120) as r:
            return json.loads(r.read())["prompt"], ""
    except urllib.error.HTTPError as err:
        return "", f"HTTP {err.code}: {err.read()[:200].decode(errors='replace')}"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only: never via a proxy


# --- running a tool to the end ---------------------------------------------------------------------------

def run_tool(name: str, args: list[str], cwd: Path, on_line: Callable[[str], None] | None = None
             ) -> tuple[int, list[str]]:
    """Run llama.cpp's tool ``name`` (built on first use) with ``args`` in ``cwd`` as grpoctl runs every child
    (``grpoctl.procs.run_child``: its own process group, stopped on Ctrl-C, SIGTERM or any error, killed if
    grpoctl dies); returns (exit code, stderr lines then stdout lines). ``on_line`` sees stderr (the log) as
    it comes.

    The two streams stay separate pipes: with both on one descriptor llama.cpp's logger wrote nothing here.
    """
    out: list[bytes] = []
    lines: list[str] = []

    def read(proc: subprocess.Popen) -> None:
        reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
        reader.start()
        for line in proc.stderr or []:
            lines.append(line.decode("utf-8", errors="replace").rstrip("\n"))
            if on_line is not None:
                on_line(lines[-1])
        reader.join()

    rc = run_child([str(tool(name)), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   while_running=read)
    return rc, lines + [ln.decode("utf-8", errors="replace").rstrip("\n") for ln in out]


def last_error(lines: list[str]) -> str:
    """The line of a tool's log that says what went wrong: the first of llama.cpp's error lines (later ones only
    repeat that it failed), else the last line with text."""
    text = [ln.strip() for ln in lines if ln.strip()]
    errors = [ln for ln in text if re.match(r"[\d.]+ E ", ln)
              or re.search(r"\b(error|failed|invalid|not a valid|cannot)\b", ln, re.I)]
    picked = errors[0] if errors else (text or ["no output"])[-1]
    return re.sub(r"^[\d.]+ [EWI] ", "", picked)[:300]


# --- finding --------------------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if name not in TOOLS:
        raise UsageError(f"unknown llama.cpp tool {name!r}; grpoctl provides {', '.join(TOOLS)}")


def _cached(root: Path) -> Tools | None:
    """A finished build: build.json (written last, before the rename) and every tool present."""
    try:
        info = json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    tools = Tools(bin_dir=root / "bin", source="cache", info=info)
    if info.get("linked_to") and library_signature(Path(info["linked_to"])) != info.get("libraries"):
        return None  # the libraries they run on were replaced or removed: build again
    return tools if len(tools.available()) == len(TOOLS) else None


def _env_tools(directory: Path) -> Tools:
    directory = directory.expanduser().resolve()
    if not directory.is_dir():
        raise InputNotFoundError(f"{ENV_BIN}={directory} is not a directory")
    # a llama.cpp build keeps its executables in build/bin; accept either that folder or the build folder
    bin_dir = directory if any((directory / t).is_file() for t in TOOLS) or not (directory / "bin").is_dir() \
        else directory / "bin"
    return Tools(bin_dir=bin_dir, source="env")


def _expected_commit() -> str | None:
    if (found := _cached(cached_root())) is not None and found.info.get("llama_cpp_commit"):
        return found.info["llama_cpp_commit"]
    sdist = cached_sdist()
    return sdist.llama_cpp_commit if sdist else None


def _reported_commit(bin_dir: Path) -> str | None:
    """The commit a tool prints for --version: "version: 0.5.0 (build 7000, commit abc1234)" or older
    "version: 7000 (abc1234)". llama-quantize has no --version; the others share one build."""
    for name in ("llama-server", "llama-imatrix", "llama-perplexity"):
        exe = bin_dir / name
        if not exe.is_file():
            continue
        try:
            proc = run_captured([str(exe), "--version"], timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"^version: .*?(?:commit )?([0-9a-f]{7,40})\)", proc.stdout + proc.stderr, re.M)
        if m:
            return m.group(1)
    return None


# --- building -------------------------------------------------------------------------------------------

def _toolchain() -> tuple[str, str]:
    """cmake and the C++ compiler CMake will pick, or a DependencyError saying what to install."""
    cmake = shutil.which("cmake")
    alternative = f"; or set {ENV_BIN} to a directory of llama.cpp tools built elsewhere"
    need = f"building llama.cpp's tools needs CMake >= {'.'.join(map(str, MIN_CMAKE))}"
    if cmake is None:
        raise DependencyError(f"cmake not found on PATH; {need}: pip install cmake (or apt install cmake){alternative}")
    out = run_captured([cmake, "--version"]).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < MIN_CMAKE:
        have = out.splitlines()[0] if out else "not working"
        raise DependencyError(f"{cmake} is {have}; {need}: pip install -U cmake{alternative}")
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    cxx = next((p for c in candidates if (p := shutil.which(c))), None)
    cc_candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    if cxx is None or not any(shutil.which(c) for c in cc_candidates):
        raise DependencyError(f"no C/C++ compiler found (looked for {', '.join(cc_candidates + candidates)}); "
                              "building llama.cpp's tools needs one: apt install build-essential (Debian/Ubuntu), "
                              f"dnf install gcc-c++ (Fedora), xcode-select --install (macOS){alternative}")
    return cmake, cxx


def _remove_leftovers(root: Path) -> None:
    for stale in root.parent.glob(f".{root.name}.*"):
        if stale.is_dir() and (".partial-" in stale.name or ".old-" in stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _build(root: Path, sdist: Sdist, cmake: str, cxx: str, jobs: int) -> Tools:
    log_path = build_log(sdist.version)
    lib_dir = shared_lib_dir()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    what = f"llama.cpp's {', '.join(TOOLS)} from the {DIST}=={sdist.version} sdist"
    how = f"once; CPU only, {jobs} job{'s' * (jobs != 1)}"
    start = time.monotonic()
    with staged_dir(root, force=True) as stage, open(log_path, "w", buffering=1) as log:
        flags = None
        if lib_dir is not None:
            print(f"grpoctl: building {what}, linked against llama-cpp-python's libraries in {lib_dir} ({how}, "
                  f"a few minutes) -> {root}", flush=True)
            try:
                flags = _compile(stage, sdist, cmake, generator, jobs, log, log_path, lib_dir, start)
            except ToolBuildError as err:
                print(f"grpoctl: the tools did not build against llama-cpp-python's libraries "
                      f"({str(err).splitlines()[0]}); building all of llama.cpp instead", flush=True)
                for leftover in ("src", "build", "bin"):
                    shutil.rmtree(stage / leftover, ignore_errors=True)
                lib_dir = None
        if flags is None:
            print(f"grpoctl: building {what} ({how}, several minutes) -> {root}", flush=True)
            flags = _compile(stage, sdist, cmake, generator, jobs, log, log_path, None, start)
        compiler = _cmake_cache(stage / "build", "CMAKE_CXX_COMPILER") or cxx
        info = {
            "llama_cpp_python": sdist.version,
            "sdist": sdist.path.name,
            "sdist_sha256": sdist.sha256,
            "llama_cpp_commit": sdist.llama_cpp_commit,
            "tools": list(TOOLS),
            "linked_to": str(lib_dir) if lib_dir is not None else None,
            "libraries": library_signature(lib_dir) if lib_dir is not None else None,
            "cmake_flags": flags,
            "generator": "Ninja" if generator else "default",
            "cmake": run_captured([cmake, "--version"]).stdout.splitlines()[0],
            "compiler": _first_line([compiler, "--version"]) or compiler,
            "compiler_path": compiler,
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "jobs": jobs,
            "build_seconds": round(time.monotonic() - start, 1),
        }
        shutil.rmtree(stage / "src")
        shutil.rmtree(stage / "build")
        (stage / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    print(f"grpoctl: llama.cpp's tools built in {_clock(time.monotonic() - start)} -> {root / 'bin'}", flush=True)
    found = _cached(root)
    assert found is not None
    return found


def _compile(stage: Path, sdist: Sdist, cmake: str, generator: list[str], jobs: int, log, log_path: Path,
             lib_dir: Path | None, start: float) -> list[str]:
    """Extract, configure and build into ``stage`` (src/, build/, bin/ with TOOLS); returns the flags used.
    With ``lib_dir``, the linked build (llama_tools_linked.cmake), else llama.cpp's own full build."""
    src, build = stage / "src", stage / "build"
    if lib_dir is None:
        extract_vendored(sdist.path, src, keep=lambda parts: parts[0] not in _SKIP)
        flags = cmake_flags(sdist.llama_cpp_commit)
    else:
        extract_vendored(sdist.path, src, keep=_linked_keeps)
        top = src / "CMakeLists.txt"
        version = _llama_version(top)
        top.write_text(LINKED_CMAKE.read_text())
        flags = cmake_flags(sdist.llama_cpp_commit, lib_dir, version)
    _run_logged([cmake, "-S", str(src), "-B", str(build), *generator, *flags], log, log_path, "configure")
    _run_logged([cmake, "--build", str(build), "--config", "Release", "--parallel", str(jobs),
                 "--target", *TOOLS], log, log_path, "build", progress=_Progress(start))
    (stage / "bin").mkdir()
    for name in TOOLS:
        exe = next((p for p in (build / "bin" / name, build / "bin" / "Release" / name) if p.is_file()), None)
        if exe is None:
            raise ToolBuildError(f"the llama.cpp build finished without {name}; see {log_path}")
        shutil.copy2(exe, stage / "bin" / name)
    return flags


def _linked_keeps(parts: tuple[str, ...]) -> bool:
    """What the linked build reads: no ggml or libllama sources (the installed libraries are those), only
    their headers."""
    if parts[0] in _SKIP:
        return False
    if parts[0] == "ggml":
        return len(parts) < 2 or parts[1] in ("include", "cmake")
    if parts[0] == "src":
        return parts[-1].endswith(".h")
    return True


def _llama_version(top_cmake: Path) -> tuple[int, int, int] | None:
    """llama.cpp's version from its top-level CMakeLists.txt (``set(LLAMA_VERSION_MAJOR 0)`` ...)."""
    try:
        text = top_cmake.read_text(errors="replace")
    except OSError:
        return None
    found = [re.search(rf"set\(LLAMA_VERSION_{k}\s+(\d+)\)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return tuple(int(m.group(1)) for m in found) if all(found) else None  # type: ignore[return-value]


def _run_logged(cmd: list[str], log, log_path: Path, step: str, progress: _Progress | None = None) -> None:
    """Run one build step with its output appended to the log; on failure raise with the log's last lines."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = os.environ | {"NINJA_STATUS": "[%f/%t] ", "CLICOLOR_FORCE": "0"}

    def follow(proc: subprocess.Popen) -> None:
        for raw in proc.stdout or []:
            line = raw.decode("utf-8", errors="replace")
            log.write(line)
            if progress is not None:
                progress.update(line)

    # run_child: its own process group, so that Ctrl-C or any error here stops the build tool and the compilers
    # under cmake too; they must not keep writing into a folder being removed
    try:
        rc = run_child(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, while_running=follow)
    finally:
        log.flush()
    if rc != 0:
        tail = _tail(log_path, _BUILD_TAIL)
        raise ToolBuildError(f"llama.cpp's tools failed to {step} (exit {rc}); full log: {log_path}; last lines:\n"
                             + "\n".join(f"  {ln}" for ln in tail))


class _Progress:
    """Percent, current file and a rough ETA from CMake's "[12/216] ..." (Ninja) or "[ 5%] ..." (Make) lines.

    A line goes out per 5 % step or 30 s, whichever comes first, so logs of a non-interactive run stay short.
    """

    _NINJA = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)")
    _MAKE = re.compile(r"^\[\s*(\d+)%\]\s+(.*)")

    def __init__(self, start: float) -> None:
        self.start = start
        self.last_pct = -100.0
        self.last_time = 0.0

    def update(self, line: str) -> None:
        if m := self._NINJA.match(line):
            done, total, what = int(m.group(1)), int(m.group(2)), m.group(3)
            pct = 100.0 * done / max(total, 1)
            count = f" ({done}/{total})"
        elif m := self._MAKE.match(line):
            pct, what, count = float(m.group(1)), m.group(2), ""
        else:
            return
        now = time.monotonic()
        if pct - self.last_pct < 5 and now - self.last_time < 30 and pct < 100:
            return
        self.last_pct, self.last_time = pct, now
        elapsed = now - self.start
        eta = f", ETA ~{_clock(elapsed * (100 - pct) / pct)}" if 0 < pct < 100 else ""
        print(f"grpoctl:   {pct:3.0f}%{count} {_describe(what)}  [{_clock(elapsed)}{eta}]", flush=True)


def _describe(what: str) -> str:
    """"Building CXX object tools/server/CMakeFiles/server-context.dir/server-context.cpp.o" -> "server-context.cpp"."""
    if m := re.search(r"(?:Building \w+ object|Linking \w+ \w+(?: library)?) (\S+)", what):
        target = m.group(1)
        name = Path(target).name.removesuffix(".o").removesuffix(".obj")
        return ("linking " if what.startswith("Linking") else "compiling ") + name
    return what.strip()[:60]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _tail(path: Path, n: int) -> list[str]:
    lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-n:]


def _cmake_cache(build: Path, key: str) -> str | None:
    try:
        text = (build / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(rf"^{key}:\w+=(.*)$", text, re.M)
    return m.group(1).strip() if m else None


def _first_line(cmd: Iterable[str]) -> str | None:
    try:
        out = run_captured(list(cmd), timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
