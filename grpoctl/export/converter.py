"""llama.cpp's own HF -> GGUF converter, matched to the llama.cpp inside the installed llama-cpp-python.

The converter is three parts of the llama.cpp tree: ``convert_hf_to_gguf.py``, its ``conversion/``
package and ``gguf-py/``. They come from one of, in order:

1. ``--llama-cpp-dir`` / ``$GRPOCTL_LLAMA_CPP_DIR``: a llama.cpp checkout the user already has;
2. the cache ``<cache_dir>/llama.cpp/llama-cpp-python-<version>/``;
3. on first use, the sdist of the installed llama-cpp-python version, fetched from PyPI with
   ``pip download`` and kept (``grpoctl.llamacpp_sdist``, shared with the C++ tools); only those three
   parts are extracted into the cache. Never a git clone.

Pre-fetch while online (e.g. before going to an air-gapped machine): ``python -m grpoctl.export.converter``.

The converter runs in a subprocess (``grpoctl.export.convert_worker``) with its own ``gguf-py`` first
on ``sys.path``, so the vendored ``gguf`` never clobbers the installed ``gguf`` package in this process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from grpoctl.errors import DependencyError, InputNotFoundError, OfflineError
from grpoctl.fsutil import cache_dir, staged_dir
from grpoctl.llamacpp_sdist import DIST, extract_vendored, fetch_sdist, installed_version

ENV_DIR = "GRPOCTL_LLAMA_CPP_DIR"
# what the converter needs from a llama.cpp tree; nothing else is extracted
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
SOURCE_FILE = "grpoctl-source.json"


@dataclass(frozen=True)
class Converter:
    """A usable converter tree: ``root`` holds convert_hf_to_gguf.py, conversion/ and gguf-py/."""

    root: Path
    source: str  # "checkout" | "cache"
    llama_cpp_python: str | None = None  # the version whose sdist it came from

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def python_path(self) -> str:
        """PYTHONPATH for a converter subprocess: vendored gguf-py first, then the tree, then grpoctl."""
        grpoctl_root = Path(__file__).resolve().parents[2]
        parts = [str(self.gguf_py), str(self.root), str(grpoctl_root)]
        if os.environ.get("PYTHONPATH"):
            parts.append(os.environ["PYTHONPATH"])
        return os.pathsep.join(parts)


def cached_root(version: str | None = None) -> Path:
    return cache_dir() / "llama.cpp" / f"{DIST}-{version or installed_version()}"


def _is_tree(root: Path) -> bool:
    return (root / PARTS[0]).is_file() and (root / "conversion" / "__init__.py").is_file() \
        and (root / "gguf-py" / "gguf" / "__init__.py").is_file()


def find_converter(fetch: bool = True, llama_cpp_dir: Path | None = None) -> Converter:
    """The converter to use; fetches the sdist into the cache when allowed and nothing is found."""
    explicit = llama_cpp_dir or (Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else None)
    if explicit is not None:
        root = Path(explicit).expanduser().resolve()
        if not root.is_dir():
            raise InputNotFoundError(f"llama.cpp directory {root} does not exist")
        if not _is_tree(root):
            raise InputNotFoundError(f"{root} is not a llama.cpp checkout: it needs {', '.join(PARTS)} "
                                     "(convert_hf_to_gguf.py with its conversion/ package and gguf-py/)")
        return Converter(root=root, source="checkout")
    version = installed_version()
    root = cached_root(version)
    if _is_tree(root):
        return Converter(root=root, source="cache", llama_cpp_python=version)
    if not fetch:
        raise OfflineError(f"the GGUF converter is not cached ({root} is missing); fetch it once while online "
                           f"with `python -m grpoctl.export.converter` (downloads the {DIST}=={version} sdist "
                           f"from PyPI), or set {ENV_DIR} / --llama-cpp-dir to a llama.cpp checkout")
    return fetch_converter(version)


def fetch_converter(version: str | None = None) -> Converter:
    """Extract the converter parts of the llama-cpp-python sdist (fetched once from PyPI) into the cache."""
    version = version or installed_version()
    root = cached_root(version)
    sdist = fetch_sdist(version, hint=f"when offline, fetch it once on a machine with access (`python -m "
                        f"grpoctl.export.converter`, then copy {cache_dir()}) or set {ENV_DIR} / --llama-cpp-dir "
                        "to a llama.cpp checkout")
    print(f"grpoctl: extracting llama.cpp's converter from {sdist.path.name} (once) -> {root}", flush=True)
    with staged_dir(root, force=True, wait=True) as stage:  # a concurrent fetch queues
        _extract(sdist.path, stage)
        if not _is_tree(stage):
            raise DependencyError(f"the {DIST}=={version} sdist has no complete llama.cpp converter "
                                  f"({', '.join(PARTS)}); use --llama-cpp-dir with a llama.cpp checkout")
        (stage / SOURCE_FILE).write_text(json.dumps({"sdist": sdist.path.name, "llama_cpp_python": version,
                                                     "sdist_sha256": sdist.sha256}) + "\n")
    return Converter(root=root, source="cache", llama_cpp_python=version)


def _extract(sdist: Path, dest: Path) -> None:
    """Extract only vendor/llama.cpp/{convert_hf_to_gguf.py,conversion/,gguf-py/} from the sdist."""
    extract_vendored(sdist, dest, keep=lambda parts: parts[0] in PARTS)


def main() -> None:
    conv = find_converter(fetch=True)
    print(f"grpoctl: GGUF converter ready at {conv.root}")


if __name__ == "__main__":
    main()
