"""What the Ollama and vLLM planners share for one manifests run: the export, the run, the options, the notes.

``grpoctl.manifests.api`` builds it and owns the write; ``grpoctl.manifests.ollama`` and
``grpoctl.manifests.vllm`` each plan their own files from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: api imports the planners, which import this
    from grpoctl.artifacts import Artifacts
    from grpoctl.manifests.api import ManifestOptions
    from grpoctl.rundir import RunDir


@dataclass
class ManifestContext:
    """One manifests run: where it reads and writes, the run, the user's options, and the notes the planners
    leave for artifacts.json."""

    export_dir: Path
    out_dir: Path
    artifacts: Artifacts
    run: RunDir | None
    tokenizer_dir: Path
    options: ManifestOptions
    notes: list[str] = field(default_factory=list)
    vllm_notes: list[str] = field(default_factory=list)  # about the vLLM manifests: kept only when they are written
