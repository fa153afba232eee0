"""The ``grpoctl`` command line: parse, call one library function, map typed errors to exit codes.

Heavy libraries (torch, transformers, llama.cpp) are imported inside the commands so that ``--help``
and bad-input errors answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from grpoctl.config import GENERATIONS
from grpoctl.errors import GrpoctlError
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


# --- train ------------------------------------------------------------------------------------------
def _column_options(f):
    """Which dataset columns hold what: the usual ``data.*`` keys as flags (train and eval)."""
    for opt in reversed([
        click.option("--prompt-field", metavar="COLUMN", help="Column with the question/prompt (default: question)."),
        click.option("--solution-field", metavar="COLUMN",
                     help="Column with the worked solution; the answer is taken from it (default: answer)."),
        click.option("--answer-field", metavar="COLUMN",
                     help="Column that already holds the bare answer (then the solution column is optional)."),
        click.option("--extract-hash-answer/--no-extract-hash-answer", default=None,
                     help="Take the answer after '####' in the solution, as GSM8K writes it (default: on)."),
    ]):
        f = opt(f)
    return f


def _column_flags(prompt_field: str | None, solution_field: str | None, answer_field: str | None,
                  extract_hash_answer: bool | None) -> dict:
    given = {"prompt_field": prompt_field, "solution_field": solution_field, "answer_field": answer_field,
             "extract_hash_answer": extract_hash_answer}
    return {k: v for k, v in given.items() if v is not None}


@cli.command()
@click.option("--config", "-c", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable), e.g. --set lora.r=16 --set trainer.beta=0.")
@click.option("--model", "-m", help="Base model: Hub id or local folder (default: embedded SmolLM2-135M-Instruct).")
@click.option("--dataset", "-d", help="datasets name or local .jsonl/.csv/.parquet (default: shipped arith_gsm).")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Run directory (default: runs/grpo).")
@click.option("--backend", type=click.Choice(["auto", "trl", "unsloth"]), help="Training backend (default: auto).")
@click.option("--generation", type=click.Choice(GENERATIONS),
              help="Who writes the completions: vLLM, transformers' generate, or auto (vLLM when a CUDA GPU and "
                   "vLLM are there; default).")
@click.option("--max-steps", type=int, help="GRPO steps (default: 100).")
@click.option("--tracking", type=click.Choice(["none", "cloud", "local", "offline"]),
              help="SwanLab tracking mode (default: none).")
@click.option("--num-processes", type=int, help="Processes to launch through accelerate (default: 1).")
@click.option("--strategy", type=click.Choice(["ddp", "zero2", "zero3", "fsdp"]),
              help="Multi-process strategy (default: ddp).")
@click.option("--accelerate-config", type=click.Path(path_type=Path), help="accelerate config file to launch with.")
@click.option("--chat-template", type=click.Path(path_type=Path), metavar="FILE",
              help="Jinja chat template, for a base whose tokenizer has none (config key model.chat_template).")
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir from its newest checkpoint.")
@click.option("--force", is_flag=True, help="Delete what --output-dir holds (a previous run included) and start again.")
@_column_options
def train(config_file: Path | None, overrides: tuple[str, ...], model: str | None, dataset: str | None,
          output_dir: Path | None, backend: str | None, generation: str | None, max_steps: int | None,
          tracking: str | None,
          num_processes: int | None, strategy: str | None, accelerate_config: Path | None,
          chat_template: Path | None, resume: bool, force: bool, **columns) -> None:
    """Train a LoRA adapter with GRPO and write a run directory."""
    from grpoctl.config import load_config
    from grpoctl.train.resume import resumed_config_base
    from grpoctl.train.run import train as run_training

    data = {"dataset": dataset, **_column_flags(**columns)}
    flags: dict = {"model": {"name": model, "chat_template": str(chat_template) if chat_template else None},
                   "data": data, "trainer": {"backend": backend, "generation": generation, "max_steps": max_steps},
                   "tracking": {"mode": tracking},
                   "distributed": {"num_processes": num_processes, "strategy": strategy,
                                   "accelerate_config": str(accelerate_config) if accelerate_config else None},
                   "output_dir": str(output_dir) if output_dir else None, "resume": resume or None,
                   "force": force or None}
    flags = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
             for k, v in flags.items()}
    flags = {k: v for k, v in flags.items() if v not in (None, {})}
    # --resume without --config continues with the config the run was started with
    base = resumed_config_base(output_dir or Path("runs/grpo")) if resume and config_file is None else None
    cfg = load_config(config_file, overrides, flags, base=base)
    run = run_training(cfg)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch` every process gets here
        click.echo(f"grpoctl: run written to {run.root} (adapter: {run.adapter_dir})")


# --- eval -------------------------------------------------------------------------------------------
@cli.command(name="eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--samples", "-n", type=int, default=20, show_default=True, help="Prompts to sample.")
@click.option("--max-new-tokens", type=int, help="Completion length (default: the run's max_completion_length, "
              "at most 256 without a GPU).")
@click.option("--seed", type=int, default=3407, show_default=True, help="Sampling and selection seed.")
@click.option("--dataset", "-d", help="Evaluate on this dataset instead of the run's own.")
@_column_options
def eval_(run: Path, samples: int, max_new_tokens: int | None, seed: int, dataset: str | None, **columns) -> None:
    """Compare the model with and without the trained LoRA on sampled prompts."""
    from grpoctl.rundir import RunDir
    from grpoctl.train.evaluate import evaluate, format_examples, format_table

    result = evaluate(RunDir(run), samples=samples, max_new_tokens=max_new_tokens, seed=seed, dataset=dataset,
                      columns=_column_flags(**columns), log=click.echo)
    click.echo(format_table(result))
    click.echo(format_examples(result))
    click.echo(f"grpoctl: wrote {Path(run) / 'eval.json'}")


# --- report -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Where the HTML report goes (default: RUN/report.html).")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="The export to include (default: RUN/export, when there is one).")
def report(run: Path, output: Path | None, export_dir: Path | None) -> None:
    """Print a run's per-step table and write a self-contained HTML report: plots of the rewards, KL and
    completion length, completions from training and eval, and the export's parity and artifacts."""
    from grpoctl.api import report as write_report

    written = write_report(run, output=output, export_dir=export_dir)
    click.echo(written.table)
    for note in written.notes:
        click.echo(f"grpoctl: note: {note}", err=True)
    click.echo(f"grpoctl: wrote {written.path}")


