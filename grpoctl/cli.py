"""The ``grpoctl`` command line: parse, call one ``grpoctl.api`` function, echo, map typed errors to exit codes.

Heavy libraries (torch, transformers, llama.cpp) are imported inside the commands so that ``--help``
and bad-input errors answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from grpoctl.api import (
    DoctorOptions,
    EvalOptions,
    ExportOptions,
    ManifestOptions,
    PushOptions,
    ReportOptions,
    ServeOptions,
    TrainOptions,
)
from grpoctl.errors import GrpoctlError
from grpoctl.options import build, click_options
from grpoctl.version import __version__


class _Group(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit code."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        from grpoctl.procs import termination_as_interrupt

        kwargs["standalone_mode"] = False
        try:
            with termination_as_interrupt():  # SIGTERM/SIGHUP clean up exactly as Ctrl-C does
                rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _interrupted()
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            click.echo(f"grpoctl: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except GrpoctlError as e:
            click.echo(f"grpoctl: {e}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:  # a bug, not bad input: still one line unless asked for more
            from grpoctl.fsutil import disk_full_error

            where = getattr(e, "filename", None)
            full = disk_full_error(e, Path(where).parent if where else Path.cwd(), cleaned=False)
            if full is not None:  # a writer no stage expected to fill the disk: still the disk-full answer
                click.echo(f"grpoctl: {full}", err=True)
                sys.exit(full.exit_code)
            if os.environ.get("GRPOCTL_DEBUG"):
                raise
            click.echo(f"grpoctl: internal error: {type(e).__name__}: {e} "
                       "(set GRPOCTL_DEBUG=1 for the traceback)", err=True)
            sys.exit(70)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        return rv


def _interrupted() -> None:
    from grpoctl.procs import interrupt_exit_code, interrupt_name

    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()  # a bar left open redraws itself at exit, after what should be the last line
    name = interrupt_name()
    click.echo("grpoctl: interrupted" + ("" if name == "SIGINT" else f" ({name})"), err=True)
    sys.exit(interrupt_exit_code())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="grpoctl")
def cli() -> None:
    """GRPO fine-tuning to deployment: train, export, push, manifests, serve."""


# Each command's options are one dataclass (grpoctl.options): its fields are the flags, with their help text,
# choices and defaults; the command receives the built dataclass and hands it to grpoctl.api.

# --- train ------------------------------------------------------------------------------------------
@cli.command()
@click_options(TrainOptions)
def train(**params) -> None:
    """Train a LoRA adapter with GRPO and write a run directory."""
    from grpoctl.api import train as run_training

    run = run_training(build(TrainOptions, params))
    from grpoctl.train.launchenv import is_main_process

    if is_main_process():  # under `accelerate launch` every process gets here
        click.echo(f"grpoctl: run written to {run.root} (adapter: {run.adapter_dir})")


# --- eval -------------------------------------------------------------------------------------------
@cli.command(name="eval")
@click.argument("run", type=click.Path(path_type=Path))
@click_options(EvalOptions)
def eval_(run: Path, **params) -> None:
    """Compare the model with and without the trained LoRA on sampled prompts."""
    from grpoctl.api import evaluate
    from grpoctl.train.evaluate import format_examples, format_table

    result = evaluate(run, build(EvalOptions, params), log=click.echo)
    click.echo(format_table(result))
    click.echo(format_examples(result))
    click.echo(f"grpoctl: wrote {Path(run) / 'eval.json'}")


# --- report -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click_options(ReportOptions)
def report(run: Path, **params) -> None:
    """Print a run's per-step table and write a self-contained HTML report: plots of the rewards, KL and
    completion length, completions from training and eval, and the export's parity and artifacts."""
    from grpoctl.api import report as write_report

    written = write_report(run, **vars(build(ReportOptions, params)))
    click.echo(written.table)
    for note in written.notes:
        click.echo(f"grpoctl: note: {note}", err=True)
    click.echo(f"grpoctl: wrote {written.path}")


