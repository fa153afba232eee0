"""Bad input through the real command line: one ``grpoctl: ...`` line, a typed exit code, nothing written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.errors import ConfigError, DataError, DependencyError, InputNotFoundError, OutputExistsError


def run_cli(*args: str, env: dict | None = None):
    result = CliRunner().invoke(cli, list(args), env=env)
    err = result.stderr.strip()
    assert "Traceback" not in result.output + err
    return result.exit_code, err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def _fast(model, out) -> list[str]:
    return ["train", "--model", str(model), "-o", str(out), "--max-steps", "1", "--set", "trainer.num_generations=2",
            "--set", "trainer.max_completion_length=8"]


def test_help_lists_the_options():
    result = CliRunner().invoke(cli, ["train", "--help"])
    for opt in ("--config", "--set", "--model", "--dataset", "--output-dir", "--backend", "--max-steps", "--resume",
                "--force", "--tracking", "--num-processes", "--strategy", "--accelerate-config", "--chat-template"):
        assert opt in result.output
    assert "--samples" in CliRunner().invoke(cli, ["eval", "--help"]).output
    assert "--export" in CliRunner().invoke(cli, ["report", "--help"]).output


def test_unknown_set_key(out):
    code, err = run_cli("train", "-o", str(out), "--set", "lora.rank=8")
    assert code == ConfigError.exit_code
    assert err.startswith("grpoctl: --set: unknown key lora.rank; valid keys in [lora]: r, alpha")
    assert not out.exists()


def test_unknown_reward(out):
    code, err = run_cli("train", "-o", str(out), "--set", 'rewards.functions=["answer", "bogus"]')
    assert code == ConfigError.exit_code and "unknown reward 'bogus'" in err and "format_exact" in err
    assert not out.exists()


def test_plugin_that_does_not_import(out):
    code, err = run_cli("train", "-o", str(out), "--set", 'rewards.functions=["tests.train.broken_plugin:reward"]')
    assert code == ConfigError.exit_code
    assert "does not import: ModuleNotFoundError" in err and "this_module_does_not_exist_anywhere" in err


def test_dataset_without_the_mapped_columns(tiny_qwen3, out, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "solution": "2"}) + "\n")
    code, err = run_cli(*_fast(tiny_qwen3, out), "--dataset", str(data))
    assert code == DataError.exit_code and "no column 'question', 'answer'" in err and "data.prompt_field" in err
    assert err.endswith("e.g. --prompt-field problem --solution-field solution")  # from the columns it has
    assert not out.exists()


def test_a_mistyped_local_dataset_path_fails_at_once_without_asking_the_hub(out, tmp_path, monkeypatch):
    """`data/problem.jsonl` has one slash like a Hub id `owner/name`; it must not be looked up on the Hub
    (retries for half a minute, then "the Hub seems unreachable"). Checked before any model loads."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "problems.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any Hub request would fail differently
    for typo, hint in (("data/problem.jsonl", "; did you mean data/problems.jsonl?"),
                       ("dat/problems.jsonl", " (no folder dat)"), ("problem.csv", "")):
        code, err = run_cli("train", "-o", str(out), "-d", typo)
        assert code == InputNotFoundError.exit_code, err
        assert err == f"grpoctl: dataset file {typo} does not exist{hint}"
    assert not out.exists()


def test_every_prompt_longer_than_the_limit(tiny_qwen3, out):
    code, err = run_cli(*_fast(tiny_qwen3, out), "--set", "model.max_seq_length=40")
    assert code == DataError.exit_code and "every prompt is longer than the limit" in err
    assert not out.exists()


def test_missing_dataset_file(tiny_qwen3, out):
    code, err = run_cli(*_fast(tiny_qwen3, out), "--dataset", "./no/such.jsonl")
    assert code == InputNotFoundError.exit_code and "does not exist" in err


def test_unsloth_backend_without_a_gpu_says_what_to_install(out):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the message under test is the CPU one")
    code, err = run_cli("train", "-o", str(out), "--backend", "unsloth")
    assert code == DependencyError.exit_code
    assert "needs an NVIDIA GPU" in err and "pip install 'grpoctl[gpu]'" in err and "--backend trl" in err


def _needs_swanlab() -> None:
    from grpoctl.train.tracking import swanlab_import_problem

    if problem := swanlab_import_problem():
        pytest.skip(f"the check under test runs after `import swanlab`, and here {problem}")


def test_swanlab_cloud_without_an_api_key(out, tmp_path):
    _needs_swanlab()
    env = {"SWANLAB_API_KEY": "", "HOME": str(tmp_path), "SWANLAB_SAVE_DIR": str(tmp_path / "sw")}
    code, err = run_cli("train", "-o", str(out), "--tracking", "cloud", env=env)
    assert code == ConfigError.exit_code and "swanlab login" in err and "SWANLAB_API_KEY" in err
    assert not out.exists()


def test_swanlab_local_without_the_dashboard(out):
    import importlib.util

    if importlib.util.find_spec("swanboard") is not None:
        pytest.skip("swanboard is installed here")
    _needs_swanlab()
    code, err = run_cli("train", "-o", str(out), "--tracking", "local")
    assert code == DependencyError.exit_code and "pip install 'swanlab[dashboard]'" in err
    assert not out.exists()


def test_swanlab_installed_without_its_dependencies(out, tmp_path, monkeypatch):
    """A swanlab package whose own imports fail (as when copied without its dependencies) is named as such,
    with the import error, instead of the plain "pip install swanlab" that would change nothing."""
    import sys

    fake = tmp_path / "site" / "swanlab"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import pyroaring_not_installed_here\n")
    monkeypatch.delitem(sys.modules, "swanlab", raising=False)
    monkeypatch.syspath_prepend(str(fake.parent))
    code, err = run_cli("train", "-o", str(out), "--tracking", "offline")
    assert code == DependencyError.exit_code and err.count("\n") == 0
    assert "swanlab is installed but cannot be imported" in err and "pyroaring_not_installed_here" in err
    assert "--force-reinstall" in err and not out.exists()


def test_existing_output_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = run_cli("train", "-o", str(out))
    assert code == OutputExistsError.exit_code and "--force" in err
    assert (out / "keep.txt").read_text() == "x"


def test_resume_without_a_run(tmp_path):
    code, err = run_cli("train", "-o", str(tmp_path / "none"), "--resume")
    assert code == InputNotFoundError.exit_code and "not a grpoctl run directory" in err


def test_eval_on_a_missing_run(tmp_path):
    code, err = run_cli("eval", str(tmp_path / "nothing"))
    assert code == InputNotFoundError.exit_code and "grpoctl train" in err


def test_cli_train_writes_a_run_with_column_flags(tiny_qwen3, out, tmp_path):
    """A user's own file: prompt in `problem`, bare answer in `final`, no solution column at all."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "final": str(2 * a)}) + "\n"
                            for a in range(1, 9)))
    code, err = run_cli(*_fast(tiny_qwen3, out), "-d", str(data), "--prompt-field", "problem",
                        "--answer-field", "final", "--no-extract-hash-answer")
    assert code == 0, err
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["trainer"]["max_steps"] == 1
    assert (config["data"]["prompt_field"], config["data"]["answer_field"]) == ("problem", "final")
    assert config["data"]["extract_hash_answer"] is False
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_column_flags_are_offered_by_train_and_eval():
    for command in ("train", "eval"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        for opt in ("--prompt-field", "--solution-field", "--answer-field", "--no-extract-hash-answer"):
            assert opt in text, (command, opt)
