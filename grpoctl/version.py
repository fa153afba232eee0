"""The version of grpoctl, and how the records (run.json, artifacts.json) read the versions of the libraries it ran
with. Imports nothing from grpoctl, so every stage can read it without importing the package root (which sits above
the stages); ``grpoctl.__version__`` re-exports the version for pyproject and users."""

from __future__ import annotations

from collections.abc import Iterable

__version__ = "0.1.0"


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """The installed version of each distribution in ``names`` (``llama_cpp_python`` or ``llama-cpp-python``);
    one not installed is left out."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out
