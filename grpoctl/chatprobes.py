"""The conversations on which two renderers of one chat template must agree, shared by every template check.

The Ollama Modelfile check (Go's text/template against transformers), Ollama's native render (llama.cpp's engine
against transformers) and the export's parity check of the GGUF's embedded template all probe the same hard
cases: message text with leading/trailing whitespace, renders on two calendar days, whitespace after the
reasoning end marker, the think flag on and off, and system messages even where a template rejects them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Opening reasoning markers a template may use; the closing one is "</" + the rest.
THINK_OPEN_TAGS = ("<think>", "<thinking>", "<reasoning>")

# Two fixed days some conversations are rendered on (the others see the real clock, as the probe did): a
# template that writes the current date (strftime_now) renders them differently, and a Go TEMPLATE cannot
# follow the calendar, so the check fails it.
CHECK_DAYS = ("2024-02-29", "2031-11-05")


# What the parity probes carry of a system prompt. They check that the GGUF computes and renders like the
# reference, which a prompt's first lines exercise as well as all of it; a whole 100 KB prompt would only make
# llama.cpp evaluate a 100k-token context per file (minutes on a CPU) and push the conversation's own turns out
# of the probes' token budget. The parity report says when the prompt was cut.
PROBE_SYSTEM_CHARS = 512


def probe_system_prompt(system_prompt: str) -> tuple[str, int | None]:
    """The part of ``system_prompt`` the probes carry, and the prompt's full length in characters when that is
    not all of it (None when it is)."""
    if len(system_prompt) <= PROBE_SYSTEM_CHARS:
        return system_prompt, None
    return system_prompt[:PROBE_SYSTEM_CHARS], len(system_prompt)


@dataclass
class Conversation:
    name: str
    messages: list[dict[str, str]]  # HF form
    think: bool | None = None  # Ollama's request flag; HF enable_thinking=<think> when set
    day: str | None = None  # the day both renderers see (None: the real clock)
    shape: str = "plain"  # which kind of probe (SHAPE_MEANING)

    @property
    def ends_with_user(self) -> bool:
        return self.messages[-1]["role"] == "user"


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def conversations(system_prompt: str | None = None, markers: tuple[str, str] | None = None) -> list[Conversation]:
    """The conversations two renderers of one chat template must agree on (reasoning shapes with ``markers``).

    Plain shapes: system + user, multi-turn with and without system, a prefilled assistant turn (Ollama's
    continuation; HF ``continue_final_message``). Hard shapes, where translations break: message text with
    leading/trailing whitespace and line breaks, renders on two different days, reasoning followed by
    whitespace before the answer (in the history and in a continued last turn), the think flag on and off,
    and system messages even where the template rejects them (both renderers must then refuse).
    """
    sys = system_prompt or "You are a careful math tutor. Answer with \"#### <number>\"."
    q1, a1 = "What is 12 * 7?", "12 * 7 = 84.\n#### 84"
    q2 = "And 84 / 4? Use 'quotes', \"double\" and a {{ brace }}."
    multi = _msgs(("system", sys), ("user", q1), ("assistant", a1), ("user", q2))
    convs = [
        Conversation("user", _msgs(("user", q1))),
        Conversation("system+user", _msgs(("system", sys), ("user", q1)), shape="system"),
        Conversation("multi-turn", multi, shape="system"),
        Conversation("multi-turn-no-system", multi[1:]),
        Conversation("prefill-assistant", _msgs(("system", sys), ("user", q1), ("assistant", "12 * 7 ="))),
        Conversation("whitespace", _msgs(("system", "  Be terse.\n"), ("user", "\n  What is 12 * 7?  \n\n"),
                                         ("assistant", "  84\n"), ("user", "And 84 / 4?\n")), shape="whitespace"),
        Conversation("whitespace-no-system", _msgs(("user", "  What is 12 * 7?\n"), ("assistant", "\n84  "),
                                                   ("user", "\tAnd 84 / 4? ")), shape="whitespace"),
    ]
    convs += [Conversation(f"{c.name}@{day}", c.messages, day=day, shape="date")
              for day in CHECK_DAYS for c in convs[:2]]
    if markers:
        o, c = markers
        for sep in ("", "\n\n "):
            reasoned = f"{o}\nMultiply 12 by 7.\n{c}{sep}12 * 7 = 84.\n#### 84"
            tag = "" if not sep else "-whitespace-after-end"
            convs += [Conversation(f"reasoning-in-history{tag}", _msgs(("user", q1), ("assistant", reasoned),
                                                                      ("user", q2)), shape="reasoning"),
                      Conversation(f"reasoning-last-turn{tag}", _msgs(("user", q1), ("assistant", reasoned)),
                                   shape="reasoning")]
    for think in (True, False):
        flag = "on" if think else "off"
        convs += [Conversation(f"think-{flag}-{c.name}", c.messages, think=think, shape="think")
                  for c in convs if c.name in ("user", "multi-turn", "reasoning-in-history")]
    return convs
