"""Ollama's Modelfile format, in one place: its grammar, the quoting that survives it, parsing and writing.

Followed from Ollama's parser (ollama/ollama ``parser/parser.go``, ``ParseFile``; no Ollama runs here). A
Modelfile is a list of commands. A command name is letters only, case-insensitive; ``#`` at the start of a
line is a comment. A value is bare, in double quotes or in triple double quotes, with no escape sequences:
it ends at the first line break where the text read so far, trimmed, forms a complete (unquoted) value;
spaces and tabs never end it. Characters that are not printable are dropped. ``PARAMETER`` repeats
accumulate for list parameters such as ``stop``; values are typed as Ollama's ``api.Options`` types them.

The writer picks, per value, a form the parser cannot cut short, and refuses values no form can carry
(rather than writing a Modelfile that means something else). It never uses the parser to decide: the
tests hold one against the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import UsageError

# parser.go isValidCommand; FROM is recorded as "model"
COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
MESSAGE_ROLES = ("system", "user", "assistant")
# api.Options field types (ollama/ollama api/types.go); anything else is passed as a string.
PARAM_TYPES: dict[str, type] = {
    **dict.fromkeys(("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                     "num_predict", "top_k", "repeat_last_n"), int),
    **dict.fromkeys(("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"), float),
    **dict.fromkeys(("numa", "use_mmap"), bool),
    "stop": list,
}
_NEWLINES = "\r\n"
_SPACES = " \t"


@dataclass
class Modelfile:
    """The commands of one Modelfile that grpoctl writes or reads; ``render()`` gives its text."""

    from_: str
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # "stop" holds a list
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)  # written at the top; not read back
    path: Path | None = None  # where it was read from

    def render(self) -> str:
        lines = [_comment(c) for c in self.comments]
        lines.append(f"FROM {quote_value(self.from_, 'the GGUF path')}")
        lines += [f"ADAPTER {quote_value(a, 'the adapter path')}" for a in self.adapters]
        if self.template is not None:
            lines.append(f"TEMPLATE {quote_value(self.template, 'the chat template')}")
        if self.system:
            lines.append(f"SYSTEM {quote_value(self.system, 'the system prompt')}")
        for name, val in self.parameters.items():
            for v in val if isinstance(val, list) else [val]:
                text = quote_value(v, f"the {name} value {v!r}") if isinstance(v, str) else _number(v)
                lines.append(f"PARAMETER {name} {text}")
        lines += [f"MESSAGE {m['role']} {quote_value(m['content'], 'a message')}" for m in self.messages]
        lines += [f"LICENSE {quote_value(text, 'the license')}" for text in self.license]
        return "\n".join(lines) + "\n"


# --- writing -----------------------------------------------------------------------------------------------

def _parser_keeps(ch: str) -> bool:
    # The parser keeps printable runes, plus spaces, tabs and line breaks it copies while scanning a value.
    return ch.isprintable() or ch in "\t\r\n"


def _breaks(value: str) -> list[int]:
    return [i for i, ch in enumerate(value) if ch in _NEWLINES]


def _triple_safe(value: str) -> bool:
    return not any(value[:i].rstrip().endswith('"""') for i in _breaks(value))


def _single_safe(value: str) -> bool:
    if value.startswith('""'):  # `"""` would then open a triple-quoted value
        return False
    return not any(value[:i].rstrip().endswith('"') for i in _breaks(value))


def quote_value(value: str, what: str) -> str:
    """The Modelfile spelling of ``value``; UsageError when the parser would alter it."""
    bad = sorted({f"U+{ord(ch):04X}" for ch in value if not _parser_keeps(ch)})
    if bad:
        raise UsageError(f"{what} contains characters Ollama's Modelfile parser drops ({', '.join(bad)}); "
                         "remove them")
    bare_ok = (value and value == value.strip() and not value.startswith('"')
               and not any(ch in _NEWLINES for ch in value))
    if bare_ok:
        return value
    if _triple_safe(value):
        return f'"""{value}"""'
    if _single_safe(value):
        return f'"{value}"'
    raise UsageError(f"{what} cannot be written into a Modelfile: it has lines ending in both \" and \"\"\" "
                     "(Ollama's Modelfile format has no escapes); rephrase it or leave it out (--no-system)")


def _comment(text: str) -> str:
    return "# " + " ".join(text.split())


