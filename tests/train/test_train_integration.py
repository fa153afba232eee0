"""End-to-end GRPO training on CPU with real models: the tiny Qwen3 fixture and the embedded SmolLM2.

Tiny completions (8-16 tokens) and 2 generations keep each run to seconds; the behaviour checked is the
real one (TRL's GRPOTrainer, PEFT LoRA, the run directory contract, resume, Ctrl-C, SwanLab offline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from grpoctl.config import DEFAULT_REWARDS, load_config
from grpoctl.rundir import RunDir
from grpoctl.train.backends import pick_backend
from grpoctl.train.resume import resumed_config_base
from grpoctl.train.run import train

pytestmark = pytest.mark.integration

FAST = ["trainer.num_generations=2", "trainer.max_completion_length=8", "trainer.save_steps=100"]


def _cfg(model: Path | None, out: Path, steps: int, *extra: str, **flags):
    overrides = [*FAST, f"trainer.max_steps={steps}", *extra]
    top = {"output_dir": str(out), **flags}
    if model is not None:
        top["model"] = {"name": str(model)}
    return load_config(overrides=overrides, flags=top)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora_b_abs_max(adapter: Path) -> float:
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return max(f.get_tensor(k).abs().max().item() for k in f.keys() if "lora_B" in k)


@pytest.fixture(scope="module")
def qwen3_run(tiny_qwen3, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3run")
    record = root / "calls.jsonl"
    os.environ["GRPOCTL_RECORD"] = str(record)
    rewards = [*DEFAULT_REWARDS, "tests.train.recording:record"]
    cfg = _cfg(tiny_qwen3, root / "run", 2, f"rewards.functions={json.dumps(rewards)}",
               "trainer.learning_rate=1e-3")
    run = train(cfg)
    return run, record


def test_tiny_qwen3_run_directory_contract(qwen3_run, tiny_qwen3):
    run, _ = qwen3_run
    meta = json.loads((run.root / "run.json").read_text())
    assert meta["backend"] == pick_backend("auto") and meta["grpoctl_version"]  # trl on CPU, unsloth on a GPU
    assert meta["base_model"] == {"id": str(tiny_qwen3.resolve()), "path": str(tiny_qwen3.resolve()),
                                  "revision": None}
    assert meta["reasoning"]["start"] == "<think>" and meta["reasoning"]["source"] == "tokenizer"
    # generation as resolved here (auto: vLLM on a GPU with vLLM, else transformers), and why
    gen = meta["generation"]
    assert gen["engine"] == meta["config"]["trainer"]["generation"] and gen["reason"]
    assert "trainer.generation" in meta["derived"]
    cfg = meta["config"]
    assert cfg["model"]["max_seq_length"] == 1024
    assert {"r", "alpha", "dropout", "target_modules"} <= set(cfg["lora"])
    assert {"temperature", "top_p", "min_p", "max_steps"} <= set(cfg["trainer"])
    assert "Indonesian" in cfg["data"]["system_prompt"] and "tracking" in cfg
    assert run.sampling == {"temperature": 1.0, "top_p": 1.0, "min_p": 0.1, "top_k": None} or \
        run.sampling["min_p"] == 0.1
    adapter = run.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_qwen3.resolve())
    assert acfg["r"] == 32 and acfg["lora_alpha"] == 64
    assert sorted(acfg["target_modules"]) == sorted(cfg["lora"]["target_modules"])
    assert (adapter / "chat_template.jinja").is_file() and (adapter / "tokenizer.json").is_file()
    assert _lora_b_abs_max(adapter) > 0  # B starts at zero: non-zero means the adapter trained
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"reward", "kl", "completion_length"} <= set(m)
        assert set(m["rewards"]) == {*DEFAULT_REWARDS, "record"}
    summary = run.summary()
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps"
    assert (run.checkpoints_dir / "checkpoint-2").is_dir()


def test_every_reward_gets_trl_arguments(qwen3_run):
    _, record = qwen3_run
    calls = _records(record)
    assert [c["step"] for c in calls] == [0, 1]  # once per step, before the optimizer step
    for c in calls:
        assert c["n"] == 2  # num_generations completions of one prompt
        assert c["prompt_roles"] == [["system", "user"]] * 2
        assert c["completion_roles"] == [["assistant"]] * 2
        assert all(0 < n <= 8 for n in c["completion_ids_lens"])
        assert all(a.lstrip("-").isdigit() for a in c["answers"]) and len(set(c["answers"])) == 1
        assert {"solution", "trainer_state"} <= set(c["kwargs"])


def test_tiny_run_with_varying_rewards_trains_without_a_stall_warning(qwen3_run):
    run, _ = qwen3_run
    summary = run.summary()
    assert summary["adapter_trained"] is True and len(summary["steps_without_reward_variance"]) < summary["steps"]


def test_resume_refuses_a_target_the_run_already_reached(qwen3_run):
    """`--resume --max-steps 1` on a run at step 2 would train a step "3/1" and change the adapter."""
    from grpoctl.errors import UsageError

    run, _ = qwen3_run
    step = int(run.summary()["steps"])
    before = (run.adapter_dir / "adapter_model.safetensors").read_bytes()
    for target in (1, step):
        cfg = load_config(overrides=[f"trainer.max_steps={target}"], base=resumed_config_base(run.root),
                          flags={"output_dir": str(run.root), "resume": True})
        with pytest.raises(UsageError, match=rf"already at step {step} \(checkpoint-{step}\), which reaches "
                                             rf"max_steps {target}: nothing to train"):
            train(cfg)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_resume_continues_from_the_newest_checkpoint(qwen3_run, capsys):
    run, record = qwen3_run
    before = (run.adapter_dir / "adapter_model.safetensors").read_bytes()
    cfg = load_config(overrides=["trainer.max_steps=3"], base=resumed_config_base(run.root),
                      flags={"output_dir": str(run.root), "resume": True})
    resumed = train(cfg)
    # the 2-step linear schedule had decayed to 0; the resumed step trains at the 3-step schedule's rate
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() != before
    ckpt = run.root / "checkpoints" / "checkpoint-2"
    assert f"grpoctl: resuming from {ckpt} (step 2 of 3)" in capsys.readouterr().out
    summary = resumed.summary()
    assert summary["steps"] == 3 and summary["steps_this_session"] == 1
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert [m["step"] for m in resumed.metrics()] == [1, 2, 3]
    assert _records(record)[-1]["step"] == 2
    assert (resumed.checkpoints_dir / "checkpoint-3").is_dir()


def test_existing_run_offers_resume_and_force(qwen3_run, tiny_qwen3):
    from grpoctl.errors import OutputExistsError

    run, _ = qwen3_run
    with pytest.raises(OutputExistsError, match=r"already holds a training run \(at step \d+\); continue it with "
                                                r"--resume .*or pass --force to delete it"):
        train(_cfg(tiny_qwen3, run.root, 1))


def test_rewards_that_never_vary_warn_during_training_and_in_the_summary(tiny_qwen3, tmp_path, capsys):
    """Every completion scores the same: zero advantages, zero gradient, lora_B stays zero. The run says so
    while it trains and at the end instead of looking finished."""
    out = tmp_path / "run"
    run = train(_cfg(tiny_qwen3, out, 2, 'rewards.functions=["tests.train.recording:constant"]'))
    shown = capsys.readouterr()
    during = [line for line in shown.out.splitlines() if "steps in a row no prompt's completions got different" in line]
    assert len(during) == 1 and "grad_norm 0" in during[0] and "constant=1.00" in during[0]
    verdict = [line for line in shown.out.splitlines() if "the adapter was never trained" in line]
    assert len(verdict) == 1 and "Likely causes" in verdict[0] and "export` will refuse" in verdict[0]
    summary = run.summary()
    assert summary["adapter_trained"] is False and summary["steps_without_reward_variance"] == [1, 2]
    assert _lora_b_abs_max(run.adapter_dir) == 0  # what the warning claims
    assert "step 1/2 generating" in shown.err  # a bar inside the first step, before it ends


def test_ctrl_c_leaves_a_resumable_checkpoint_and_adapter(tiny_qwen3, tmp_path, capsys):
    out = tmp_path / "run"
    rewards = '["numbers", "tests.train.recording:interrupt_after_first_step"]'
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_qwen3, out, 3, f"rewards.functions={rewards}"))
    assert "interrupted during step 2: saving checkpoint-1 and the adapter as of step 1" in capsys.readouterr().out
    run = RunDir(out)
    assert run.summary()["stop_reason"] == "interrupted" and run.summary()["steps"] == 1
    assert (run.checkpoints_dir / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()

    # Ctrl-C again before the resumed step finishes: nothing new was trained, so nothing changes
    kept = {name: (out / name).read_bytes()
            for name in ("run.json", "summary.json", "adapter/adapter_model.safetensors")}
    cfg = load_config(overrides=['rewards.functions=["tests.train.recording:interrupt_in_first_step"]'],
                      base=resumed_config_base(run.root), flags={"output_dir": str(out), "resume": True})
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert "interrupted during step 2, before it finished: the run is unchanged (still at step 1, checkpoint-1" \
        in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in kept} == kept

    cfg = load_config(overrides=['rewards.functions=["numbers"]'], base=resumed_config_base(run.root),
                      flags={"output_dir": str(out), "resume": True})
    assert train(cfg).summary()["steps"] == 3


def test_ctrl_c_during_the_first_step_writes_nothing_and_says_so(tiny_qwen3, tmp_path, capsys):
    """Nothing finished, so there is no checkpoint to save and the LoRA is still all zero: no run is left that
    looks usable (an all-zero adapter after a message about saving a checkpoint would be)."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_qwen3, out, 3, 'rewards.functions=["tests.train.recording:interrupt_in_first_step"]'))
    shown = capsys.readouterr().out
    assert "interrupted during step 1, before any step finished: nothing was trained, so no checkpoint or adapter " \
           "was written" in shown
    assert "saving" not in shown and not out.exists()