# --- export -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click_options(ExportOptions)
def export(source: Path, **params) -> None:
    """Verify, merge and convert a trained adapter (run directory or adapter folder).

    Writes merged weights, the cleaned adapter and GGUF files as asked, then an Ollama Modelfile and vLLM
    manifests for them, all listed with sha256 in EXPORT/artifacts.json.
    """
    from grpoctl.api import export as run_export

    options = build(ExportOptions, params)
    manifest = run_export(source, options, log=click.echo if options.progress else None, push_log=click.echo)
    kinds: dict[str, list] = {}
    for entry in manifest.files:
        kinds.setdefault(entry.kind, []).append(entry)
    for kind, entries in sorted(kinds.items()):
        size = sum(e.size for e in entries)
        click.echo(f"{kind:<14} {len(entries):>3} files {size / 2**20:>10.1f} MiB")
    if not options.verify_only:
        click.echo(f"manifest: {manifest.root / 'artifacts.json'}")


# --- push -------------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click_options(PushOptions)
def push(source: Path, **params) -> None:
    """Publish an export (RUN or RUN/export) to the Hugging Face Hub with generated model cards.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
    Unchanged files are not uploaded again and an unchanged repo gets no new commit.
    """
    from grpoctl.api import push as push_export

    options = build(PushOptions, params)
    for line in push_export(source, **vars(options)).lines():
        click.echo(line)
    if options.dry_run:
        click.echo("dry run: nothing was uploaded")


# --- manifests --------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click_options(ManifestOptions)
def manifests(source: Path, **params) -> None:
    """Write an Ollama Modelfile and vLLM serving manifests for an export.

    SOURCE is a run directory (its export/ is used) or an export directory.
    """
    from grpoctl.api import write_manifests

    written = write_manifests(source, build(ManifestOptions, params))
    for path in written.files:
        rel = os.path.relpath(path)
        click.echo(path if rel.startswith("..") else rel)
    if summary := written.section.ollama.summary:
        click.echo(f"grpoctl: {summary}", err=True)
    for note in written.section.notes:
        click.echo(f"grpoctl: note: {note}", err=True)


# --- serve ------------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click_options(ServeOptions)
@click.option("--stop", "stop_", is_flag=True, help="Stop detached servers (all, or the one on --port).")
def serve(source: Path | None, stop_: bool, **params) -> int:
    """Serve an export locally: a GGUF through llama.cpp or a running Ollama, or vLLM on a GPU.

    SOURCE is a run directory (uses RUN/export), an export directory (its artifacts.json) or a .gguf file.
    """
    from grpoctl.api import serve as run_serve
    from grpoctl.api import stop as run_stop
    from grpoctl.errors import UsageError

    # the context by lookup, not as a parameter: ServeOptions has a field named ctx (--ctx)
    port_given = click.get_current_context().get_parameter_source("port") != click.core.ParameterSource.DEFAULT
    if stop_:
        if source is not None:
            raise UsageError("--stop takes no SOURCE; use --port to pick one detached server")
        return run_stop(params["port"] if port_given else None, echo=click.echo)
    if source is None:
        raise UsageError("missing SOURCE: a run directory, an export directory or a .gguf file")
    if params["engine"] == "ollama" and port_given:
        raise UsageError("--port applies to --engine llamacpp; give the Ollama daemon's address with --host "
                         "or OLLAMA_HOST")
    return run_serve(build(ServeOptions, params, source=source), echo=click.echo)


# --- doctor -----------------------------------------------------------------------------------------
@cli.command()
@click_options(DoctorOptions)
def doctor(**params) -> None:
    """Check the engines grpoctl uses and say what to do about missing ones."""
    from grpoctl.api import doctor as run_doctor

    failed = 0
    for check in run_doctor(build(DoctorOptions, params), say=click.echo):
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check.status]
        line = f"[{mark}] {check.name:<18} {check.detail}"
        if check.hint and check.status != "ok":
            line += f"  -> {check.hint}"
        click.echo(line)
        failed += check.status == "fail"
    if failed:
        sys.exit(1)


def main() -> None:
    # OpenMP threads that spin while they wait turn a CPU shared with other work into a crawl: one demo
    # training step took 300 s with torch's default and 42 s with sleeping threads on a busy 2-core machine
    # (bench/cpu_threads_bench.py). OpenMP reads this once, when torch loads, so it is set before any command
    # imports torch; a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli(prog_name="grpoctl")
