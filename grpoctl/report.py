"""``grpoctl report``: what a run learned, as a terminal table and one self-contained HTML file.

Reads only what the stages left behind: the run directory (run.json, metrics.jsonl, samples.jsonl,
summary.json, eval.json) and, when there is one, the export's artifacts.json (parity, files). The HTML has
no scripts and fetches nothing: plots are inline SVG (``grpoctl.plots``), text is escaped.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import click

from grpoctl.artifacts import ARTIFACTS_FILE, Artifacts
from grpoctl.errors import OutputExistsError
from grpoctl.fsutil import human_bytes, staged_file
from grpoctl.options import option
from grpoctl.plots import line_chart
from grpoctl.rundir import REPORT_FILE, RunDir
from grpoctl.version import __version__

# Marks a file as written here, so a later report may replace it and a file of the user's is never overwritten.
GENERATOR = '<meta name="generator" content="grpoctl report">'


@dataclass
class WrittenReport:
    path: Path
    table: str  # the per-step table, as printed
    notes: list[str] = field(default_factory=list)


def reward_names(run: RunDir, metrics: list[dict[str, Any]]) -> list[str]:
    """The reward functions in the run's order, then any other the metrics carry (a plugin named otherwise)."""
    names = [name.split(":")[-1].split(".")[-1] for name, _ in run.rewards]
    logged = [k for m in metrics for k in (m.get("rewards") or {})]
    ordered = [n for n in names if n in logged]
    return ordered + [n for n in dict.fromkeys(logged) if n not in ordered]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def format_table(metrics: list[dict[str, Any]], names: list[str]) -> str:
    """One row per logged step: reward, each reward function's mean, KL, mean completion length."""
    if not metrics:
        return "no steps logged yet (metrics.jsonl is empty)"
    cols = [("step", 5), ("reward", 9)] + [(n, max(len(n), 8)) for n in names] + [("kl", 10), ("length", 7)]
    lines = ["  ".join(f"{c:>{w}}" for c, w in cols)]

    def cell(value: Any, width: int, fmt: str) -> str:
        v = _num(value)
        return f"{'-' if v is None else format(v, fmt):>{width}}"

    for m in metrics:
        row = [f"{m.get('step', '-'):>5}", cell(m.get("reward"), 9, ".3f")]
        row += [cell((m.get("rewards") or {}).get(n), w, ".3f") for n, w in cols[2:-2]]
        row += [cell(m.get("kl"), 10, ".5f"), cell(m.get("completion_length"), 7, ".1f")]
        lines.append("  ".join(row))
    return "\n".join(lines)


def _series(metrics: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(m["step"], v) for m in metrics if isinstance(m.get("step"), int) and (v := _num(m.get(key))) is not None]


def reward_chart(run: RunDir) -> str | None:
    """The total reward per logged step as an SVG chart; None when no step was logged."""
    points = _series(run.metrics(), "reward")
    if not points:
        return None
    return line_chart({"reward": points}, title="Mean reward per step (all reward functions, weighted)",
                      y_label="reward")


