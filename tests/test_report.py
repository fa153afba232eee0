"""``grpoctl report`` on a synthetic run directory (and export) written the way train, eval and export write them."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.artifacts import Artifacts, NoiseFloor, ParityFloor, ParityResult, ParitySection
from grpoctl.cli import cli
from grpoctl.errors import InputNotFoundError, OutputExistsError
from grpoctl.report import reward_chart, write_report

REWARDS = ["format_exact", "format_approx", "answer", "numbers", "language"]
STEPS = [  # reward, per-function rewards, kl, completion length: what the demo's four steps logged
    (-8.5, [0.0, -2.0, -2.0, -1.5, -3.0], 0.0, 32.0),
    (-3.25, [0.0, -2.0, -2.0, -1.75, 2.5], 0.0, 32.0),
    (-7.0, [0.0, -2.0, -2.0, -1.5, -1.5], 0.00354, 31.5),
    (-8.5, [0.0, -2.0, -2.0, -1.5, -3.0], 0.00568, 30.25),
]


def make_run(root: Path, *, samples: bool = True, eval_: bool = True) -> Path:
    root.mkdir(parents=True)
    meta = {"base_model": {"id": "embedded:SmolLM2-135M-Instruct", "path": str(root / "base"), "revision": None},
            "backend": "trl", "reasoning": {"start": "<think>", "end": "</think>"},
            "config": {"data": {"system_prompt": "Think in Indonesian."}, "lora": {"r": 8},
                       "rewards": {"functions": REWARDS, "weights": {}}}}
    (root / "run.json").write_text(json.dumps(meta))
    with open(root / "metrics.jsonl", "w") as fh:
        for step, (reward, per, kl, length) in enumerate(STEPS, 1):
            fh.write(json.dumps({"step": step, "reward": reward, "kl": kl, "completion_length": length,
                                 "rewards": dict(zip(REWARDS, per, strict=True))}) + "\n")
    (root / "summary.json").write_text(json.dumps({"steps": 4, "max_steps": 4, "stop_reason": "max_steps",
                                                   "mean_reward_first": -5.875, "mean_reward_last": -7.75,
                                                   "window": 2, "adapter_trained": True}))
    if samples:
        with open(root / "samples.jsonl", "w") as fh:
            for step in range(1, 5):
                fh.write(json.dumps({"step": step, "samples": [
                    {"prompt": "What is 9 + 5?", "completion": f"<think>sembilan</think> step {step} <b>14</b>",
                     "reward": 2.5, "rewards": {"language": 2.5}, "advantage": 1.0},
                    {"prompt": "What is 9 + 5?", "completion": f"worst of step {step}", "reward": -3.0,
                     "rewards": {"language": -3.0}, "advantage": -1.0}]}) + "\n")
    if eval_:
        side = {"target_language_share": 0.5, "accuracy": 0.25, "rewards": {"answer": 1.0}, "total_reward": 1.0}
        (root / "eval.json").write_text(json.dumps({
            "samples": 5, "seed": 3407, "max_new_tokens": 32, "language": "id", "with_lora": side,
            "without_lora": {**side, "accuracy": 0.0},
            "examples": [{"question": f"Q{i} & <x>", "answer": str(i), "with_lora": f"lora answer {i}",
                          "without_lora": f"base answer {i}"} for i in range(5)]}))
    return root


def add_export(run: Path, *, passed: bool = True) -> Artifacts:
    out = run / "export"
    (out / "gguf").mkdir(parents=True)
    gguf = out / "gguf" / "tiny-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    artifacts = Artifacts(root=out)
    artifacts.add_file(gguf, "gguf:q4_k_m")
    artifacts.parity = ParitySection(
        reference="base + adapter applied by PEFT in transformers (float32, cpu)",
        probes={"texts": 9, "positions": 520}, noise_floor=NoiseFloor(what="bf16 vs f32", top1=0.983, kl=0.0016),
        reference_confidence=0.5, top1_gated=True, reference_answer="Alas, 9 + 5 = 12.",
        files={gguf.name: ParityResult(type="q4_k_m", top1=0.904, kl=0.06344, positions=520,
                                       floor=ParityFloor(top1=0.85, kl=0.15), passed=passed, tokenizer={},
                                       answer="Alas, 9 + 5 = 15.")},
        passed=passed)
    artifacts.save()
    return artifacts


class _Collect(HTMLParser):
    """The report's text and its elements, parsed by the standard library's HTML parser."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    return p