# --- export -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--base", metavar="MODEL", help="Base model (local folder or Hub id). Default: the run's base, or the "
              "base an adapter folder's adapter_config names when it is on this machine.")
@click.option("--merged", type=click.Choice(["16bit", "4bit"]), help="Write merged weights: 16bit safetensors "
              "(merged/) or bitsandbytes nf4 (merged-4bit/, needs CUDA). Default 16bit when nothing else is asked.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16"]), default="auto", show_default=True,
              help="dtype of the merged weights; auto keeps the base's 16-bit dtype.")
@click.option("--lora", "lora", is_flag=True, help="Also write the cleaned adapter alone (lora/) for --enable-lora.")
@click.option("--gguf", metavar="TYPES", help="GGUF types to write, comma separated (e.g. q8_0,q4_k_m).")
@click.option("--imatrix", metavar="auto|FILE", help="Quantize the GGUF types with an importance matrix: auto computes "
              "one with llama.cpp's llama-imatrix over the run's training prompts and completions sampled from the "
              "trained model; FILE is yours (GGUF or legacy .dat). Needed for the iq* and q2_k types.")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="FILE",
              help="Text to compute the importance matrix over instead of the run's data (implies --imatrix auto).")
@click.option("--eval-data", type=click.Path(path_type=Path), metavar="FILE",
              help="Task parity: held-out prompts (jsonl/csv/parquet, the run's column mapping) instead of those the "
              "run held out of training; the reference and each GGUF answer them, scored by the run's rewards.")
@click.option("--task-prompts", type=int, metavar="N",
              help="Task parity: how many held-out prompts (default 8 on a CPU, 32 on a GPU; 0: no task parity).")
@click.option("--task-gate", is_flag=True, help="Fail a GGUF whose task reward drops significantly (the whole 95% "
              "interval of the paired difference below zero).")
