"""Options declared once: the click options are generated from the options dataclasses, so a field's help,
default, choices and flag spelling come from one place and every command hands the built dataclass to the API."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated

import click
import pytest
from click.testing import CliRunner

from grpoctl import api
from grpoctl.argtypes import Range
from grpoctl.cli import cli
from grpoctl.options import build, cli_fields, click_options, field_default, option, spec_of

# each command and the dataclass its options are; the only hand-written option left is serve's --stop (an action)
COMMANDS = {"train": api.TrainOptions, "eval": api.EvalOptions, "report": api.ReportOptions,
            "export": api.ExportOptions, "push": api.PushOptions, "manifests": api.ManifestOptions,
            "serve": api.ServeOptions, "doctor": api.DoctorOptions}
ACTIONS = {("serve", "stop_")}


def _help(*args: str) -> str:
    res = CliRunner().invoke(cli, [*args, "--help"], terminal_width=10_000)  # one line per option
    assert res.exit_code == 0, res.output
    return res.output


def _option_line(command: str, flag: str) -> str:
    """What ``grpoctl COMMAND --help`` prints for the option spelled ``flag`` (its spellings, then its help)."""
    cmd = cli.commands[command]
    ctx = click.Context(cmd, info_name=command)
    records = [p.get_help_record(ctx) for p in cmd.params if isinstance(p, click.Option)]
    names, text = next(r for r in records if r and flag in r[0].replace(",", " ").replace("/", " ").split())
    assert " ".join(text.split()) in " ".join(_help(command).split())  # as --help prints it
    return f"{names} {text}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_a_command_is_one_field_of_its_dataclass(command):
    cmd = cli.commands[command]
    options = {p.name for p in cmd.params if isinstance(p, click.Option) and p.name != "help"}
    fields = [f.name for f in cli_fields(COMMANDS[command])]
    assert len(fields) == len(set(fields))
    assert options - {name for cmd_name, name in ACTIONS if cmd_name == command} == set(fields)


def test_export_help_shows_each_fields_help_and_default_from_the_dataclass():
    for f in cli_fields(api.ExportOptions):
        spec = spec_of(f)
        line = _option_line("export", spec.flag or "--" + f.name.replace("_", "-"))
        assert " ".join(spec.help.split()) in " ".join(line.split()), (f.name, line)
        default = field_default(f)
        if isinstance(default, str):  # a str default is shown as click shows defaults
            assert f"[default: {default}]" in line, (f.name, line)


def test_renamed_flags_agree_with_their_fields_and_the_old_spelling_still_works():
    text = _help("export")
    assert "--parity-gate / --no-parity-gate" in text and "--progress / -q, --quiet" in text
    ctx = cli.commands["export"].make_context("export", ["run", "--no-parity-gate", "-q", "--no-manifests"])
    opts = build(api.ExportOptions, dict(ctx.params))
    assert (opts.parity_gate, opts.progress, opts.manifests) == (False, False, False)

    serve_help = _help("serve")
    assert "--ready-timeout" in serve_help and "--timeout" not in serve_help.replace("--ready-timeout", "")
    ctx = cli.commands["serve"].make_context("serve", ["m.gguf", "--timeout", "7"])
    assert build(api.ServeOptions, dict(ctx.params), source=Path("m.gguf")).ready_timeout == 7

    assert "--export-dir DIR" in _help("report") and "--export " not in _help("report")
    ctx = cli.commands["report"].make_context("report", ["run", "--export", "elsewhere"])
    assert build(api.ReportOptions, dict(ctx.params)).export_dir == Path("elsewhere")
    ctx = cli.commands["push"].make_context("push", ["run", "--repo", "a/b", "--repo-for", "gguf=a/q"])
    assert build(api.PushOptions, dict(ctx.params)).repo_for == {"gguf": "a/q"}


def test_defaults_are_stated_once_and_reach_the_command_line_from_the_dataclasses():
    """The numbers once written in cli.py as well as in the stage: now only the dataclass has them."""
    from grpoctl.config import TrainConfig

    cli_source = (Path(api.__file__).parent / "cli.py").read_text()
    for literal in ("0.90", "8000", "8080", "256", "120", "runs/grpo", "3407"):
        assert not re.search(rf"(?<![\w.]){re.escape(literal)}(?![\w.])", cli_source), literal
    assert "[default: 8080" in _option_line("serve", "--port")
    assert "[default: 0.9]" in _option_line("manifests", "--gpu-memory-utilization")
    assert "[default: 8000]" in _option_line("manifests", "--port")
    assert f"[default: {TrainConfig().output_dir}]" in _option_line("train", "--output-dir")
    assert f"[default: {TrainConfig().trainer.max_steps}]" in _option_line("train", "--max-steps")


# --- the generator, on a toy dataclass ---------------------------------------------------------------------

def _toy(port_default: int = 5):
    @dataclasses.dataclass
    class Toy:
        name: str = option("x", help="A name.", choices=("x", "y"))
        port: Annotated[int, Range(0, 9)] = option(port_default, help="A port.", aliases=("--old-port",))
        gate: bool = option(True, off="--no-gate", help="A gate.")
        tags: tuple[str, ...] = option(default_factory=tuple, flag="--tag", multiple=True, help="Tags.")
        path: Path | None = option(short="-p", help="A path.")
        internal: int = 3  # no metadata: not an option

    @click.command()
    @click_options(Toy)
    def toy(**params):
        click.echo(repr(build(Toy, params)))

    return Toy, toy


def test_a_default_changed_in_the_dataclass_is_the_default_of_the_generated_option():
    for default in (5, 7):
        _, toy = _toy(default)
        runner = CliRunner()
        assert f"[default: {default}" in runner.invoke(toy, ["--help"], terminal_width=10_000).output
        assert f"port={default}," in runner.invoke(toy, []).output


def test_generated_options_parse_types_choices_bounds_flags_and_aliases():
    Toy, toy = _toy()
    runner = CliRunner()
    out = runner.invoke(toy, ["--name", "y", "--old-port", "9", "--no-gate", "--tag", "a", "--tag", "b", "-p", "f"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == repr(Toy(name="y", port=9, gate=False, tags=("a", "b"), path=Path("f")))
    assert runner.invoke(toy, ["--port", "10"]).exit_code == 2  # the Range bound
    assert runner.invoke(toy, ["--name", "z"]).exit_code == 2  # the choices
    text = runner.invoke(toy, ["--help"], terminal_width=10_000).output
    assert "--old-port" not in text and "--internal" not in text and "--gate / --no-gate" in text


def test_eval_column_flags_reach_the_api_as_the_runs_column_overrides(monkeypatch, tmp_path):
    seen = {}

    def fake_eval(run, **kwargs):
        seen.update(kwargs)
        return {"rows": []}

    monkeypatch.setattr("grpoctl.train.evaluate.evaluate", fake_eval)
    monkeypatch.setattr("grpoctl.train.evaluate.format_table", lambda r: "")
    monkeypatch.setattr("grpoctl.train.evaluate.format_examples", lambda r: "")
    (tmp_path / "run.json").write_text("{}")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path), "-n", "3", "--prompt-field", "q",
                                   "--no-extract-hash-answer"])
    assert res.exit_code == 0, res.output
    assert seen["samples"] == 3 and seen["seed"] == 3407
    assert seen["columns"] == {"prompt_field": "q", "extract_hash_answer": False}


def test_train_flags_become_config_keys_over_the_config_file(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[trainer]\nmax_steps = 7\nbeta = 0.5\n")
    ctx = cli.commands["train"].make_context("train", ["-c", str(cfg_file), "--max-steps", "3", "--set",
                                                       "lora.r=4", "--prompt-field", "q", "-o", str(tmp_path / "r")])
    cfg = build(api.TrainOptions, dict(ctx.params)).load()
    assert (cfg.trainer.max_steps, cfg.trainer.beta, cfg.lora.r) == (3, 0.5, 4)
    assert cfg.data.prompt_field == "q" and cfg.data.extract_hash_answer is True
    assert cfg.output_dir == str(tmp_path / "r") and cfg.resume is False


DOC_PAGES = {"export": ["export.md", "gguf.md"], "serve": ["serve.md"], "manifests": ["manifests.md"],
             "push": ["push.md"], "train": ["train.md"], "eval": ["train.md"], "report": ["train.md"],
             "doctor": ["gguf.md", "export.md"]}


@pytest.mark.parametrize("command", sorted(DOC_PAGES))
def test_every_flag_of_a_command_is_in_its_documentation(command):
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "".join((docs / page).read_text() for page in DOC_PAGES[command])
    missing = [p.opts for p in cli.commands[command].params
               if isinstance(p, click.Option) and p.name != "help" and not any(o in text for o in p.opts)]
    assert missing == []
