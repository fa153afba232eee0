"""The fixed probe texts parity reads on both sides, and their token ids as transformers makes them.

Prose, math, code, and chat conversations rendered by the model's own template with the training system
prompt; the same ids go to the reference and to llama.cpp (teacher-forced), so the two are compared on
exactly the same tokens. The calibration text of an importance matrix must hold none of them
(``grpoctl.export.imatrix.probe_texts``): the gain is measured on text the matrix never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the chat probes' system prompt when the run records none (an adapter folder exported on its own)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step, then give the final answer."
MAX_PROBE_TOKENS = 192  # each probe is cut here: llama.cpp's context, and the reference's batch, stay small
GREEDY_TOKENS = 40  # the greedy answers set side by side: enough to see that they agree

PROSE = [
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
    "had done before him. From the top he could see the harbour lights flicker on one by one, and the fishing "
    "boats returning with the tide.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, "
    "using sunlight, produce glucose and release oxygen as a by-product of the reaction.",
]

MATH = [
    "Question: A baker makes 24 muffins and sells 3 boxes of 6 muffins each. How many muffins are left?\n"
    "Answer: The baker sells 3 * 6 = 18 muffins. 24 - 18 = 6 muffins are left.\n#### 6",
    "Question: Tom has 15 apples. He gives 4 to Anna and buys 7 more. How many apples does he have?\n"
    "Answer: 15 - 4 = 11. 11 + 7 = 18.\n#### 18",
]

CODE = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "import json\n\nwith open('config.json') as f:\n    config = json.load(f)\nfor key, value in config.items():\n"
    "    print(f'{key} = {value}')\n",
]

CHATS = [
    ("What is 12 + 7?", "12 + 7 = 19. The answer is 19."),
    ("A train travels 60 km per hour for 3 hours. How far does it go?",
     "Distance is speed times time: 60 * 3 = 180. It travels 180 km."),
    ("Write one sentence about the sea.", "The sea stretches to the horizon, calm and silver under the morning sun."),
]

GREEDY_QUESTION = "What is 9 + 5? Answer briefly."


@dataclass
class Probe:
    kind: str
    ids: list[int]


def conversation(system_prompt: str, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    """The system prompt, one user turn and (when given) the assistant's answer, as chat messages."""
    msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` through the tokenizer's chat template, as text."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # some templates reject a system turn: fold it into the first user message
        folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
        return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=add_generation_prompt)


def build_probes(tokenizer: Any, system_prompt: str) -> list[Probe]:
    """The fixed probe set as token ids, exactly as transformers tokenises them (BOS as the tokenizer adds it)."""
    probes: list[Probe] = []
    for kind, texts in (("prose", PROSE), ("math", MATH), ("code", CODE)):
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_PROBE_TOKENS]
            probes.append(Probe(kind, ids))
    if getattr(tokenizer, "chat_template", None):
        for user, assistant in CHATS:
            text = render(tokenizer, conversation(system_prompt, user, assistant), False)
            # the rendered template already holds every special token it wants (BOS included)
            probes.append(Probe("chat", tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROBE_TOKENS]))
    return probes