def _number(v: float | int) -> str:
    if isinstance(v, bool):
        raise UsageError(f"parameter value {v!r} is not a number")
    return str(v) if isinstance(v, int) else repr(float(v))


# --- reading -----------------------------------------------------------------------------------------------

def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def commands(text: str, where: str = "Modelfile") -> list[tuple[str, str]]:
    """(name, value) pairs as ``ParseFile`` records them: FROM as ``model``, PARAMETER as the parameter's
    name, MESSAGE as ``message`` with ``role: content``. UsageError where Ollama's parser fails."""
    out: list[tuple[str, str]] = []
    state, buf, name, role, line = "nil", "", "", "", 1
    for ch in text.removeprefix("\ufeff"):
        newline, space = ch in _NEWLINES, ch in _SPACES
        line += newline
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif not (newline or space):
                state, buf = "name", ch if ch.isprintable() else ""
            continue
        if state == "comment":
            state = "nil" if newline else state
            continue
        if state == "name":
            if ch.isascii() and ch.isalpha():
                buf += ch
                continue
            if not space or buf.lower() not in COMMANDS:
                shown = buf + ("" if space else ch)
                raise UsageError(f"{where} (line {line}): unknown command {shown!r}; Ollama accepts "
                                 + ", ".join(c.upper() for c in sorted(COMMANDS)))
            name, buf = buf.lower(), ""
            state = {"parameter": "param", "message": "role"}.get(name, "value")
            name = "model" if name == "from" else name
            continue
        if state in ("param", "role"):
            if ch.isascii() and (ch.isalpha() or (state == "param" and (ch.isdigit() or ch == "_"))):
                buf += ch
                continue
            if not space:
                raise UsageError(f"{where} (line {line}): {'PARAMETER name' if state == 'param' else 'MESSAGE role'} "
                                 f"{buf + ch!r} is not valid")
            if state == "role" and buf not in MESSAGE_ROLES:
                raise UsageError(f"{where} (line {line}): MESSAGE role must be system, user or assistant")
            name, role = (buf, "") if state == "param" else (name, buf)
            state, buf = "value", ""
            continue
        # value: only a line break where the trimmed text so far unquotes ends it
        if newline or space:
            value, ok = _unquote(buf.strip())
            if not ok or space:
                buf += ch
                continue
            out.append((name, f"{role}: {value}" if role else value))
            state, buf, role = "nil", "", ""
            continue
        if ch.isprintable():
            buf += ch
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise UsageError(f"{where}: unterminated quote in {name.upper()} starting {buf.strip()[:40]!r}")
        out.append((name, f"{role}: {value}" if role else value))
    elif state not in ("nil", "comment"):
        raise UsageError(f"{where}: unexpected end of file in {name.upper() or buf!r}")
    if not any(c == "model" for c, _ in out):
        raise UsageError(f"{where} has no FROM line")
    return out


def _typed(name: str, value: str, where: str) -> Any:
    kind = PARAM_TYPES.get(name, str)
    try:
        if kind is bool:
            if value.lower() not in {"true", "false"}:
                raise ValueError(value)
            return value.lower() == "true"
        return value if kind in (str, list) else kind(value)
    except ValueError:
        raise UsageError(f"{where}: PARAMETER {name} expects {kind.__name__}, got {value!r}") from None


def parse_modelfile(text: str, path: Path | None = None) -> Modelfile:
    """The Modelfile ``text`` as Ollama reads it (``ParseFile`` then ``CreateRequest``)."""
    where = str(path) if path else "Modelfile"
    mf = Modelfile(from_="", path=path)
    for cmd, value in commands(text, where):
        if cmd == "model":
            mf.from_ = value
        elif cmd == "template":
            mf.template = value
        elif cmd == "system":
            mf.system = value
        elif cmd == "license":
            mf.license.append(value)
        elif cmd == "adapter":
            mf.adapters.append(value)
        elif cmd == "message":
            role, _, content = value.partition(": ")
            mf.messages.append({"role": role, "content": content})
        elif cmd in ("draft", "renderer", "parser", "requires"):
            continue  # server-side features grpoctl does not use
        elif PARAM_TYPES.get(cmd) is list:
            mf.parameters.setdefault(cmd, []).append(value)
        else:
            mf.parameters[cmd] = _typed(cmd, value, where)
    return mf


def read_modelfile(path: Path) -> Modelfile:
    return parse_modelfile(Path(path).read_text(encoding="utf-8"), path)
