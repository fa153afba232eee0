"""Task parity: held-out answers of the reference and of each GGUF, scored with the run's own rewards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grpoctl.artifacts import Artifacts
from grpoctl.config import DataConfig, RewardsConfig
from grpoctl.export import gguf as gg
from grpoctl.export.parity.measure import measure
from grpoctl.export.parity.reference import prepare_reference
from grpoctl.export.parity.scoring import DEFAULT_FLOORS
from grpoctl.export.pipeline import ExportOptions, export
from grpoctl.export.taskparity import TaskParity, TaskRequest, TaskSet, bootstrap_interval, compare
from grpoctl.rundir import RunDir
from grpoctl.train.data import hold_out, load_source, map_rows, write_held_out
from tests.conftest import make_run

SYSTEM = "You are a careful math tutor."
PROMPTS, TOKENS = 4, 24  # a few prompts, short answers: the test's task parity takes seconds


def _task(n: int) -> TaskSet:
    def const(completions, **kwargs):
        return [1.0] * len(completions)

    return TaskSet(prompts=[[{"role": "user", "content": str(i)}] for i in range(n)], columns={}, source="t",
                   funcs=[const], weights=[1.0], max_new_tokens=8)


def test_bootstrap_interval_of_a_constant_difference_is_that_constant_and_widens_with_spread():
    assert bootstrap_interval([-1.0] * 5) == (-1.0, -1.0)
    low, high = bootstrap_interval([-3.0, 1.0, -1.0, 2.0, -2.0])
    assert low < -0.6 < high and low < 0 < high


def test_a_drop_is_significant_only_when_the_whole_interval_is_below_zero_and_gated_only_when_asked():
    task = _task(4)
    ref = {"const": [3.0, 3.0, 3.0, 3.0]}
    worse = compare(task, ["a"] * 4, ref, ["a", "b", "b", "b"], {"const": [1.0, 2.0, 1.5, 2.5]}, gate=True)
    assert worse["significant_drop"] and not worse["passed"] and worse["agreement"] == 0.25
    assert worse["difference"]["high"] < 0
    mixed = compare(task, ["a"] * 4, ref, ["a"] * 4, {"const": [1.0, 5.0, 2.0, 4.0]}, gate=True)
    assert not mixed["significant_drop"] and mixed["passed"]
    ungated = compare(task, ["a"] * 4, ref, ["b"] * 4, {"const": [0.0] * 4}, gate=False)
    assert ungated["significant_drop"] and ungated["passed"]


@pytest.fixture(scope="module")
def smol_run(smollm2_dir, tmp_path_factory) -> Path:
    """A run on the embedded SmolLM2 as the demo leaves it: a lightly trained adapter, the five rewards of the
    recipe plus a plugin, the prompts it held out of training, and a short completion length."""
    root = make_run(tmp_path_factory.mktemp("smol-task") / "run", smollm2_dir, {"r": 8, "alpha": 16, "std": 0.002})
    meta = json.loads((root / "run.json").read_text())
    meta["config"]["trainer"] = {"max_completion_length": TOKENS}
    meta["config"]["rewards"] = {"functions": [*RewardsConfig().functions, "tests.plugins:completion_length"]}
    (root / "run.json").write_text(json.dumps(meta))
    _, held = hold_out(map_rows(load_source(None), DataConfig(system_prompt=SYSTEM)), 16)
    write_held_out(held, root / "held_out.jsonl")
    return root


@pytest.fixture(scope="module")
def smol_export(smol_run, tmp_path_factory) -> tuple[Artifacts, list[str]]:
    lines: list[str] = []
    manifest = export(smol_run, ExportOptions(gguf="f16", output_dir=tmp_path_factory.mktemp("smol-export") / "e",
                                              progress=False, task_prompts=PROMPTS, task_gate=True), log=lines.append)
    return manifest, lines


def test_task_parity_on_the_demo_like_smollm2_run_lands_in_parity_json_artifacts_and_card(smol_export):
    from grpoctl.push.modelcard import _parity_notes, _parity_text

    manifest, lines = smol_export
    section = manifest.parity.task
    assert section.prompts == PROMPTS and "held out of training" in section.source and section.gate
    assert section.max_new_tokens == TOKENS  # the run's completion length
    assert set(section.reference.rewards) == {"format_exact", "format_approx", "answer", "numbers", "language",
                                              "completion_length"}  # the recipe's five and the plugin
    [(name, rec)] = manifest.parity.files.items()
    task = rec.task
    assert task is not None and task.passed and not task.significant_drop and rec.passed
    assert task.difference.low <= task.difference.mean <= task.difference.high
    assert 0.0 <= task.agreement <= 1.0 and set(task.rewards) == set(section.reference.rewards)
    rep = json.loads((manifest.root / "gguf" / "parity.json").read_text())
    assert rep["task"]["reference"]["mean_reward"] == section.reference.mean_reward
    assert rep["files"][name]["task"]["agreement"] == task.agreement
    assert any(line.startswith("task parity") for line in "\n".join(lines).splitlines())
    assert "task reward" in _parity_text(rec)

    class Ctx:
        artifacts = Artifacts.load(manifest.root)

    assert any(f"task parity: {PROMPTS} prompts" in line for line in _parity_notes(Ctx))


def test_wrong_end_of_generation_id_passes_the_kl_gate_and_fails_the_task_gate(smol_run, smol_export, smollm2_dir,
                                                                               tmp_path):
    """The file's EOS id points at a token every reference answer holds: teacher-forced on the reference's token
    ids nothing changes (the KL gate and its tokenizer checks pass, as llama.cpp still knows <|im_end|> ends a
    turn), but every answer stops early and the run's rewards (the length plugin among them) drop on every
    prompt."""
    from transformers import AutoTokenizer

    from tests.export.test_parity_gate import _set_scalar

    manifest, _ = smol_export
    [good] = [manifest.root / e.path for e in manifest.by_kind("gguf:f16")]
    adapter = smol_run / "adapter"
    tasks = TaskParity.prepare(TaskRequest(prompts=PROMPTS, gate=True), RunDir(smol_run), adapter, streamed=False,
                               device="cpu")
    ref = prepare_reference(smollm2_dir, adapter, adapter, SYSTEM, gg.end_of_turn_ids(adapter),
                            work=tasks.reference_work())
    tok = AutoTokenizer.from_pretrained(adapter)
    common = set.intersection(*(set(tok(a, add_special_tokens=False)["input_ids"]) for a in tasks.ref_answers))
    assert common, tasks.ref_answers
    broken = tmp_path / "broken-eos.gguf"
    shutil.copy(good, broken)
    _set_scalar(broken, "tokenizer.ggml.eos_token_id", min(common))

    files = {"broken": measure(broken, "f16", ref, DEFAULT_FLOORS["f16"])}
    assert files["broken"].passed and files["broken"].tokenizer["ok"]  # the KL gate passes it
    tasks.measure(files, {"broken": broken}, lambda _line: None)
    bad = files["broken"].task
    assert bad.significant_drop and not bad.passed and not files["broken"].passed
    assert bad.difference.high < 0 and bad.agreement < 1
    assert "task parity: mean reward" in gg._why(files["broken"])


def test_a_run_without_held_out_prompts_skips_task_parity_and_says_how_to_give_some(qwen3_run, tmp_path):
    tasks = TaskParity.prepare(TaskRequest(), RunDir(qwen3_run), qwen3_run / "adapter", streamed=False, device="cpu")
    assert tasks.task is None and "--eval-data" in tasks.section().skipped
    assert TaskParity.prepare(TaskRequest(prompts=0), RunDir(qwen3_run), qwen3_run / "adapter", streamed=False,
                              device="cpu") is None
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    given = TaskParity.prepare(TaskRequest(eval_data=held, prompts=2), RunDir(qwen3_run), qwen3_run / "adapter",
                               streamed=False, device="cpu")
    assert len(given.task.prompts) == 2 and given.task.columns["answer"] == ["1", "2"]
    assert given.task.prompts[0][0] == {"role": "system", "content": SYSTEM}  # the run's column mapping and prompt
