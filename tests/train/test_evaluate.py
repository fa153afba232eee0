"""`grpoctl eval`'s completion budget: what the run trained with, kept short without a GPU and said so."""

from __future__ import annotations

import json

import pytest

from grpoctl.errors import UsageError
from grpoctl.rundir import RunDir
from grpoctl.train.evaluate import CPU_MAX_NEW_TOKENS, completion_budget


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
