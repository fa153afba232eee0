"""Export-directory fixtures for the serve tests: a run with an export holding any real GGUF.

``make_export`` lays out RUN/run.json and RUN/export/{artifacts.json, gguf/<Name>-<QUANT>.gguf} exactly as
train and export write them, around whichever GGUF it is given (hard-linked when possible). Extra real
exports can be added to the llama.cpp tests with ``GRPOCTL_SERVE_TEST_EXPORTS=dir1:dir2`` (run or export
directories), e.g. the tiny-model exports of ``grpoctl export``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from grpoctl.artifacts import Artifacts, Provenance
from grpoctl.models import EMBEDDED_ID, identify
from grpoctl.rundir import BaseModelRef, RunDir

SYSTEM_PROMPT = ("You are given a math problem. Think it through, then give the final number "
                 "on its own line after 'Answer:'.")
MAX_SEQ_LENGTH = 1024
REASONING = {"start": "<think>", "end": "</think>"}


def link_or_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def write_run(root: Path, system_prompt: str | None = SYSTEM_PROMPT, max_seq_length: int = MAX_SEQ_LENGTH,
              sampling: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"system_prompt": system_prompt} if system_prompt else {},
        "model": {"max_seq_length": max_seq_length},
        "trainer": sampling if sampling is not None else {"temperature": 1.0, "top_p": 1.0},
        "lora": {"r": 8},
    }
    meta = {"config": config, "base_model": {"id": "embedded:SmolLM2-135M-Instruct", "path": str(root / "base")},
            "reasoning": REASONING}
    (root / "run.json").write_text(json.dumps(meta, indent=2))
    return root


def make_export(export_dir: Path, ggufs: dict[str, Path], name: str = "SmolLM2-135M-Instruct",
                modelfile: str | None = None) -> Artifacts:
    """An export directory with one ``gguf:<quant>`` entry per item of ``ggufs`` (quant -> source file)."""
    if (export_dir / "artifacts.json").is_file():
        manifest = Artifacts.load(export_dir)
    else:
        run = RunDir(export_dir.parent) if RunDir.is_run(export_dir.parent) else None
        base = run.base_model if run else BaseModelRef(id=EMBEDDED_ID, path=str(export_dir / "base"))
        manifest = Artifacts(root=export_dir, provenance=Provenance(base_model=identify(base)))
    for quant, src in ggufs.items():
        dst = link_or_copy(src, export_dir / "gguf" / f"{name}-{quant.upper()}.gguf")
        manifest.add_file(dst, f"gguf:{quant.lower()}")
    if modelfile is not None:
        mf = export_dir / "gguf" / "Modelfile"
        mf.write_text(modelfile)
        manifest.add_file(mf, "modelfile")
    manifest.save()
    return manifest


def extra_exports() -> list[Path]:
    return [Path(p) for p in os.environ.get("GRPOCTL_SERVE_TEST_EXPORTS", "").split(os.pathsep) if p]