def test_swanlab_offline_tracking_writes_files(tiny_qwen3, tmp_path):
    from grpoctl.train.tracking import swanlab_import_problem

    if problem := swanlab_import_problem():
        pytest.skip(f"SwanLab cannot run here: {problem}")
    out = tmp_path / "run"
    run = train(_cfg(tiny_qwen3, out, 1, "tracking.mode=offline", "tracking.project=grpoctl-test"))
    written = [p for p in (run.root / "swanlog").rglob("*") if p.is_file()]
    assert written, "swanlab offline mode wrote nothing"
    assert run.summary()["steps"] == 1


def test_eval_compares_with_and_without_lora(qwen3_run, capsys):
    from grpoctl.train.evaluate import evaluate, format_table

    run, _ = qwen3_run
    result = evaluate(run, samples=3, max_new_tokens=8)
    bars = capsys.readouterr().err
    assert "eval 1/2 with LoRA" in bars and "eval 2/2 without LoRA" in bars  # the two passes, labelled
    saved = json.loads((run.root / "eval.json").read_text())
    assert saved["samples"] == 3
    for side in ("with_lora", "without_lora"):
        assert 0 <= saved[side]["target_language_share"] <= 1 and 0 <= saved[side]["accuracy"] <= 1
        assert {*DEFAULT_REWARDS, "record"} == set(saved[side]["rewards"])
    assert "with LoRA" in format_table(result)


def test_embedded_smollm2_trains(tmp_path, smollm2_dir):
    run = train(_cfg(None, tmp_path / "run", 2, "trainer.learning_rate=1e-3"))
    assert run.record.base_model.id == "embedded:SmolLM2-135M-Instruct"
    assert run.record.reasoning.source == "config"  # SmolLM2 has no reasoning tokens
    assert [m["step"] for m in run.metrics()] == [1, 2]
    assert _lora_b_abs_max(run.adapter_dir) > 0
    acfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert Path(acfg["base_model_name_or_path"]).is_dir()
