"""grpoctl as a library: one function per command, the functions the command line calls.

    train(config | TrainOptions)    -> RunDir          grpoctl train
    evaluate(run, EvalOptions)      -> dict            grpoctl eval
    report(run, ...)                -> WrittenReport   grpoctl report (ReportOptions' fields as keywords)
    export(source, ExportOptions)   -> Artifacts       grpoctl export (manifests and --push included)
    write_manifests(source, opts)   -> WrittenManifests  grpoctl manifests
    push(source, repo, ...)         -> PushReport      grpoctl push (PushOptions' fields as keywords)
    serve(ServeOptions), stop(port) -> int             grpoctl serve, grpoctl serve --stop
    doctor(DoctorOptions)           -> list[Check]     grpoctl doctor

Each command's options are one dataclass (``ExportOptions``, ``TrainOptions`` ...) whose fields are its flags,
with their help and defaults (``grpoctl.options`` generates the command line from them).

This module sits above the stages: it is where one stage's output is handed to the next (the manifests
written into an export before it is swapped into place), so that no stage imports a later one. Every
error is a ``grpoctl.errors.GrpoctlError`` whose message is the one line the command line prints.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpoctl.argtypes import checked
from grpoctl.artifacts import Artifacts, find_export
from grpoctl.config import TrainConfig, TrainOptions
from grpoctl.doctor import Check, DoctorOptions
from grpoctl.errors import UsageError
from grpoctl.export.pipeline import ExportOptions, ExportSource
from grpoctl.exportlayout import tokenizer_dirs
from grpoctl.manifests.api import ManifestOptions, WrittenManifests
from grpoctl.push.hub import PushOptions
from grpoctl.report import ReportOptions
from grpoctl.rundir import RunDir
from grpoctl.serve.api import ServeOptions
from grpoctl.train.evaluate import EvalOptions

if TYPE_CHECKING:
    from grpoctl.push.hub import PushReport
    from grpoctl.report import WrittenReport

__all__ = ["Artifacts", "DoctorOptions", "EvalOptions", "ExportOptions", "ManifestOptions", "PushOptions",
           "ReportOptions", "RunDir", "ServeOptions", "TrainConfig", "TrainOptions", "doctor", "evaluate", "export",
           "push", "report", "serve", "stop", "train", "write_manifests"]

Say = Callable[[str], None]


@checked
def train(config: TrainConfig | TrainOptions | Path | str | None = None, *, overrides: tuple[str, ...] = ()) -> RunDir:
    """Train a LoRA adapter with GRPO; returns the run directory.

    Arguments:
        config: a ``TrainConfig``, ``TrainOptions`` (what ``grpoctl train`` takes: a config file, ``--set``
            overrides and flags; with ``resume`` and no config file, the run's own config is continued), or a
            TOML config file (None: the defaults).
        overrides: ``SECTION.KEY=VALUE`` settings applied on top, as ``--set`` takes them.
    """
    from grpoctl.config import load_config
    from grpoctl.train.run import train as run_training

    if isinstance(config, TrainOptions):
        if overrides:
            raise UsageError("train(): give the overrides in TrainOptions(overrides=...)")
        from grpoctl.train.resume import resumed_config_base

        out = Path(config.output_dir or TrainConfig().output_dir)
        # --resume without --config continues with the config the run was started with
        base = resumed_config_base(out) if config.resume and config.config_file is None else None
        config = config.load(base=base)
    elif not isinstance(config, TrainConfig):
        config = load_config(Path(config) if config is not None else None, overrides, {})
    elif overrides:
        config = load_config(None, overrides, {}, base=dataclasses.asdict(config))
    return run_training(config)


@checked
def evaluate(run: RunDir | Path | str, options: EvalOptions | None = None, *, log: Say | None = None) -> dict[str, Any]:
    """Compare the model with and without the trained LoRA on sampled prompts; writes ``RUN/eval.json``.

    ``EvalOptions(samples=20, seed=3407, dataset=..., prompt_field=...)``; ``log`` receives progress lines."""
    from grpoctl.train.evaluate import evaluate as run_eval

    o = options or EvalOptions()
    return run_eval(run if isinstance(run, RunDir) else RunDir(Path(run)), samples=o.samples,
                    max_new_tokens=o.max_new_tokens, seed=o.seed, dataset=o.dataset, columns=o.columns(), log=log)


def report(run: RunDir | Path | str, *, output: Path | str | None = None,
           export_dir: Path | str | None = None) -> WrittenReport:
    """Write the run's HTML report (default ``RUN/report.html``: plots, per-step table, training and eval
    completions, the export's parity and files); returns its path and the per-step table as text."""
    from grpoctl.report import write_report

    return write_report(run if isinstance(run, RunDir) else RunDir(Path(run)),
                        output=Path(output) if output is not None else None,
                        export_dir=Path(export_dir) if export_dir is not None else None)


class _Manifests:
    """The manifests stage as the export's finisher: written into the staged export, so they land with it.

    ``output_dir``: the export folder asked for (None: the source's default), named in the notes' commands."""

    def __init__(self, output_dir: Path | None = None) -> None:
        self.output_dir = output_dir

    def check(self, existing: Artifacts) -> None:
        from grpoctl.manifests.api import check_manifests_unedited

        check_manifests_unedited(existing)

    def write(self, stage: Path, source: ExportSource, say: Say) -> None:
        """Serving manifests for the staged export, with the Modelfile's template chosen as ``--ollama-template
        auto`` chooses it. A chat template whose Go translation fails the check (or does not translate) does not
        fail the export: where Ollama >= 0.30 renders the GGUF's own chat template (checked with llama.cpp's
        engine when its tools are built) no TEMPLATE is written, and where a Go template would be needed and none
        is faithful none is written either; artifacts.json (``manifests.ollama``) records why, and the notes
        printed here say what each Ollama version renders instead. A machine without a Go toolchain only loses
        the template check (noted in artifacts.json; a Go template needed anyway is written marked unchecked)."""
        from grpoctl.export.merge import read_chat_template
        from grpoctl.manifests.api import render_manifests
        from grpoctl.manifests.ollama import SystemPromptRefused
        from grpoctl.models import has_tokenizer

        candidates = [c for c in tokenizer_dirs(stage, source.tokenizer_dir, Path(source.base.path))
                      if has_tokenizer(c)]
        if not candidates:
            say("note: no tokenizer in the adapter folder, the export or the base, so no Modelfile or vLLM manifests "
                "(they need its chat template); the export itself is complete. Write them later with `grpoctl "
                "manifests EXPORT` once the export holds a tokenizer")
            return
        tokenizer_dir = next((c for c in candidates if read_chat_template(c) is not None), None)
        if tokenizer_dir is None:  # a base model's tokenizer often has none: GRPO on base models is common
            say("note: the tokenizer has no chat template, so no Modelfile or vLLM manifests (they serve the chat "
                "format the model was trained on); the export itself is complete. Add them later with "
                f"`{self._manifests_command(source)} --chat-template FILE` (FILE: the Jinja template used in "
                "training)")
            return
        # an unchecked template (no Go toolchain) is noted in artifacts.json rather than failing the export
        try:
            written = render_manifests(stage, run=source.run, tokenizer_dir=tokenizer_dir,
                                       options=ManifestOptions(unchecked_ok=True))
        except SystemPromptRefused as err:  # the export is complete; only the Modelfile cannot carry the prompt
            say(f"note: no Modelfile or vLLM manifests: {err}; the export itself is complete. Write them without "
                f"the system prompt: `{self._manifests_command(source)} --no-system`")
            return
        for note in written.section.notes:
            say(f"note: {note}")
        say("wrote serving manifests: " + ", ".join(p.relative_to(stage).as_posix() for p in written.files))

    def _manifests_command(self, source: ExportSource) -> str:
        """``grpoctl manifests`` naming this export as the user would: the run when it is the run's export."""
        out = Path(self.output_dir or source.default_output).absolute()
        if source.run is not None and out == source.run.export_dir.absolute():
            return f"grpoctl manifests {shlex.quote(str(source.run.root))}"
        return f"grpoctl manifests {shlex.quote(str(out))}"


@checked
def export(source: Path | str, options: ExportOptions | None = None, *, manifests: bool | None = None,
           log: Say | None = None, push_log: Say | None = None) -> Artifacts:
    """Verify the adapter (a run directory or an adapter folder) and write what ``options`` asks for, then the
    Ollama Modelfile and vLLM manifests for it (``options.manifests`` False, or ``manifests=False``: not those),
    then push the export to the Hub when ``options.push`` names a repo; returns the export's record.

    ``ExportOptions(gguf="q8_0,q4_k_m", merged="16bit", lora=True, output_dir=...)``; ``log`` receives the progress
    lines, tables and notes (None: silent); ``push_log`` the push report's lines (default: ``log``).
    With ``progress=False`` the libraries' progress bars, log records and warnings are silenced too.
    """
    from grpoctl.export.pipeline import export as run_export
    from grpoctl.quiet import quiet

    options = options or ExportOptions()
    if options.push:
        if options.verify_only:
            raise UsageError("--push cannot be combined with --verify-only: a verified adapter is not an export")
        from grpoctl.push.hub import validate_repo_id

        validate_repo_id(options.push)  # before hours of work, not after
    with_manifests = options.manifests if manifests is None else manifests
    with quiet(not options.progress):
        artifacts = run_export(Path(source), options, log, then=_Manifests(options.output_dir) if with_manifests
                               else None)
        if options.push:
            from grpoctl.push.hub import push as run_push

            for line in run_push(artifacts.root, options.push).lines():
                (push_log or log or (lambda _line: None))(line)
    return artifacts


@checked
def write_manifests(source: Path | str, options: ManifestOptions | None = None) -> WrittenManifests:
    """Write the Ollama Modelfile(s) and vLLM manifests for an export (a run directory or an export directory)."""
    from grpoctl.manifests.api import write_manifests as run_manifests

    artifacts = find_export(Path(source))
    return run_manifests(artifacts.root, run=artifacts.run, options=options)


@checked
def push(source: Path | str, repo: str, **options: Any) -> PushReport:
    """Publish an export to the Hugging Face Hub with generated model cards (``dry_run=True``: plan only).

    ``options`` are those of ``grpoctl.push.hub.push``: the fields of ``PushOptions`` (what, repo_for, private,
    revision, dry_run, allow_stale: ``push(src, **vars(PushOptions(repo=..., ...)))`` is what ``grpoctl push``
    calls), and token, num_threads."""
    from grpoctl.push.hub import push as run_push

    return run_push(Path(source), repo, **options)


@checked
def serve(options: ServeOptions, echo: Say = print) -> int:
    """Serve an export through llama.cpp, a running Ollama or vLLM; returns the exit status."""
    from grpoctl.serve.api import serve as run_serve

    return run_serve(options, echo=echo)


@checked
def stop(port: int | None = None, echo: Say = print) -> int:
    """Stop the servers ``serve`` detached (all, or the one on ``port``); returns the exit status."""
    from grpoctl.serve.api import stop as run_stop

    return run_stop(port, echo=echo)


@checked
def doctor(options: DoctorOptions | None = None, say: Say = print) -> list[Check]:
    """Fetch or build what ``options`` asks for, then check the engines grpoctl uses; one ``Check`` each."""
    from grpoctl.doctor import doctor as run_doctor

    return run_doctor(options, say)
