"""The export directory's names: the folders and files ``grpoctl export`` writes and the later stages (manifests,
serve, push) find by name, and where in it a tokenizer is looked for. Imports nothing from grpoctl.

``artifacts.json`` lists every file with a kind; the kinds of the folders below are their names (``merged``,
``merged-4bit``, ``lora``), a GGUF's is ``gguf:<type>``.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS_FILE = "artifacts.json"  # the record (grpoctl.artifacts)
VERIFY_FILE = "verify.json"  # the adapter verification, every module
MERGED_DIR = "merged"  # --merged 16bit
MERGED_4BIT_DIR = "merged-4bit"  # --merged 4bit
LORA_DIR = "lora"  # --lora
GGUF_DIR = "gguf"  # the GGUF files, parity.json and the Modelfiles
PARITY_FILE = "parity.json"  # in gguf/: every GGUF against the PEFT reference
VLLM_DIR = "vllm"  # the vLLM manifests (and parity-<mode>.json from serve --parity)


def tokenizer_dirs(export_dir: Path, adapter_dir: Path | None = None, base_dir: Path | None = None) -> list[Path]:
    """Where the tokenizer (with its chat template) of an export is looked for, first match wins: the export's own
    copies (each written from the trained tokenizer), then the adapter folder it was exported from, then the base
    model's folder when given. Callers keep the folders that hold one (``grpoctl.models.has_tokenizer``)."""
    export_dir = Path(export_dir)
    found = [export_dir / MERGED_DIR, export_dir / LORA_DIR, export_dir / MERGED_4BIT_DIR]
    return found + [Path(d) for d in (adapter_dir, base_dir) if d is not None]