def charts(metrics: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Reward, each reward function, KL and completion length over the steps."""
    per_func = {n: [(m["step"], v) for m in metrics if isinstance(m.get("step"), int)
                    and (v := _num((m.get("rewards") or {}).get(n))) is not None] for n in names}
    return [
        line_chart({"reward": _series(metrics, "reward")}, title="Mean reward (weighted sum)", y_label="reward"),
        line_chart(per_func, title="Mean reward of each function", y_label="reward"),
        line_chart({"kl": _series(metrics, "kl")}, title="KL to the base model", y_label="KL"),
        line_chart({"mean": _series(metrics, "completion_length")}, title="Completion length", y_label="tokens"),
    ]


# --- HTML ------------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1000px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; margin: 2px 0; font-size: 0.85em; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 6px 10px; }
.fail { color: #b00020; font-weight: bold; } .pass { color: #1b7f3b; }
svg { display: block; margin: 0.5em 0; }
"""


def _table(head: list[str], rows: list[list[str]], text_cols: tuple[int, ...] = ()) -> str:
    """``rows`` hold HTML already escaped."""
    def th(i: int, h: str) -> str:
        return f'<th class="text">{escape(h)}</th>' if i in text_cols else f"<th>{escape(h)}</th>"

    def td(i: int, v: str) -> str:
        return f'<td class="text">{v}</td>' if i in text_cols else f"<td>{v}</td>"

    out = ["<table>", "<tr>" + "".join(th(i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(td(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def _fmt(value: Any, fmt: str = ".4g") -> str:
    v = _num(value)
    return "-" if v is None else format(v, fmt)


def _overview(run: RunDir) -> str:
    summary = run.summary()
    base = run.base_model
    template = run.record.chat_template
    rows = [("run", str(run.root.resolve())), ("base model", base.id),
            ("backend", run.record.backend or "-"),
            ("steps", f"{summary.get('steps', '-')} of {summary.get('max_steps', '-')}"
                      f" (stopped: {summary.get('stop_reason', '-')})"),
            ("wall time", f"{_fmt(summary.get('wall_time_s'), '.0f')} s"),
            ("mean reward, first steps -> last steps", f"{_fmt(summary.get('mean_reward_first'))} -> "
                                                       f"{_fmt(summary.get('mean_reward_last'))} "
                                                       f"(window {summary.get('window', '-')})"),
            ("adapter trained (some lora_B non-zero)", str(summary.get("adapter_trained", "-"))),
            ("steps without reward variance", ", ".join(map(str, summary.get("steps_without_reward_variance") or []))
             or "none"),
            ("system prompt", run.system_prompt or "(none)")]
    if template is not None and template.source == "file":
        rows.append(("chat template", f"from {template.file} (sha256 {str(template.sha256)[:12]})"))
    if run.reasoning_markers:
        rows.append(("reasoning markers", " … ".join(run.reasoning_markers)))
    return "\n".join(["<table>"] + [f'<tr><th class="text">{escape(k)}</th><td class="text">{escape(v)}</td></tr>'
                                     for k, v in rows] + ["</table>"])


def _training_samples(run: RunDir) -> str:
    records = run.samples()
    if not records:
        return ("<p>Training kept no completions (runs before <code>tracking.sample_completions</code> existed, or "
                "set to 0).</p>")
    out = [f"<p>{sum(len(r.get('samples') or []) for r in records)} completions from {len(records)} logged steps, "
           "best reward first within each step.</p>"]
    for i, rec in enumerate(records):
        opened = " open" if i == len(records) - 1 else ""  # the last step shown, the others a click away
        out.append(f"<details{opened}><summary>step {escape(str(rec.get('step')))}</summary>")
        for s in rec.get("samples") or []:
            per = ", ".join(f"{escape(str(k))} {_fmt(v, '.2f')}" for k, v in (s.get("rewards") or {}).items())
            out.append(f"<p>reward <b>{_fmt(s.get('reward'), '.3f')}</b> (advantage {_fmt(s.get('advantage'), '.3f')})"
                       f": {per}</p>")
            out.append(f"<pre>{escape(str(s.get('prompt', '')))}</pre>")
            out.append(f"<pre>{escape(str(s.get('completion', '')))}</pre>")
        out.append("</details>")
    return "\n".join(out)


def _eval(run: RunDir) -> str:
    result = run.eval_result()
    if not result:
        return f"<p>No evaluation yet: <code>grpoctl eval {escape(str(run.root))}</code> writes one.</p>"
    w, b = result.get("with_lora") or {}, result.get("without_lora") or {}
    rows = [["answers in " + escape(str(result.get("language", "?"))), _fmt(b.get("target_language_share"), ".0%"),
             _fmt(w.get("target_language_share"), ".0%")],
            ["answer accuracy", _fmt(b.get("accuracy"), ".0%"), _fmt(w.get("accuracy"), ".0%")]]
    rows += [[f"reward {escape(str(n))}", _fmt((b.get("rewards") or {}).get(n), ".3f"), _fmt(v, ".3f")]
             for n, v in (w.get("rewards") or {}).items()]
    rows.append(["total reward", _fmt(b.get("total_reward"), ".3f"), _fmt(w.get("total_reward"), ".3f")])
    out = [f"<p>{escape(str(result.get('samples')))} prompts, max_new_tokens "
           f"{escape(str(result.get('max_new_tokens')))}, seed {escape(str(result.get('seed')))}.</p>",
           _table(["measure", "without LoRA", "with LoRA"], rows, text_cols=(0,))]
    for ex in result.get("examples") or []:
        out.append("<h3>" + escape(str(ex.get("question", ""))) + "</h3>")
        out.append(f"<p>expected: {escape(str(ex.get('answer', '')))}</p>")
        out.append(f"<p>with LoRA:</p><pre>{escape(str(ex.get('with_lora', '')))}</pre>")
        out.append(f"<p>without LoRA:</p><pre>{escape(str(ex.get('without_lora', '')))}</pre>")
    return "\n".join(out)


def _parity(artifacts: Artifacts) -> str:
    parity = artifacts.parity
    if parity is None:
        return "<p>No GGUF in this export, so no parity measurement.</p>"
    result = '<span class="pass">passed</span>' if parity.passed else '<span class="fail">FAILED</span>'
    out = [f"<p>Each GGUF against {escape(parity.reference)}, teacher-forced on "
           f"{escape(str(parity.probes.get('texts')))} probe texts "
           f"({escape(str(parity.probes.get('positions')))} positions): {result}.</p>"]
    noise = parity.noise_floor
    rows = [[escape(f"(noise floor: {noise.what})"), "", f"{noise.top1 * 100:.1f}%", f"{noise.kl:.5f}", "", "", ""]]
    for name, rec in parity.files.items():
        floor = [f"top-1 >= {rec.floor.top1 * 100:.1f}%"] if rec.floor.top1 is not None else []
        floor += [f"KL <= {rec.floor.kl:g}"] if rec.floor.kl is not None else []
        mark = '<span class="pass">pass</span>' if rec.passed else '<span class="fail">FAIL</span>'
        rows.append([escape(name), escape(rec.type), f"{rec.top1 * 100:.1f}%", f"{rec.kl:.5f}",
                     escape(", ".join(floor)), str(rec.positions), mark])
    out.append(_table(["file", "type", "top-1", "mean KL", "floor", "positions", "result"], rows, text_cols=(0, 4)))
    answers = [["reference", escape(parity.reference_answer)]]
    answers += [[escape(name), escape(rec.answer)] for name, rec in parity.files.items()]
    out.append("<p>Greedy answers to the probe question:</p>")
    out.append(_table(["model", "answer"], answers, text_cols=(0, 1)))
    return "\n".join(out)


def _files(artifacts: Artifacts) -> str:
    rows = [[escape(f.path), escape(f.kind), escape(human_bytes(f.size)), f"<code>{f.sha256[:16]}</code>"]
            for f in sorted(artifacts.files, key=lambda f: f.path)]
    total = human_bytes(sum(f.size for f in artifacts.files))
    return (f"<p>{len(rows)} files, {escape(total)}, in {escape(str(artifacts.root))} "
            f"(sha256 shortened; {ARTIFACTS_FILE} has them whole).</p>"
            + _table(["path", "kind", "size", "sha256"], rows, text_cols=(0, 1, 3)))


def render_html(run: RunDir, artifacts: Artifacts | None, stale: str | None = None) -> str:
    metrics = [m for m in run.metrics() if "reward" in m]
    names = reward_names(run, metrics)
    table_rows = [[str(m.get("step", "-")), _fmt(m.get("reward"), ".3f"),
                   *[_fmt((m.get("rewards") or {}).get(n), ".3f") for n in names],
                   _fmt(m.get("kl"), ".5f"), _fmt(m.get("completion_length"), ".1f")] for m in metrics]
    title = f"grpoctl report: {run.root.resolve().name}"
    body = [f"<h1>{escape(title)}</h1>", _overview(run), "<h2>Training curves</h2>"]
    body += charts(metrics, names) if metrics else ["<p>No step was logged yet.</p>"]
    body += ["<h2>Per step</h2>",
             _table(["step", "reward", *names, "KL", "completion length"], table_rows) if metrics else "",
             "<h2>Completions from training</h2>", _training_samples(run),
             "<h2>Evaluation (grpoctl eval)</h2>", _eval(run), "<h2>Export</h2>"]
    if artifacts is None:
        body.append(f"<p>No export yet: <code>grpoctl export {escape(str(run.root))}</code> writes one.</p>")
    else:
        if stale:
            body.append(f'<p class="warn">{escape(stale)}</p>')
        body += ["<h3>Parity against the trained model</h3>", _parity(artifacts), "<h3>Artifacts</h3>",
                 _files(artifacts)]
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    body.append(f"<p><small>Written by grpoctl {escape(__version__)} at {created}.</small></p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n" + GENERATOR + "\n"
            f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def _find_export(run: RunDir, export_dir: Path | None) -> Artifacts | None:
    if export_dir is not None:
        return Artifacts.load(Path(export_dir))  # named: its absence is an error
    if (run.export_dir / ARTIFACTS_FILE).is_file():
        return Artifacts.load(run.export_dir)
    return None


@dataclass
class ReportOptions:
    """What ``grpoctl report`` takes besides the run (``write_report``'s keyword arguments, as flags)."""

    output: Path | None = option(short="-o", metavar="FILE", click_type=click.Path(path_type=Path, dir_okay=False),
                                 help="Where the HTML report goes (default: RUN/report.html).")
    export_dir: Path | None = option(aliases=("--export",), metavar="DIR",
                                     help="The export to include (default: RUN/export, when there is one).")


def write_report(run: RunDir | Path, output: Path | None = None, export_dir: Path | None = None) -> WrittenReport:
    """Write the HTML report of ``run`` (default ``RUN/report.html``) and return it with the per-step table."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    path = Path(output) if output is not None else run.root / REPORT_FILE
    if path.exists() and (path.is_dir() or GENERATOR not in path.read_text(encoding="utf-8", errors="replace")):
        raise OutputExistsError(f"{path} exists and is not a report grpoctl wrote; choose another file with -o")
    artifacts = _find_export(run, export_dir)
    notes = []
    stale = artifacts.stale() if artifacts is not None else None
    if stale:
        notes.append(stale)
    if artifacts is None:
        notes.append(f"no export in {run.export_dir}: the report has no parity or artifact tables")
    html = render_html(run, artifacts, stale)
    with staged_file(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    metrics = [m for m in run.metrics() if "reward" in m]
    return WrittenReport(path=path, table=format_table(metrics, reward_names(run, metrics)), notes=notes)
