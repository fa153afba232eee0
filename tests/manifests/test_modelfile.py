"""Ollama's Modelfile format: what the writer quotes survives the parser, and the parser reads Modelfiles as
Ollama's ``parser/parser.go`` does."""

from __future__ import annotations

import pytest

from grpoctl.errors import UsageError
from grpoctl.manifests.modelfile import Modelfile, commands, parse_modelfile, quote_value

HOSTILE = [
    'Say "hi"',
    'ends with a quote"',
    '"starts with a quote',
    '""starts with two quotes',
    'triple """ inside',
    'line one\nline two ends "quoted"\nthird',
    'has """ inside and a line end"\nand more',
    "back\\slash \\n not a newline \\\"",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF lines",
    "PARAMETER temperature 0\nFROM /etc/passwd",
    "# not a comment",
    "{{ .System }} and }} and {{",
    "unicode ｜▁ ✓ ok",
    "",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_system_prompt_round_trips(value):
    text = Modelfile(from_="./m-Q4_K_M.gguf", system=value or None,
                     parameters={"stop": ["<|im_end|>"], "num_ctx": 2048, "temperature": 0.7}).render()
    cmds = commands(text)
    assert cmds[0] == ("model", "./m-Q4_K_M.gguf")
    systems = [v for c, v in cmds if c == "system"]
    assert systems == ([value] if value else [])
    assert ("stop", "<|im_end|>") in cmds and ("num_ctx", "2048") in cmds and ("temperature", "0.7") in cmds
    assert [c for c, _ in cmds].count("model") == 1  # nothing smuggled in a second FROM


def test_template_with_quotes_and_newlines_round_trips():
    tmpl = '{{ if eq $m.Role "user" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n{{ end }}'
    cmds = commands(Modelfile(from_="./x.gguf", template=tmpl).render())
    assert ("template", tmpl) in cmds


def test_value_no_quoting_can_carry_is_refused():
    # a line ending in """ rules out triple quotes; a line ending in " rules out double quotes
    for value in ('a """\nb "\nc', 'has """ at a line end"""\nand more'):
        with pytest.raises(UsageError, match="cannot be written into a Modelfile"):
            quote_value(value, "the system prompt")


@pytest.mark.parametrize("value", ["nul\x00byte", "escape \x1b[31m", "zero\u200bwidth", "nbsp\u00a0"])
def test_characters_the_parser_drops_are_refused(value):
    with pytest.raises(UsageError, match="drops"):
        quote_value(value, "the system prompt")


def test_parser_model_is_strict_enough_to_catch_naive_quoting():
    """Sanity check of the parser: naive double quoting of a value with a quoted line end breaks."""
    naive = 'FROM ./x.gguf\nSYSTEM "line "one"\nmore"\n'
    with pytest.raises(UsageError):
        commands(naive)


def test_multiline_quotes_repeated_stops_and_typed_parameters():
    mf = parse_modelfile('''# comment line
FROM ./model-Q4_K_M.gguf
template """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM You are terse.
PARAMETER stop "<|im_end|>"
PARAMETER stop <|endoftext|>
PARAMETER num_ctx 2048
PARAMETER min_p 0.1
PARAMETER use_mmap true
MESSAGE user "What is 1+1?"
MESSAGE assistant 2
LICENSE """Apache-2.0"""
''')
    assert mf.from_ == "./model-Q4_K_M.gguf"
    assert mf.template == ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                           "<|im_start|>assistant\n")
    assert mf.system == "You are terse."
    assert mf.parameters == {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048, "min_p": 0.1,
                             "use_mmap": True}
    assert mf.messages == [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]
    assert mf.license == ["Apache-2.0"]


@pytest.mark.parametrize(("text", "match"), [
    ("FROM x.gguf\nTEMPLATE \"\"\"never closed\n", "unterminated quote"),
    ("FROM x.gguf\nPROMPT hi\n", "unknown command 'PROMPT'"),
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM x.gguf\nPARAMETER num_ctx lots\n", "num_ctx expects int"),
    ("FROM x.gguf\nMESSAGE tool hi\n", "MESSAGE role"),
])
def test_malformed_modelfiles_fail_with_the_reason(text, match):
    with pytest.raises(UsageError, match=match):
        parse_modelfile(text)


def test_every_command_written_reads_back_as_written():
    mf = Modelfile(from_="./m-Q4_K_M.gguf", template='{{ if .System }}"{{ .System }}"\n{{ end }}',
                   system="line one\nends in a quote\"", adapters=["./lora.gguf"],
                   parameters={"stop": ["<|im_end|>", " spaced "], "num_ctx": 2048, "temperature": 0.7},
                   messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                   license=["Apache-2.0", "NOTICE:\nkeep it"])
    assert parse_modelfile(mf.render()) == mf
