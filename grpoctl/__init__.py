"""grpoctl: GRPO fine-tuning to deployment (train, export, manifests, serve).

The stages are the subpackages ``grpoctl.train``, ``grpoctl.export``, ``grpoctl.manifests``, ``grpoctl.serve``
and ``grpoctl.push``; the functions the command line calls are ``grpoctl.api`` (``grpoctl.api.export(...)``).
"""

from __future__ import annotations

import importlib
from typing import Any

from grpoctl.version import __version__

__all__ = ["__version__", "api"]


def __getattr__(name: str) -> Any:
    # loaded on first use: importing grpoctl (the CLI's --help, doctor) must not import torch
    if name == "api":
        return importlib.import_module("grpoctl.api")
    raise AttributeError(f"module 'grpoctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "api"})
