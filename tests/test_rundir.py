"""run.json is one typed record (``grpoctl.rundir.RunRecord``): what ``train`` writes reads back the same, a run
written before a key existed still reads, a key this grpoctl does not know is skipped at every level, and a value of
the wrong type is one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpoctl.errors import DataError
from grpoctl.rundir import (
    BaseModelRecord,
    ChatTemplateRecord,
    DataStats,
    GenerationRecord,
    ReasoningRecord,
    RunDir,
    RunRecord,
    checkpoint_dir,
    checkpoint_step,
    newest_checkpoint,
)

# run.json as grpoctl wrote it before the generation, held-out and derived keys existed
OLDER = {
    "grpoctl_version": "0.0.9",
    "backend": "trl",
    "base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "path": "/models/smol", "revision": None},
    "config": {"model": {"max_seq_length": 512}, "lora": {"r": 8}, "data": {"system_prompt": "Be brief."},
               "trainer": {"temperature": 0.7, "top_p": 0.9}, "rewards": {"functions": ["numbers"]}},
    "chat_template": {"source": "tokenizer", "file": None, "sha256": None},
    "reasoning": {"start": "<think>", "end": "</think>", "source": "tokenizer"},
    "data_stats": {"rows_total": 10, "rows_kept": 9, "length_cutoff": 40},
    "reward_weights": {"numbers": 1.0},
    "libraries": {"torch": "2.4.0"},
    "python": "3.11.7",
}


def _run(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps(meta))
    return root


def test_a_run_written_before_the_newer_keys_still_reads(tmp_path):
    run = RunDir(_run(tmp_path / "run", OLDER))
    assert run.record.generation is None and run.record.derived == []
    assert run.record.data_stats == DataStats(rows_total=10, rows_kept=9, length_cutoff=40, rows_held_out=0)
    assert run.prefilled_start is False and run.reasoning_markers == ("<think>", "</think>")
    assert run.base_model.path == "/models/smol" and run.max_seq_length == 512 and run.lora_r == 8
    assert run.sampling == {"temperature": 0.7, "top_p": 0.9} and run.system_prompt == "Be brief."


def test_a_run_json_with_only_a_config_reads_with_defaults(tmp_path):
    run = RunDir(_run(tmp_path / "run", {"config": {"trainer": {"max_completion_length": 32}}}))
    assert run.record.backend is None and run.reasoning_markers is None and run.lora_r == 32
    with pytest.raises(DataError, match="does not record the base model path"):
        _ = run.base_model


def test_keys_this_grpoctl_does_not_know_are_skipped_at_every_level(tmp_path):
    newer = {**OLDER, "written_on": "a newer grpoctl", "reasoning": {**OLDER["reasoning"], "style": "tags"},
             "base_model": {**OLDER["base_model"], "sha": "abc"}}
    record = RunDir(_run(tmp_path / "run", newer)).record
    assert record == RunDir(_run(tmp_path / "old", OLDER)).record
    assert "written_on" not in record.text() and "style" not in record.text()


def test_what_train_writes_reads_back_the_same_with_absent_values_as_null(tmp_path):
    record = RunRecord(grpoctl_version="1.0", backend="trl",
                       generation=GenerationRecord(engine="hf", vllm_mode=None, reason="no GPU"),
                       base_model=BaseModelRecord(id="org/base", path="/b", revision=None),
                       config={"lora": {"r": 4}}, chat_template=ChatTemplateRecord(),
                       reasoning=ReasoningRecord(start="<a>", end="</a>", source="config", prefilled_start=True),
                       derived=["trainer.optim"], data_stats=DataStats(3, 2, 10, 1), reward_weights={"numbers": 0.5},
                       libraries={"trl": "0.20"}, python="3.11.7")
    record.save(tmp_path / "run.json")
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["base_model"] == {"id": "org/base", "path": "/b", "revision": None}
    assert stored["generation"]["vllm_mode"] is None
    assert list(stored)[:3] == ["grpoctl_version", "backend", "generation"]
    assert RunDir(tmp_path).record == record and RunDir(tmp_path).prefilled_start


@pytest.mark.parametrize("change, says", [
    ({"reasoning": {"start": 3}}, '"reasoning.start" should be a string, not 3'),
    ({"derived": "trainer.optim"}, '"derived" should be a list, not "trainer.optim"'),
    ({"data_stats": {"rows_kept": "9"}}, '"data_stats.rows_kept" should be an integer, not "9"'),
    ({"config": []}, '"config" should be an object, not []'),
])
def test_a_value_of_the_wrong_type_is_one_error_naming_the_key(tmp_path, change, says):
    with pytest.raises(DataError, match=says.replace("[", r"\[").replace("]", r"\]")):
        RunDir(_run(tmp_path / "run", {**OLDER, **change}))


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (2, 10, 9):
        checkpoint_dir(tmp_path, step).mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a step: not a checkpoint grpoctl resumes from
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10
    assert newest_checkpoint(tmp_path / "none") is None
