"""Which GGUF serve picks from a run, an export directory or a path, and the context it serves with."""

from __future__ import annotations

import pytest

from grpoctl.errors import InputNotFoundError, UsageError
from grpoctl.serve.api import context_size
from grpoctl.serve.common import default_model_name
from grpoctl.serve.gguf_info import read_gguf_info
from grpoctl.serve.source import resolve_target
from tests.serve.exports import MAX_SEQ_LENGTH, SYSTEM_PROMPT, make_export, write_run


@pytest.fixture
def multi_quant_run(tmp_path, smol_gguf):
    run = write_run(tmp_path / "run")
    make_export(run / "export", {"q4_1": smol_gguf, "q8_0": smol_gguf})
    return run


def test_run_dir_resolves_to_its_export_and_training_context(smol_run):
    t = resolve_target(smol_run)
    assert t.gguf == smol_run / "export" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
    assert t.quant == "q4_1"
    assert t.system_prompt == SYSTEM_PROMPT
    assert t.max_seq_length == MAX_SEQ_LENGTH
    assert t.reasoning_markers == ("<think>", "</think>")


def test_export_dir_finds_its_run_as_parent(smol_export, smol_run):
    t = resolve_target(smol_export, "Q4_1")
    assert t.run is not None and t.run.root == smol_run


def test_gguf_path_inside_an_export_keeps_the_run_context(smol_export):
    t = resolve_target(smol_export / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf")
    assert t.system_prompt == SYSTEM_PROMPT
    assert t.manifest_sha256 is not None


def test_bare_gguf_has_no_run(smol_gguf):
    t = resolve_target(smol_gguf)
    assert t.gguf == smol_gguf and t.run is None and t.system_prompt is None


def test_quant_not_exported_names_the_ones_that_exist(multi_quant_run):
    with pytest.raises(InputNotFoundError, match=r"q4_k_m was not exported.*exported: q4_1, q8_0"):
        resolve_target(multi_quant_run, "q4_k_m")


def test_of_several_quants_the_default_type_is_served_as_the_plain_modelfile_uses_it(multi_quant_run):
    assert resolve_target(multi_quant_run).quant == "q8_0"  # grpoctl.gguftypes.PREFERRED: q8_0 before q4_1
    assert resolve_target(multi_quant_run, "q4_1").gguf.name == "SmolLM2-135M-Instruct-Q4_1.gguf"


def test_quant_takes_the_spellings_export_takes(tmp_path, smol_gguf):
    run = write_run(tmp_path / "run")
    make_export(run / "export", {"q4_k_m": smol_gguf, "q8_0": smol_gguf})
    assert resolve_target(run, "q4_k").quant == "q4_k_m"
    assert resolve_target(run, "Q8").gguf.name == "SmolLM2-135M-Instruct-Q8_0.gguf"
    assert resolve_target(run).quant == "q4_k_m"


def test_run_without_export_says_how_to_make_one(tmp_path):
    run = write_run(tmp_path / "bare-run")
    with pytest.raises(InputNotFoundError, match="has no export yet; run `grpoctl export"):
        resolve_target(run)


def test_manifest_entry_whose_file_is_gone(tmp_path, smol_gguf):
    run = write_run(tmp_path / "run")
    make_export(run / "export", {"q4_1": smol_gguf})
    (run / "export" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf").unlink()
    with pytest.raises(InputNotFoundError, match="missing on disk"):
        resolve_target(run)


@pytest.mark.parametrize("name", ["nowhere", "notes.txt", "plain-dir"])
def test_sources_that_are_not_servable(tmp_path, name):
    if name == "notes.txt":
        (tmp_path / name).write_text("hi")
    if name == "plain-dir":
        (tmp_path / name).mkdir()
    with pytest.raises((InputNotFoundError, UsageError)):
        resolve_target(tmp_path / name)


def test_context_size_prefers_flag_then_run_then_capped_gguf(smol_run, smol_gguf):
    info = read_gguf_info(smol_gguf)
    assert info.context_length == 8192
    assert context_size(resolve_target(smol_run), info, 512) == 512
    assert context_size(resolve_target(smol_run), info, None) == MAX_SEQ_LENGTH
    assert context_size(resolve_target(smol_gguf), info, None) == 4096


@pytest.mark.parametrize(("stem", "quant", "expected"), [
    ("SmolLM2-135M-Instruct-Q4_K_M", "q4_k_m", "smollm2-135m-instruct:q4_k_m"),
    ("My Model (v2)-Q8_0", "q8_0", "my-model-v2:q8_0"),
    ("SmolLM2-135M-Instruct.Q4_1", None, "smollm2-135m-instruct.q4_1"),
])
def test_default_model_names_are_valid_ollama_names(stem, quant, expected):
    from grpoctl.serve.ollama import check_model_name

    assert default_model_name(stem, quant) == expected
    check_model_name(expected)
