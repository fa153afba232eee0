"""Files other stages and tools wrote, read back with the wrong shape: one line naming the file and the key,
exit 4 (bad data), before any merge or conversion; never an "internal error"."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from tests.conftest import make_run


def _invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _one_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grpoctl: ") and "internal error" not in err[0], result.stderr
    assert text in err[0], err[0]


@pytest.fixture
def run(tmp_path, qwen3_run):
    dst = tmp_path / "run"
    shutil.copytree(qwen3_run, dst)
    return dst


def _edit_json(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


@pytest.mark.parametrize("content, says", [
    ({"r": "eight"}, '"r" should be an integer, not "eight"'),
    ({"lora_alpha": [16]}, '"lora_alpha" should be an integer or a number, not [16]'),
    ({"target_modules": ["q_proj", 3]}, '"target_modules" should be a list of module names'),
    ({"rank_pattern": {"q_proj": "4"}}, '"rank_pattern.q_proj" should be an integer, not "4"'),
    ({"use_dora": "yes"}, '"use_dora" should be true or false, not "yes"'),
])
def test_wrong_typed_adapter_config(run, tmp_path, content, says):
    _edit_json(run / "adapter" / "adapter_config.json", lambda d: {**d, **content})
    _one_line(_invoke("export", run, "-o", tmp_path / "out"), 4, f"adapter_config.json: {says}")
    assert not (tmp_path / "out").exists()


def test_adapter_config_that_is_a_list(run, tmp_path):
    (run / "adapter" / "adapter_config.json").write_text("[1, 2]")
    _one_line(_invoke("export", run, "-o", tmp_path / "out"), 4,
              "adapter_config.json holds a list where an object is expected")


def test_adapter_folder_whose_config_is_not_json(qwen3_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, adapter)
    (adapter / "adapter_config.json").write_text("{r: 8")
    _one_line(_invoke("export", adapter, "-o", tmp_path / "out"), 4, "adapter_config.json is not valid JSON")


def test_base_config_that_is_not_json(tiny_qwen3, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_qwen3, base)
    run = make_run(tmp_path / "run", base)
    (base / "config.json").write_text("not json at all")
    _one_line(_invoke("export", run, "-o", tmp_path / "out"), 4, f"{base / 'config.json'} is not valid JSON")


@pytest.mark.parametrize("change, says", [
    (lambda d: [d], "run.json holds a list where an object is expected"),
    (lambda d: {**d, "config": {**d["config"], "model": {"max_seq_length": "long"}}},
     '"config.model.max_seq_length" should be an integer, not "long"'),
    (lambda d: {**d, "config": {**d["config"], "data": {"system_prompt": 7}}},
     '"config.data.system_prompt" should be a string, not 7'),
    (lambda d: {**d, "base_model": {**d["base_model"], "path": 3}}, '"base_model.path" should be a string, not 3'),
    (lambda d: {**d, "base_model": {"id": d["base_model"]["id"]}}, "run.json does not record the base model path"),
])
def test_broken_run_json(run, tmp_path, change, says):
    _edit_json(run / "run.json", change)
    _one_line(_invoke("export", run, "-o", tmp_path / "out"), 4, says)


@pytest.mark.parametrize("change, says", [
    (lambda d: {**d, "files": {"a": 1}}, '"files" should be a list, not {"a": 1}'),
    (lambda d: {**d, "files": [{"path": "x", "kind": "lora", "size": "big", "sha256": "0"}]},
     '"files[0].size" should be an integer, not "big"'),
    (lambda d: {**d, "files": [{"path": "x"}]}, "files[0] lacks kind, size, sha256"),
])
def test_broken_artifacts_json(run, tmp_path, change, says):
    out = tmp_path / "out"
    assert _invoke("export", run, "--lora", "-o", out, "-q").exit_code == 0
    _edit_json(out / "artifacts.json", change)
    _one_line(_invoke("manifests", out), 4, says)
    _one_line(_invoke("push", out, "--repo", "alice/x", "--dry-run"), 4, says)
