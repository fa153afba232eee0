"""What both engines share: the smoke probe, the served model's name, and the result of a smoke chat."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A grade-school word problem with one numeric answer (16), in the style the shipped dataset trains on;
# its answer makes a broken template or a garbled model obvious at a glance.
DEFAULT_PROBE = ("A baker fills 3 trays with 12 muffins each and sells 20 muffins. "
                 "How many muffins are left?")
DEFAULT_SMOKE_MAX_TOKENS = 256


@dataclass(frozen=True)
class RecordedAnswer:
    """The greedy answer the export recorded for a GGUF file (parity.json, ``files[<name>].answer``): what
    llama.cpp answered the parity question, with the parity system prompt, at temperature 0."""

    system_prompt: str
    question: str
    answer: str
    max_tokens: int


@dataclass
class SmokeResult:
    engine: str
    model: str
    system_prompt: str | None
    question: str
    answer: str
    finish_reason: str | None = None
    reasoning_markers: tuple[str, str] | None = None
    recorded: RecordedAnswer | None = None  # what the export recorded for this file
    greedy: str | None = None  # the served greedy answer to the recorded question

    @property
    def echoes_system_prompt(self) -> bool:
        """The answer is nothing but the system prompt (once or more) and whitespace: a template that puts the
        system prompt where the reply goes, or a model that only repeats its context."""
        if not self.system_prompt or not self.system_prompt.strip():
            return False
        said, prompt = " ".join(self.answer.split()), " ".join(self.system_prompt.split())
        return bool(said) and not said.replace(prompt, " ").strip()

    @property
    def matches_recorded(self) -> bool | None:
        """The served greedy answer equals the one the export recorded for this file; None: nothing recorded."""
        if self.recorded is None:
            return None
        return (self.greedy or "").strip() == self.recorded.answer.strip()

    @property
    def ok(self) -> bool:
        return bool(self.answer.strip()) and not self.echoes_system_prompt and self.matches_recorded is not False

    def failure(self) -> str:
        if not self.answer.strip():
            return "empty answer"
        if self.echoes_system_prompt:
            return "the answer only repeats the system prompt"
        return "the served greedy answer differs from the one the export recorded for this file"

    def report(self) -> str:
        lines = [f"smoke chat ({self.engine}, model {self.model})"]
        if self.system_prompt:
            lines.append(f"  system: {_one_line(self.system_prompt)}")
        lines.append(f"  user:   {self.question}")
        lines.append("  answer: " + (self.answer.strip().replace("\n", "\n          ") or "<empty>"))
        if self.finish_reason:
            lines.append(f"  finish: {self.finish_reason}")
        if self.reasoning_markers:
            start, end = self.reasoning_markers
            seen = start in self.answer or end in self.answer
            lines.append(f"  reasoning markers {start}...{end}: {'present' if seen else 'absent'}")
        if self.recorded is not None:
            lines.append(f"greedy check (temperature 0, {self.recorded.max_tokens} tokens, the export's parity "
                         f"question {self.recorded.question!r}):")
            lines.append(f"  served:   {(self.greedy or '').strip()!r}")
            lines.append(f"  recorded: {self.recorded.answer.strip()!r} "
                         f"({'same' if self.matches_recorded else 'DIFFERENT'})")
        lines.append("smoke: ok" if self.ok else f"smoke: FAILED ({self.failure()})")
        return "\n".join(lines)


def chat_messages(system_prompt: str | None, question: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def default_model_name(stem: str, quant: str | None) -> str:
    """``SmolLM2-135M-Instruct-Q4_1.gguf`` -> ``smollm2-135m-instruct:q4_1``: a name Ollama accepts and
    the alias llama.cpp's server reports in /v1/models."""
    base = stem
    if quant and base.lower().endswith("-" + quant.lower()):
        base = base[: -len(quant) - 1]
    base = re.sub(r"[^a-z0-9_.-]+", "-", base.lower()).strip("-.") or "grpoctl-model"
    if not re.match(r"[a-z0-9_]", base):
        base = "m" + base
    base = re.sub(r"\.{2,}", ".", base)[:80]
    return f"{base}:{quant.lower()}" if quant else base
