"""Export fixtures: trained-looking adapters on the tiny models, and run directories around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.export.adapters import VARIANTS, make_adapter, peft_merged_folder
from tests.hubserver import FakeHub
from tests.tinymodels import build_tiny_model


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
def qwen3_adapter(tmp_path_factory, tiny_qwen3) -> Path:
    return make_adapter(tiny_qwen3, tmp_path_factory.mktemp("adapters") / "trained")


@pytest.fixture(scope="session")
def fresh_adapter(tmp_path_factory, tiny_qwen3) -> Path:
    return make_adapter(tiny_qwen3, tmp_path_factory.mktemp("adapters") / "fresh", zero_b="all")


@pytest.fixture(scope="session")
def variant_bases(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The bases ``adapters.VARIANTS`` names: the tiny models and a Llama with tied embeddings."""
    tied = build_tiny_model(tmp_path_factory.mktemp("tiny-tied") / "llama-tied", "llama", tied=True)
    return {**tiny_models, "llama-tied": tied}


@pytest.fixture(scope="session")
def variant(variant_bases, tmp_path_factory):
    """``variant(name) -> (base, adapter, peft_merged)``: each adapter of ``adapters.VARIANTS``, made once, and
    the folder PEFT's merge_and_unload + save_pretrained writes for it (the reference every output is held to)."""
    root = tmp_path_factory.mktemp("variants")
    made: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path, Path]:
        if name not in made:
            base_name, kwargs = VARIANTS[name]
            base = variant_bases[base_name]
            adapter = make_adapter(base, root / name / "adapter", **kwargs)
            made[name] = (base, adapter, peft_merged_folder(base, adapter, root / name / "peft-merged"))
        return made[name]

    return get


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
