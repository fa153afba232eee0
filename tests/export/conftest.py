"""Export fixtures: trained-looking adapters on the tiny models, and run directories around them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.adapters import VARIANTS, make_adapter, peft_merged_folder
from tests.tinymodels import build_tiny_model


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
