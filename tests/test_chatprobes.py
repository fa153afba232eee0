"""What the probes carry of a system prompt: all of an ordinary one, the start of a huge one (with its length)."""

from __future__ import annotations

from grpoctl.chatprobes import PROBE_SYSTEM_CHARS, probe_system_prompt


def test_an_ordinary_system_prompt_is_carried_whole():
    prompt = "You are a careful math tutor.\nEnd with #### N."
    assert probe_system_prompt(prompt) == (prompt, None)
    assert probe_system_prompt("x" * PROBE_SYSTEM_CHARS) == ("x" * PROBE_SYSTEM_CHARS, None)


def test_a_huge_system_prompt_is_cut_to_its_start_and_its_length_reported():
    prompt = "Rule.\n" * 20_000  # 120 KB
    carried, full = probe_system_prompt(prompt)
    assert carried == prompt[:PROBE_SYSTEM_CHARS] and full == len(prompt)