def test_report_prints_every_step_with_each_reward_kl_and_length(tmp_path):
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    head = lines[0].split()
    assert head == ["step", "reward", *REWARDS, "kl", "length"]
    rows = [line.split() for line in lines[1:5]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert rows[1] == ["2", "-3.250", "0.000", "-2.000", "-2.000", "-1.750", "2.500", "0.00000", "32.0"]
    assert rows[3][-2:] == ["0.00568", "30.2"]
    assert lines[-1] == f"grpoctl: wrote {run / 'report.html'}"


def test_report_html_is_self_contained_with_plots_samples_and_eval_answers(tmp_path):
    run = make_run(tmp_path / "run")
    html = write_report(run).path.read_text()
    parsed = _parse(html)
    assert not {"script", "link", "img", "iframe"} & set(parsed.tags)  # nothing to fetch, nothing to run
    assert not re.search(r"(src|href)=\"https?:", html)
    svgs = re.findall(r"<svg .*?</svg>", html, flags=re.S)
    assert len(svgs) == 4  # reward, each function, KL, completion length
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML, so it renders standalone too
    per_function = ET.fromstring(svgs[1])
    ns = "{http://www.w3.org/2000/svg}"
    assert [g.find(f"{ns}title").text for g in per_function.iter(f"{ns}g")] == REWARDS
    text = "".join(parsed.text)
    assert "worst of step 4" in text and "<think>sembilan</think> step 1 <b>14</b>" in text  # escaped, not markup
    for i in range(5):
        assert f"lora answer {i}" in text and f"base answer {i}" in text
    assert "Q0 & <x>" in text
    assert "No export yet" in text


def test_report_lists_the_exports_parity_and_files(tmp_path):
    run = make_run(tmp_path / "run")
    add_export(run, passed=False)
    text = "".join(_parse(write_report(run).path.read_text()).text)
    assert "tiny-Q4_K_M.gguf" in text and "90.4%" in text and "0.06344" in text and "FAIL" in text
    assert "bf16 vs f32" in text and "Alas, 9 + 5 = 15." in text and "gguf:q4_k_m" in text


def test_a_run_without_samples_or_eval_still_reports_and_says_what_is_missing(tmp_path):
    run = make_run(tmp_path / "run", samples=False, eval_=False)
    text = "".join(_parse(write_report(run, output=tmp_path / "r.html").path.read_text()).text)
    assert "kept no completions" in text and f"grpoctl eval {run}" in text


def test_a_half_written_last_metrics_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rew')  # a writer killed mid-line
    assert len(write_report(run).table.splitlines()) == 1 + len(STEPS)


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path):
    run = make_run(tmp_path / "run")
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    with pytest.raises(OutputExistsError):
        write_report(run, output=mine)
    assert mine.read_text() == "<p>my notes</p>"
    write_report(run)
    write_report(run)  # its own earlier report is replaced


def test_report_of_something_that_is_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == InputNotFoundError.exit_code
    assert result.stderr.strip().startswith("grpoctl: ") and "\n" not in result.stderr.strip()


def test_reward_chart_draws_the_logged_rewards(tmp_path):
    from grpoctl.rundir import RunDir

    svg = ET.fromstring(reward_chart(RunDir(make_run(tmp_path / "run"))))
    ns = "{http://www.w3.org/2000/svg}"
    points = [(float(c.get("cx")), float(c.get("cy"))) for c in svg.iter(f"{ns}circle")]
    assert len(points) == len(STEPS)
    xs, ys = zip(*points, strict=True)
    assert list(xs) == sorted(xs)
    # SVG y grows downwards: the best step (2, -3.25) is highest, the two -8.5 steps lowest and level
    assert min(ys) == ys[1] and ys[0] == ys[3] == max(ys)