@click.option("--quant-recipe", metavar="search", help="Search per-tensor types for each quantized GGUF type on the "
              "calibration text: groups of tensors one type step higher or lower, measured by KL, within the type's "
              "size; ships the searched file and its llama-quantize --tensor-type-file recipe when it beats the "
              "importance-matrix quant there and on the held-out probes. Needs --imatrix auto or --calibration.")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path),
              help="Export folder. Default: RUN/export, or ADAPTER-export beside an adapter folder.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--verify-only", is_flag=True, help="Only verify the adapter (table + verify.json).")
@click.option("--strict", is_flag=True, help="Fail verification on warnings (e.g. some modules never trained).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin checkpoints (they can run code when loaded).")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), help="llama.cpp checkout with the GGUF converter.")
@click.option("--no-parity-gate", is_flag=True, help="Report GGUF parity but do not fail the export on it.")
@click.option("--no-manifests", is_flag=True, help="Skip the Ollama Modelfile and vLLM manifests.")
@click.option("--push", "push_repo", metavar="OWNER/NAME", help="Push the finished export to the Hub "
              "(same as `grpoctl push EXPORT --repo OWNER/NAME`).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def export(source: Path, base: str | None, merged: str | None, dtype: str, lora: bool, gguf: str | None,
           imatrix: str | None, calibration: Path | None, quant_recipe: str | None, eval_data: Path | None,
           task_prompts: int | None, task_gate: bool, output_dir: Path | None, force: bool, verify_only: bool,
           strict: bool, allow_pickle: bool, llama_cpp_dir: Path | None, no_parity_gate: bool, no_manifests: bool,
           push_repo: str | None, quiet: bool) -> None:
    """Verify, merge and convert a trained adapter (run directory or adapter folder).

    Writes merged weights, the cleaned adapter and GGUF files as asked, then an Ollama Modelfile and vLLM
    manifests for them, all listed with sha256 in EXPORT/artifacts.json.
    """
    from grpoctl.api import ExportOptions
    from grpoctl.api import export as run_export

    if push_repo and verify_only:
        raise click.BadParameter("cannot be combined with --verify-only", param_hint="--push")
    if push_repo:
        from grpoctl.push.hub import validate_repo_id

        validate_repo_id(push_repo)  # before hours of work, not after
    options = ExportOptions(base=base, merged=merged, dtype=dtype, lora=lora, gguf=[gguf] if gguf else [],
                            output_dir=output_dir, force=force, verify_only=verify_only, strict=strict,
                            allow_pickle=allow_pickle, llama_cpp_dir=llama_cpp_dir, parity_gate=not no_parity_gate,
                            progress=not quiet, imatrix=imatrix, calibration=calibration,
                            quant_recipe=quant_recipe, eval_data=eval_data, task_prompts=task_prompts,
                            task_gate=task_gate)
    manifest = run_export(source, options, manifests=not no_manifests, log=None if quiet else click.echo)
    kinds: dict[str, list] = {}
    for entry in manifest.files:
        kinds.setdefault(entry.kind, []).append(entry)
    for kind, entries in sorted(kinds.items()):
        size = sum(e.size for e in entries)
        click.echo(f"{kind:<14} {len(entries):>3} files {size / 2**20:>10.1f} MiB")
    if not verify_only:
        click.echo(f"manifest: {manifest.root / 'artifacts.json'}")
    if push_repo:
        from grpoctl.push.hub import push as push_export

        for line in push_export(manifest.root, push_repo).lines():
            click.echo(line)


# --- push -------------------------------------------------------------------------------------------
def _repo_overrides(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        kind, sep, repo_id = v.partition("=")
        if not sep or not kind.strip() or not repo_id.strip():
            raise click.BadParameter(f"{v!r} is not KIND=OWNER/NAME", param_hint="--repo-for")
        out[kind.strip().lower()] = repo_id.strip()
    return out


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--repo", required=True, metavar="OWNER/NAME",
              help="Repo of the merged model; the adapter goes to NAME-lora, GGUF files to NAME-GGUF, "
                   "4-bit weights to NAME-bnb-4bit.")
@click.option("--what", metavar="KINDS", default=None,
              help="Comma-separated families to push: merged,merged-4bit,lora,gguf (default: all in the export).")
