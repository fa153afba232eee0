"""How the export pipeline calls the GGUF stage, checked with a stand-in module.

The real converter lives in ``grpoctl.export.gguf`` and has its own tests; here a stand-in with the
same entry point records what the pipeline passes, so these tests hold with or without it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from grpoctl.errors import UsageError
from grpoctl.export.pipeline import ExportOptions, export
from grpoctl.fsutil import sha256_file


@pytest.fixture
def gguf_stand_in(monkeypatch):
    calls: list[dict] = []
    module = types.ModuleType("grpoctl.export.gguf")

    def export_gguf(model_dir, adapter_dir, out_dir, types_, *, name, artifacts, merged_dir=None,
                    llama_cpp_dir=None, parity_gate=True, system_prompt=None, imatrix=None, refused_report=None,
                    task=None, run=None, recipe=None, floors=None, parity_device=None, parity_reference=None,
                    pre_tokenizer=None, parity_cache=None, say=print):
        calls.append(dict(model_dir=model_dir, adapter_dir=adapter_dir, out_dir=out_dir, types=types_, name=name,
                          merged_dir=merged_dir, parity_gate=parity_gate, system_prompt=system_prompt, imatrix=imatrix,
                          refused_report=refused_report, task=task, run=run, recipe=recipe, floors=floors,
                          parity_device=parity_device, parity_reference=parity_reference, pre_tokenizer=pre_tokenizer,
                          parity_cache=parity_cache,
                          adapter_sha256=sha256_file(Path(adapter_dir) / "adapter_model.safetensors"),
                          merged_exists=merged_dir is not None and (Path(merged_dir) / "config.json").is_file()))
        out_dir.mkdir(parents=True)
        f = out_dir / f"{name}-{types_[0].upper()}.gguf"
        f.write_bytes(b"GGUF")
        artifacts.add_file(f, f"gguf:{types_[0]}")
        return [f]

    module.export_gguf = export_gguf
    monkeypatch.setitem(sys.modules, "grpoctl.export.gguf", module)
    return calls


def test_unknown_gguf_type_fails_before_any_work(gguf_stand_in, qwen3_run, tmp_path):
    with pytest.raises(UsageError, match="unknown GGUF type 'q3_x'"):
        export(qwen3_run, ExportOptions(gguf=["q8_0,q3_x"], output_dir=tmp_path / "export", progress=False))
    assert gguf_stand_in == [] and not (tmp_path / "export").exists()


def test_gguf_only_export_uses_the_fused_path_and_lands_in_the_manifest(gguf_stand_in, qwen3_run, tmp_path):
    manifest = export(qwen3_run, ExportOptions(gguf=["Q8_0"], output_dir=tmp_path / "export", progress=False,
                                               parity_gate=False))
    (call,) = gguf_stand_in
    assert call["types"] == ["q8_0"] and call["merged_dir"] is None and call["parity_gate"] is False
    assert call["out_dir"].name == "gguf" and call["system_prompt"] == "You are a careful math tutor."
    # export reads its own copy of the adapter (training may replace the run's at any moment): the same bytes
    assert call["adapter_dir"] != qwen3_run / "adapter"
    assert call["adapter_sha256"] == sha256_file(qwen3_run / "adapter" / "adapter_model.safetensors")
    assert [f.kind for f in manifest.by_kind("gguf")] == ["gguf:q8_0"]
    assert not (manifest.root / "merged").exists()
    # a refusal's report goes beside the export, out of the staged folder the refusal removes
    assert call["refused_report"] == tmp_path / "export.refused-parity.json"
    assert call["run"].root == qwen3_run and call["task"].gate is False and call["task"].eval_data is None


def test_task_parity_options_reach_the_gguf_stage(gguf_stand_in, qwen3_run, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text('{"question": "What is 2 + 2?", "answer": "#### 4"}\n')
    export(qwen3_run, ExportOptions(gguf="q8_0", output_dir=tmp_path / "export", progress=False, eval_data=held,
                                    task_prompts=3, task_gate=True))
    (call,) = gguf_stand_in
    assert (call["task"].eval_data, call["task"].prompts, call["task"].gate) == (held, 3, True)


def test_task_parity_options_without_gguf_or_with_a_missing_file_fail_before_any_work(gguf_stand_in, qwen3_run,
                                                                                     tmp_path):
    from grpoctl.errors import InputNotFoundError

    with pytest.raises(UsageError, match="add --gguf"):
        export(qwen3_run, ExportOptions(lora=True, task_gate=True, output_dir=tmp_path / "e1", progress=False))
    with pytest.raises(InputNotFoundError, match="--eval-data"):
        export(qwen3_run, ExportOptions(gguf="q8_0", eval_data=tmp_path / "nope.jsonl", output_dir=tmp_path / "e2",
                                        progress=False))
    with pytest.raises(UsageError, match="--task-gate needs"):
        export(qwen3_run, ExportOptions(gguf="q8_0", task_prompts=0, task_gate=True, output_dir=tmp_path / "e3",
                                        progress=False))
    assert not gguf_stand_in


def test_gguf_with_merged_16bit_reuses_the_merged_folder(gguf_stand_in, qwen3_run, tmp_path):
    export(qwen3_run, ExportOptions(merged="16bit", gguf=["f16"], output_dir=tmp_path / "export", progress=False))
    (call,) = gguf_stand_in
    assert call["merged_exists"] and call["merged_dir"].name == "merged"


def test_imatrix_auto_hands_the_run_to_the_gguf_stage(gguf_stand_in, qwen3_run, tmp_path, monkeypatch):
    from grpoctl.export import imatrix

    monkeypatch.setattr(imatrix, "check_request", lambda request: None)  # the tools are the GGUF stage's concern
    export(qwen3_run, ExportOptions(gguf=["q4_k_m"], imatrix="auto", output_dir=tmp_path / "export", progress=False))
    (call,) = gguf_stand_in
    request = call["imatrix"]
    assert request.matrix is None and request.calibration is None and request.run.root == qwen3_run
    assert gguf_stand_in[0]["types"] == ["q4_k_m"]
    assert call["recipe"] is None


def test_quant_recipe_search_hands_a_recipe_request_to_the_gguf_stage(gguf_stand_in, qwen3_run, tmp_path,
                                                                      monkeypatch):
    from grpoctl.export import imatrix
    from grpoctl.export.recipe import RecipeRequest

    monkeypatch.setattr(imatrix, "check_request", lambda request: None)
    export(qwen3_run, ExportOptions(gguf=["q4_k_m"], imatrix="auto", quant_recipe="search",
                                    output_dir=tmp_path / "export", progress=False))
    (call,) = gguf_stand_in
    assert call["recipe"] == RecipeRequest(method="search") and call["imatrix"] is not None


def test_parity_and_conversion_options_reach_the_gguf_stage(gguf_stand_in, qwen3_run, tmp_path):
    export(qwen3_run, ExportOptions(gguf="q8_0", output_dir=tmp_path / "e1", progress=False))
    [call] = gguf_stand_in
    assert [call[k] for k in ("floors", "parity_device", "parity_reference", "pre_tokenizer", "parity_cache")] == \
        [None] * 5  # not given: the stage reads the environment variables, else its defaults
    export(qwen3_run, ExportOptions(gguf="q8_0", output_dir=tmp_path / "e2", progress=False, parity_device="cpu",
                                    parity_reference="stream", pre_tokenizer="qwen2", parity_cache=False,
                                    parity_floors="q8_0=0.5:0.5"))
    call = gguf_stand_in[1]
    assert (call["parity_device"], call["parity_reference"], call["pre_tokenizer"], call["parity_cache"]) == \
        ("cpu", "stream", "qwen2", False)
    assert (call["floors"]["q8_0"].top1, call["floors"]["q8_0"].kl) == (0.5, 0.5)
    with pytest.raises(UsageError, match="--parity-reference"):
        export(qwen3_run, ExportOptions(gguf="q8_0", output_dir=tmp_path / "e3", parity_reference="auto"))
