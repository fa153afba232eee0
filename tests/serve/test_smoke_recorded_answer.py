"""The smoke chat holds the served model to the greedy answer the export recorded for that file.

Export's parity check asks each GGUF one question greedily in llama.cpp (with the parity system prompt, the
prompt rendered by transformers) and records the answer in parity.json / artifacts.json. `serve --smoke` asks
the same question through the server (its chat template, its sampling) and compares: a server that renders
another prompt, or a file that is not the one measured, answers otherwise. An answer that only repeats the
system prompt fails with or without a record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpoctl.serve.api import ServeOptions, serve
from grpoctl.serve.common import SmokeResult
from tests.manifests.conftest import gguf_with_template
from tests.serve.exports import SYSTEM_PROMPT, make_export, write_run

NAME = "SmolLM2-135M-Instruct-Q4_1.gguf"
# a wrong template: the system turn only, the question dropped
NO_QUESTION = ("{% for m in messages %}{% if m['role'] == 'system' %}<|im_start|>system\n{{ m['content'] }}"
               "<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def recorded(smollm2_dir, smol_gguf) -> str:
    """The answer export records for the SmolLM2 file: parity's own greedy decode in llama.cpp of the parity
    question, on the ids transformers renders for it with the run's system prompt."""
    from transformers import AutoTokenizer

    from grpoctl.export.parity.llamacpp import greedy_gguf, open_gguf
    from grpoctl.export.parity.probes import GREEDY_QUESTION, conversation, render

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = render(tok, conversation(SYSTEM_PROMPT, GREEDY_QUESTION), True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = open_gguf(smol_gguf, 512)
    try:
        return greedy_gguf(llm, ids)
    finally:
        llm.close()


def _export(root: Path, gguf: Path, answer: str) -> Path:
    """A run whose export holds ``gguf`` as its q4_1 file, with ``answer`` recorded for it as parity records."""
    run = write_run(root)
    make_export(run / "export", {"q4_1": gguf})
    path = run / "export" / "artifacts.json"
    data = json.loads(path.read_text())
    data["parity"] = {
        "reference": "base + adapter applied by PEFT", "probes": {"system_prompt": SYSTEM_PROMPT},
        "noise_floor": {"what": "bf16 vs float32", "top1": 0.98, "kl": 0.001}, "reference_confidence": 0.5,
        "top1_gated": True, "reference_answer": answer, "passed": True,
        "files": {NAME: {"type": "q4_1", "top1": 0.9, "kl": 0.05, "positions": 900, "passed": True,
                         "floor": {"top1": 0.8, "kl": 0.2}, "tokenizer": {"ok": True}, "answer": answer}}}
    path.write_text(json.dumps(data))
    return run


def _smoke(run: Path) -> tuple[int, str]:
    lines: list[str] = []
    code = serve(ServeOptions(source=run, port=0, smoke=True, max_tokens=16), echo=lines.append)
    return code, "\n".join(lines)


def test_the_served_greedy_answer_equals_the_one_the_export_recorded(tmp_path, smol_gguf, recorded):
    code, out = _smoke(_export(tmp_path / "run", smol_gguf, recorded))
    assert code == 0, out
    assert f"recorded: {recorded!r} (same)" in out and out.endswith("smoke: ok")


def test_a_gguf_whose_template_drops_the_question_fails_the_smoke(tmp_path, smol_gguf, recorded):
    template = tmp_path / "no-question.jinja"
    template.write_text(NO_QUESTION)
    wrong = gguf_with_template(smol_gguf, template, tmp_path / "wrong" / NAME)
    code, out = _smoke(_export(tmp_path / "run", wrong, recorded))
    assert code == 1, out
    assert "(DIFFERENT)" in out
    assert out.endswith("smoke: FAILED (the served greedy answer differs from the one the export recorded for "
                        "this file)")


def test_an_answer_that_only_echoes_the_system_prompt_fails_even_without_a_record():
    echo = SmokeResult(engine="llama.cpp", model="m", system_prompt=SYSTEM_PROMPT, question="2+2?",
                       answer=f"\n{SYSTEM_PROMPT}\n\n{SYSTEM_PROMPT}\n")
    assert not echo.ok and echo.report().endswith("smoke: FAILED (the answer only repeats the system prompt)")
    real = SmokeResult(engine="llama.cpp", model="m", system_prompt=SYSTEM_PROMPT, question="2+2?",
                       answer=f"{SYSTEM_PROMPT}\nAnswer: 4")
    assert real.ok