@click.option("--repo-for", "repo_for", multiple=True, metavar="KIND=OWNER/NAME",
              help="Override one family's repo, e.g. --repo-for gguf=alice/my-gguf (repeatable).")
@click.option("--private", is_flag=True, help="Create new repos as private (existing repos keep their visibility).")
@click.option("--revision", metavar="BRANCH", default=None, help="Existing branch to commit to (default: main).")
@click.option("--dry-run", is_flag=True, help="List what would go where, with sizes; needs no network or token.")
@click.option("--allow-stale", is_flag=True, help="Publish the export even though the run's adapter changed after it "
              "was made (e.g. trained further with --resume).")
def push(source: Path, repo: str, what: str | None, repo_for: tuple[str, ...], private: bool,
         revision: str | None, dry_run: bool, allow_stale: bool) -> None:
    """Publish an export (RUN or RUN/export) to the Hugging Face Hub with generated model cards.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
    Unchanged files are not uploaded again and an unchanged repo gets no new commit.
    """
    from grpoctl.push.hub import push as push_export

    report = push_export(source, repo, what=what.split(",") if what is not None else None, private=private,
                         revision=revision, dry_run=dry_run, names=_repo_overrides(repo_for), allow_stale=allow_stale)
    for line in report.lines():
        click.echo(line)
    if dry_run:
        click.echo("dry run: nothing was uploaded")


# --- manifests --------------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Where gguf/ and vllm/ manifests go (default: the export directory).")
@click.option("--no-system", is_flag=True, help="Leave the training system prompt out of the Modelfile.")
@click.option("--chat-template", "chat_template", type=click.Path(path_type=Path), default=None,
              help="Jinja chat template file, for a tokenizer that has none.")
@click.option("--quant", default=None, help="GGUF type the plain Modelfile uses (default: Q4_K_M if exported).")
@click.option("--served-model-name", default=None, help="Model name clients ask vLLM for (default: the GGUF name).")
@click.option("--hub-repo", default=None, help="Serve the merged model from this Hub repo instead of the folder.")
@click.option("--gpu-memory-utilization", type=float, default=0.90, show_default=True)
@click.option("--tensor-parallel-size", type=int, default=None,
              help="GPUs one vLLM replica is split over (default: 1).")
@click.option("--data-parallel-size", type=int, default=None,
              help="vLLM replicas behind the endpoint (default: the run's training process count divided by "
                   "the tensor parallel size).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--ollama-template", type=click.Choice(["auto", "go", "native"]), default="auto", show_default=True,
              help="Modelfile TEMPLATE: auto = what Ollama 0.30+ renders exactly like the chat template (usually "
                   "none: Ollama renders the GGUF's own template); go = the checked Go translation, for Ollama "
                   "before 0.30; native = never.")
@click.option("--force", is_flag=True,
              help="Replace existing manifests, and write them even if the Ollama template check fails.")
def manifests(source: Path, output_dir: Path | None, no_system: bool, chat_template: Path | None, quant: str | None,
              served_model_name: str | None, hub_repo: str | None, gpu_memory_utilization: float,
              tensor_parallel_size: int | None, data_parallel_size: int | None, port: int, ollama_template: str,
              force: bool) -> None:
    """Write an Ollama Modelfile and vLLM serving manifests for an export.

    SOURCE is a run directory (its export/ is used) or an export directory.
    """
    from grpoctl.api import ManifestOptions, write_manifests

    options = ManifestOptions(output_dir=output_dir, no_system=no_system, chat_template=chat_template, quant=quant,
                              served_model_name=served_model_name, hub_repo=hub_repo,
                              gpu_memory_utilization=gpu_memory_utilization,
                              tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                              port=port, ollama_template=ollama_template, force=force)
    written = write_manifests(source, options)
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
@click.option("--engine", type=click.Choice(["llamacpp", "ollama", "vllm"]), default="llamacpp", show_default=True,
              help="llama-cpp-python's OpenAI-compatible server, a running Ollama daemon, or vLLM (a CUDA GPU; "
                   "the export's merged model or base + LoRA, as the vLLM manifests run it).")
