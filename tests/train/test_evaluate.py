"""`grpoctl eval`'s completion budget: what the run trained with, kept short without a GPU and said so."""

from __future__ import annotations

import json

import pytest

from grpoctl.errors import UsageError
from grpoctl.rundir import RunDir
from grpoctl.train.evaluate import CPU_MAX_NEW_TOKENS, completion_budget, format_examples


@pytest.fixture
def run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {"trainer": {"max_completion_length": 904}}}))
    return RunDir(tmp_path)


def test_eval_caps_a_long_training_budget_without_a_gpu_and_says_how_to_lift_it(run):
    tokens, note = completion_budget(run, None, cuda=False)
    assert tokens == CPU_MAX_NEW_TOKENS < 904
    assert "904 tokens" in note and "--max-new-tokens 904" in note


def test_eval_keeps_the_training_budget_on_a_gpu_or_when_short_or_asked(run, tmp_path):
    assert completion_budget(run, None, cuda=True) == (904, None)
    assert completion_budget(run, 904, cuda=False) == (904, None)
    short = tmp_path / "short"
    short.mkdir()
    (short / "run.json").write_text(json.dumps({"config": {"trainer": {"max_completion_length": 32}}}))
    assert completion_budget(RunDir(short), None, cuda=False) == (32, None)
    with pytest.raises(UsageError):
        completion_budget(run, 0, cuda=False)


def test_eval_prints_the_sample_answers_it_keeps_with_and_without_the_lora():
    examples = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "with_lora": f"<think>x</think>{i + 1}",
                 "without_lora": "line one\nline two" if i == 0 else "no idea"} for i in range(5)]
    text = format_examples({"examples": examples})
    assert text.splitlines()[0] == "5 sample answers (eval.json has them whole)"
    for i in range(5):
        assert f"[{i + 1}] question:     What is {i} + 1?" in text and f"with LoRA:    <think>x</think>{i + 1}" in text
    assert "without LoRA: line one\n                  line two" in text  # later lines stay under the first
    long = format_examples({"examples": [{**examples[0], "with_lora": "a" * 1000}]}, limit=50)
    assert "a" * 50 + " …" in long and "a" * 51 not in long
    assert format_examples({"examples": []}) == ""
