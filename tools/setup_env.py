"""`make setup`: install grpoctl with its tested dependency set into this Python, once.

pip takes about 25 s to decide that nothing needs doing, on every `make demo` and `make test`. This script
skips it when a stamp says the last install here succeeded with the same inputs and the pinned versions are
still the installed ones (cheap: read from the installed metadata, no resolver, no index).

The stamp (``.setup-stamp-<python>``, in the checkout) holds a hash of what decides the install: pyproject.toml, the
constraints file, this Python (its executable and prefix) and the checkout's path (the editable install
points there). Any of them changing, a pinned package at another version, or grpoctl not importable from
this checkout: pip runs again.

After an install it builds llama.cpp's tools once (``grpoctl doctor --build-llama-tools``: linked against
the libraries llama-cpp-python just compiled, a few minutes on two cores) so that the first export runs
every check; without cmake or a compiler it says what is skipped and carries on.

    python tools/setup_env.py [--constraints constraints/cpu.txt] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one stamp per Python (several may use one checkout); GRPOCTL_SETUP_STAMP_DIR moves it (the fresh-install check)
STAMP = Path(os.environ.get("GRPOCTL_SETUP_STAMP_DIR") or ROOT) / \
    f".setup-stamp-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"
# ggml's AMX matrix kernels, compiled in by -march=native on Sapphire Rapids and later Xeons, crash
# (SIGSEGV in ggml_backend_amx_mul_mat on the first quantized matmul, llama.cpp issue 20824): build without
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def pins(constraints: Path) -> dict[str, str]:
    """{normalised name: version} of every ``name==version`` line."""
    out = {}
    for line in constraints.read_text().splitlines():
        if m := PIN.match(line):
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    return version.split("+", 1)[0]  # torch 2.13.0+cpu satisfies ==2.13.0


def key(constraints: Path) -> str:
    h = hashlib.sha256()
    for part in ((ROOT / "pyproject.toml").read_bytes(), constraints.read_bytes(),
                 os.path.realpath(sys.executable).encode(), sys.prefix.encode(), str(ROOT).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def stale(constraints: Path) -> str | None:
    """Why pip must run, or None when the installed set is the one the stamp recorded."""
    try:
        recorded = STAMP.read_text().strip()
    except OSError:
        return "no earlier install recorded in this checkout"
    if recorded != key(constraints):
        return "pyproject.toml, the constraints or the Python changed since the last install"
    for name, version in pins(constraints).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            return f"{name} is not installed"
        if _public(have) != version:
            return f"{name} is {have}, the constraints pin {version}"
    spec = importlib.util.find_spec("grpoctl")
    if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(ROOT):
        return f"grpoctl is not installed from {ROOT}"
    return None


def install(constraints: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install"]
    wanted = pins(constraints).get("torch")
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    if torch is None:
        _run([*pip, f"torch=={wanted}" if wanted else "torch"])
        torch = wanted
    cons = constraints
    if wanted and torch and _public(torch) != wanted:
        # a torch installed on purpose (a CUDA build) stays: everything else is held to the tested set
        print(f"setup: keeping the installed torch {torch} (the tested set has {wanted})", flush=True)
        cons = STAMP.with_name(".setup-constraints.txt")
        cons.write_text("".join(line + "\n" for line in constraints.read_text().splitlines()
                                if not (m := PIN.match(line)) or _norm(m.group(1)) != "torch"))
    if _has_amx():
        # llama-cpp-python is compiled here from its sdist (CMake takes CFLAGS/CXXFLAGS; scikit-build-core
        # splits CMAKE_ARGS on spaces); a wheel pip built before may carry AMX: not from the cache
        print("setup: this CPU has AMX: llama-cpp-python is compiled without ggml's AMX kernels", flush=True)
        env = os.environ | {k: f"{os.environ.get(k, '')} {NO_AMX}".strip() for k in ("CFLAGS", "CXXFLAGS")}
        llama = pins(constraints).get("llama-cpp-python")
        _run([*pip, "--no-cache-dir", "-c", str(cons), f"llama-cpp-python=={llama}" if llama else "llama-cpp-python"],
             env=env)
    _run([*pip, "-c", str(cons), "-e", f"{ROOT}[test]"])


def _has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build_llama_tools() -> None:
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))):
        print("setup: cmake or a C++ compiler is missing: llama.cpp's tools are not built; exports skip the "
              "checks that need them and say so (`grpoctl doctor --build-llama-tools` once they are there)")
        return
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "doctor", "--build-llama-tools"], cwd=ROOT)
    if proc.returncode != 0:
        print("setup: llama.cpp's tools did not build (see above); grpoctl works without them, exports skip "
              "the checks that need them and say so")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("setup: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--constraints", type=Path, default=ROOT / "constraints" / "cpu.txt")
    ap.add_argument("--check", action="store_true", help="only say whether pip would run (exit 1 if so)")
    args = ap.parse_args()
    constraints = args.constraints.resolve()
    why = stale(constraints)
    if args.check:
        print(f"setup: install needed: {why}" if why else "setup: installed set matches")
        return 1 if why else 0
    if why is None:
        print(f"setup: installed set matches pyproject.toml and {constraints.name}; pip skipped "
              f"(rm {STAMP} to force)")
        return 0
    print(f"setup: installing ({why})", flush=True)
    STAMP.unlink(missing_ok=True)
    try:
        install(constraints)
    except subprocess.CalledProcessError as err:
        print(f"setup: pip failed (exit {err.returncode})", file=sys.stderr)
        return err.returncode or 1
    STAMP.write_text(key(constraints) + "\n")
    build_llama_tools()
    return 0


if __name__ == "__main__":
    sys.exit(main())