@click.option("--quant", default=None, help="Which exported GGUF (e.g. q4_k_m); default: the only one, else q4_k_m.")
@click.option("--host", default=None, help="llamacpp/vllm: address to listen on [127.0.0.1]. ollama: daemon address "
              "[$OLLAMA_HOST or 127.0.0.1:11434].")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="llamacpp/vllm port (0: any free port; with --stop: which detached server).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None,
              help="Context size; default: the run's max_seq_length, else the GGUF's (capped at 4096).")
@click.option("--name", default=None, help="Model name (Ollama model / llama.cpp alias); default from the GGUF.")
@click.option("--smoke", is_flag=True, help="Send one chat (training system prompt + a probe), print it, exit 0/1.")
@click.option("--prompt", default=None, help="Probe question for --smoke and the printed example.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Token limit of the smoke chat.")
@click.option("--detach", is_flag=True,
              help="llamacpp/vllm: start in the background, write a pid file and return.")
@click.option("--stop", "stop_", is_flag=True, help="Stop detached servers (all, or the one on --port).")
@click.option("--modelfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="ollama: Modelfile to take TEMPLATE/PARAMETER/SYSTEM from (default: the export's).")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds to wait for the server to answer [120; vllm: 900].")
@click.option("--vllm-mode", type=click.Choice(["merged", "merged-4bit", "lora"]), default=None,
              help="vllm: which of the export's vLLM manifests to run (default: the first written).")
@click.option("--parity", is_flag=True, help="vllm: measure the served model's prompt log-probabilities against "
              "base + adapter applied by PEFT; exit 1 if it departs beyond the noise floor.")
@click.pass_context
def serve(ctx: click.Context, source: Path | None, engine: str, quant: str | None, host: str | None, port: int,
          **kw) -> int:
    """Serve an export locally: a GGUF through llama.cpp or a running Ollama, or vLLM on a GPU.

    SOURCE is a run directory (uses RUN/export), an export directory (its artifacts.json) or a .gguf file.
    """
    from grpoctl.errors import UsageError
    from grpoctl.serve.api import ServeOptions
    from grpoctl.serve.api import serve as run_serve
    from grpoctl.serve.api import stop as run_stop
    from grpoctl.serve.common import DEFAULT_PROBE

    if kw["stop_"]:
        if source is not None:
            raise UsageError("--stop takes no SOURCE; use --port to pick one detached server")
        return run_stop(port if ctx.get_parameter_source("port") != click.core.ParameterSource.DEFAULT else None,
                        echo=click.echo)
    if source is None:
        raise UsageError("missing SOURCE: a run directory, an export directory or a .gguf file")
    if engine == "ollama" and ctx.get_parameter_source("port") != click.core.ParameterSource.DEFAULT:
        raise UsageError("--port applies to --engine llamacpp; give the Ollama daemon's address with --host "
                         "or OLLAMA_HOST")
    opts = ServeOptions(source=source, engine=engine, quant=quant, host=host, port=port, ctx=kw["n_ctx"],
                        smoke=kw["smoke"], detach=kw["detach"], name=kw["name"],
                        prompt=kw["prompt"] or DEFAULT_PROBE, max_tokens=kw["max_tokens"],
                        ready_timeout=kw["timeout"], modelfile=kw["modelfile"], vllm_mode=kw["vllm_mode"],
                        parity=kw["parity"])
    return run_serve(opts, echo=click.echo)


# --- doctor -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--fetch-converter", is_flag=True, help="First fetch llama.cpp's GGUF converter into the cache "
              "(from the installed llama-cpp-python's sdist on PyPI), so later exports work offline.")
@click.option("--build-llama-tools", is_flag=True, help="First build llama.cpp's C++ tools (llama-quantize, "
              "llama-imatrix, llama-server, llama-perplexity) into the cache from the same sdist; minutes, once.")
def doctor(fetch_converter: bool, build_llama_tools: bool) -> None:
    """Check the engines grpoctl uses and say what to do about missing ones."""
    from grpoctl.doctor import run_checks

    if fetch_converter:
        from grpoctl.export.converter import find_converter

        click.echo(f"GGUF converter ready at {find_converter(fetch=True).root}")
    if build_llama_tools:
        from grpoctl.llamacpp_tools import find_tools

        click.echo(f"llama.cpp tools ready in {find_tools(build=True).bin_dir}")

    failed = 0
    for check in run_checks():
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
