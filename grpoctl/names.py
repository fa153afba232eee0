"""Names grpoctl derives from paths and ids (GGUF file names, served model names), in a shape every consumer
accepts: file systems, vLLM's and llama.cpp's argument parsers, ``--lora-modules name=path``, Ollama."""

from __future__ import annotations

import re


def safe_name(text: str, fallback: str = "model") -> str:
    """``"SmolLM2-135M-Instruct-my run"`` -> ``"SmolLM2-135M-Instruct-my-run"``.

    Letters, digits, ``.``, ``_`` and ``-`` only, starting and ending with a letter or digit: a leading ``-``
    reads as an option to vLLM's argument parser, and spaces, ``=`` or ``,`` break its ``--lora-modules``.
    """
    name = re.sub(r"[^\w.-]+", "-", text)
    name = re.sub(r"-{2,}", "-", name).strip("-._")
    return name or fallback
