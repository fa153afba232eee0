"""The training callbacks' judgement, on logged metrics as TRL writes them (no model needed)."""

from __future__ import annotations

import json
from collections import deque
from types import SimpleNamespace

from grpoctl.train.callbacks import CompletionSamples, SignalWatch, TokenProgress, pick_samples, stall_causes


def _log(watch: SignalWatch, step: int, *, flat: bool, clipped: float = 1.0, max_steps: int = 10) -> None:
    logs = {"reward": -8.0, "reward_std": 0.0 if flat else 1.5, "frac_reward_zero_std": 1.0 if flat else 0.0,
            "grad_norm": 0.0 if flat else 0.3, "completions/clipped_ratio": clipped,
            "rewards/answer/mean": -2.0}
    state = SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=max_steps)
    watch.on_log(None, state, None, logs=logs)


def test_stall_causes_name_the_completion_budget_when_every_completion_was_cut():
    cut = [{"step": 1, "clipped_ratio": 1.0, "rewards": {"answer": -2.0}}]
    assert "cut at max_completion_length 32 tokens" in stall_causes(cut, 32)
    assert "cut at" not in stall_causes([{"step": 1, "clipped_ratio": 0.5, "rewards": {}}], 32)


def test_the_warning_comes_after_three_flat_steps_in_a_row_and_once():
    said: list[str] = []
    watch = SignalWatch(32, said.append)
    for step, flat in enumerate([True, True, False, True, True, True, True], 1):
        _log(watch, step, flat=flat)
    assert len(said) == 1 and "for 3 steps in a row" in said[0] and "grad_norm 0" in said[0]
    assert watch.flat_steps == [1, 2, 4, 5, 6, 7]


def test_end_of_run_verdicts():
    quiet = SignalWatch(32, lambda line: None)
    for step in range(1, 5):
        _log(quiet, step, flat=step == 2)
    assert quiet.verdict(adapter_trained=True) is None  # 1 flat step of 4: nothing to say

    mostly = SignalWatch(32, lambda line: None)
    for step in range(1, 5):
        _log(mostly, step, flat=step % 2 == 0)
    assert "on 2 of 4 steps" in mostly.verdict(adapter_trained=True)

    never = SignalWatch(32, lambda line: None)
    for step in (1, 2):
        _log(never, step, flat=True, max_steps=2)
    assert "the adapter was never trained" in never.verdict(adapter_trained=False)
    assert "Likely causes: as above" in never.verdict(adapter_trained=False)  # the warning listed them

    varied = SignalWatch(32, lambda line: None)
    _log(varied, 1, flat=False)
    text = varied.verdict(adapter_trained=False)  # rewards varied, yet lora_B is zero: not the rewards' fault
    assert "never trained" in text and "trainer.learning_rate" in text and "0 of 1 steps" in text


def test_token_progress_counts_each_call_to_its_full_budget():
    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    streamer = TokenProgress(bar, per_call=8)
    for call_tokens in (8, 3):  # the second generate stops early at EOS
        streamer.put("prompt ids")
        for _ in range(call_tokens):
            streamer.put("token")
        assert bar.n <= 8 * (1 if call_tokens == 8 else 2)
        streamer.end()
    assert bar.n == 16


def _trl_logs(rewards: list[tuple[float, float]]) -> dict:
    """GRPOTrainer._logs as TRL fills it: chat prompts/completions, per-function rewards, advantages (deques)."""
    n = len(rewards)
    return {"prompt": deque([[{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i // 2}"}]
                             for i in range(n)]),
            "completion": deque([[{"role": "assistant", "content": f"c{i}"}] for i in range(n)]),
            "rewards": {"answer": deque(a for a, _ in rewards), "language": deque(b for _, b in rewards)},
            "advantages": deque(float(i) for i in range(n))}


def test_pick_samples_spans_the_best_to_the_worst_with_the_weights_of_the_run():
    logs = _trl_logs([(0.0, 1.0), (3.0, -3.0), (1.0, 1.0), (float("nan"), 0.5)])
    # weighted totals: c0 1.0, c1 6.0 - 3.0 = 3.0, c2 2.0 + 1.0 = 3.0, c3 0.5 (a NaN function is left out)
    picked = pick_samples(logs, {"answer": 2.0}, 2)
    assert [(s["completion"], s["reward"]) for s in picked] == [("c1", 3.0), ("c3", 0.5)]
    assert picked[0]["prompt"] == "q0" and picked[0]["rewards"] == {"answer": 3.0, "language": -3.0}
    assert picked[1]["rewards"]["answer"] is None and picked[1]["advantage"] == 3.0
    assert [s["completion"] for s in pick_samples(logs, {"answer": 2.0}, 3)] == ["c1", "c0", "c3"]
    assert len(pick_samples(logs, {}, 10)) == 4 and pick_samples(logs, {}, 0) == []


def test_completion_samples_keep_at_most_the_configured_number_a_logged_step(tmp_path):
    path = tmp_path / "samples.jsonl"
    logs = _trl_logs([(float(i), 0.0) for i in range(8)])
    cb = CompletionSamples(path, 3, lambda: logs, {})
    for step in (1, 2):
        state = SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=2)
        cb.on_log(None, state, None, logs={"reward": 1.0})
        cb.on_log(None, state, None, logs={"train_runtime": 9.0})  # the end-of-training log has no reward
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(len(r["samples"]) == 3 for r in rows)
    other = SimpleNamespace(is_world_process_zero=False, global_step=3, max_steps=3)
    cb.on_log(None, other, None, logs={"reward": 1.0})  # only the main process writes
    CompletionSamples(path, 0, lambda: logs, {}).on_log(None, SimpleNamespace(is_world_process_zero=True,
                                                        global_step=4, max_steps=4), None, logs={"reward": 1.0})
    CompletionSamples(path, 2, lambda: None, {}).on_log(None, SimpleNamespace(is_world_process_zero=True,
                                                        global_step=5, max_steps=5), None, logs={"reward": 1.0})
    assert len(path.read_text().splitlines()) == 2
