"""The parity report: the section artifacts.json records, parity.json, and the table and notes people read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpoctl.artifacts import NoiseFloor, ParityResult, ParitySection
from grpoctl.export.parity.reference import ParityReference
from grpoctl.export.parity.scoring import MIN_CONFIDENCE, NOISE_FLIP_MARGIN, NOISE_KL_MARGIN
from grpoctl.jsonfiles import to_json


def report(ref: ParityReference, files: dict[str, ParityResult]) -> ParitySection:
    """The parity section of an export: the reference, its probes and noise floor, and every file's result."""
    kinds: dict[str, int] = {}
    for p in ref.probes:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return ParitySection(
        reference=ref.description,
        probes={"texts": len(ref.probes), "positions": ref.noise["positions"], "kinds": kinds,
                "system_prompt": ref.system_prompt,
                **({"system_prompt_cut": f"the first {len(ref.system_prompt)} of {ref.system_prompt_chars} "
                                         "characters"} if ref.system_prompt_chars else {})},
        noise_floor=NoiseFloor(what="the reference in bf16 vs float32", top1=round(ref.noise["top1"], 5),
                               kl=round(ref.noise["kl"], 6)),
        reference_confidence=round(ref.confidence, 4),
        top1_gated=ref.confidence >= MIN_CONFIDENCE,
        reference_answer=ref.answer,
        files=files,
        passed=all(f.passed for f in files.values()),
    )


def format_table(rep: ParitySection) -> str:
    """The parity table printed after the measurements: one row per file against the noise floor, then notes."""
    noise = rep.noise_floor
    lines = [f"{'file':44} {'top-1':>7} {'mean KL':>9} {'floor':>14} {'tokens':>6}  result",
             f"{'(noise floor: bf16 vs f32)':44} {noise.top1 * 100:6.1f}% {noise.kl:9.5f}"]
    for name, f in rep.files.items():
        fl = f.floor
        floor = (f">={fl.top1 * 100:.1f}%" if fl.top1 is not None else "") + \
            (f" <={fl.kl:.3g}" if fl.kl is not None else "") + ("*" if fl.basis == "noise" else "")
        tok = "ok" if f.tokenizer["ok"] else "BAD"
        lines.append(f"{name:44} {f.top1 * 100:6.1f}% {f.kl:9.5f} {floor:>14} {tok:>6}  "
                     + ("pass" if f.passed else "FAIL"))
    if any(f.floor.basis == "noise" for f in rep.files.values()):
        lines.append(f"* floor lowered to this model's own rounding noise: the flips bf16 rounding causes here, scaled "
                     f"to the file's KL, x{NOISE_FLIP_MARGIN:g}; KL up to x{NOISE_KL_MARGIN:g} the bf16 noise")
    if not rep.top1_gated:
        lines.append(f"top-1 not gated: the reference's mean top-1 probability is {rep.reference_confidence:.3f} "
                     f"(< {MIN_CONFIDENCE}), too flat for argmax agreement to mean anything; KL is gated")
    lines.append(f"probes: {rep.probes['texts']} texts, {rep.probes['positions']} positions "
                 f"({', '.join(f'{k} {v}' for k, v in rep.probes['kinds'].items())})")
    lines.append(f"greedy answer, transformers: {rep.reference_answer!r}")
    for name, f in rep.files.items():
        lines.append(f"greedy answer, {name}: {f.answer!r}")
    for name, f in rep.files.items():
        lines += [f"{name}: {line}" for line in template_lines(f.tokenizer.get("template"))]
    return "\n".join(lines)


def template_lines(check: Any) -> list[str]:
    """What the chat template check found, for people: skipped (why), failed (which conversation), or the
    departures of llama.cpp's chat layer it passed."""
    if not isinstance(check, dict):
        return [f"chat template {check}"] if check == "missing from the GGUF" else []
    if check.get("skipped"):
        return [f"{check['skipped']}; not checked"]
    if check.get("error"):
        return [f"chat template not checked, llama-server failed: {check['error']}"]
    lines, gone, engine = [], check["departures"], check["engine_departures"]
    if gone:  # the first in full, the others by name (parity.json has every render)
        d = gone[0]
        lines.append(f"chat template departs from transformers on conversation {d['name']!r}: transformers renders "
                     f"{d['expected']!r}, llama.cpp renders {d['got']!r}")
        if gone[1:]:
            lines.append(f"chat template departs on {', '.join(repr(d['name']) for d in gone[1:])} too")
    if engine:
        lines.append(f"llama.cpp's chat layer renders {', '.join(repr(d['name']) for d in engine)} unlike "
                     "transformers for the trained template too: llama.cpp's difference, not the file's "
                     "(parity.json has both renders)")
    return lines


def unchecked_template_note(files: dict[str, ParityResult]) -> str | None:
    """The summary's note for the GGUFs (``{name: ParityResult}``) whose chat template llama.cpp did not
    render because its tools are not built: the table's per-file line is easy to miss among passes."""
    skipped = [name for name, f in files.items()
               if isinstance(t := f.tokenizer.get("template"), dict) and t.get("skipped")]
    if not skipped:
        return None
    return (f"note: chat template of {', '.join(skipped)} NOT checked against llama.cpp's chat engine (its tools "
            "are not built): `grpoctl doctor --build-llama-tools` builds them once, then export again with --force")


def write_report(rep: ParitySection, path: Path, conversion: dict[str, Any] | None = None) -> Path:
    """parity.json: the section as artifacts.json keeps it, plus the conversion's own figures (``conversion``)."""
    from grpoctl.fsutil import staged_file

    data = to_json(rep) | ({"conversion": conversion} if conversion is not None else {})
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    path.chmod(0o644)
    return path
