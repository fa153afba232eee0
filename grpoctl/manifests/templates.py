"""Translate a Hugging Face Jinja chat template into Ollama's Go template language.

Nothing here keys on model names. The model's own template is *probed*: it is rendered with
sentinel strings for a handful of short conversations, in each think mode (no flag, enable_thinking
on, off), and the pieces around the sentinels (role headers, turn ends, the default system block, the
generation prompt, how earlier reasoning is dropped) are read off the output. Those pieces fill one Go
template that reproduces the same bytes from the data Ollama passes (``.System``, ``.Messages`` with
``.Role``, ``.Content``, ``.Thinking``, and ``.Think``/``.IsThinkSet``). ``grpoctl.manifests.gorender``
then renders that Go template with Go's own ``text/template`` and compares it byte for byte with
``apply_chat_template`` on conversations chosen to break translations (whitespace around message text,
two calendar days, whitespace after the reasoning end marker, refused system messages); a template that
fails is not certified.

Templates the probe cannot read (tool-only formats, roles it does not recognise, reordered messages)
raise :class:`UntranslatableTemplate`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from grpoctl.chatprobes import THINK_OPEN_TAGS

# Sentinels: plain mixed-case words, so trimming leaves them alone and case filters show up.
S = "SysProbeQ7"
U1 = "UserProbeZ1"
A1 = "AsstProbeX1"
U2 = "UserProbeW2"
R = "ReasonProbeK9"
ANS = "AnswerProbeV3"


# Family of a translated format, named after the turn markers the template itself emits.
FAMILY_MARKERS: tuple[tuple[str, str], ...] = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<｜User｜>", "deepseek"),
)


class UntranslatableTemplate(Exception):
    """The chat template does not fit the role/turn structure the Go template can reproduce."""


class TemplateRaised(UntranslatableTemplate):
    """The chat template itself raised (``raise_exception``, a missing key ...) on a conversation."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the chat template fails on a plain conversation ({message})")
        self.message = message


# The request's think flag, as Ollama hands it to a template (.IsThinkSet, .Think) and as transformers takes it
# (enable_thinking): unset -> the template's default, "on" -> enable_thinking=True, "off" -> enable_thinking=False.
THINK_MODES: dict[str, dict[str, bool]] = {"default": {}, "on": {"enable_thinking": True},
                                           "off": {"enable_thinking": False}}
# The text pieces of a format; each may differ between think modes (kept in ChatFormat.variants).
TEXT_PIECES = ("sys_before", "sys_after", "default_block", "user_open", "user_close", "asst_open", "asst_close",
               "gen", "think_open", "think_close")


@dataclass
class ChatFormat:
    """The pieces of a chat template, as rendered by the model's own tokenizer."""

    family: str
    bos: str  # stripped from HF renders because the runtime adds it when tokenizing
    sys_before: str
    sys_after: str
    default_block: str  # emitted when the conversation has no system message (may be "")
    user_open: str
    user_close: str
    asst_open: str
    asst_close: str
    gen: str
    think: str  # "none" (reasoning kept verbatim), "drop" (history shows answers only), "last_turn" (Qwen3)
    think_open: str = ""
    think_close: str = ""
    last_turn_empty: bool = False  # the final answer gets an (empty) reasoning block even without reasoning
    reasoning_markers: tuple[str, str] | None = None
    system_error: str = ""  # the template's own error for a system message (Gemma: "System role not supported")
    trailer: str = ""  # appended by the template only when no generation prompt follows
    # Text pieces that differ when the request switches thinking on or off ("on"/"off" -> piece -> text);
    # absent pieces are the same as without a think flag.
    variants: dict[str, dict[str, str]] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)

    @property
    def system_supported(self) -> bool:
        return not self.system_error

    def piece(self, name: str, mode: str = "default") -> str:
        """Text piece ``name`` as rendered in think mode ``mode`` (default / on / off)."""
        return self.variants.get(mode, {}).get(name, getattr(self, name))

    @property
    def prefills_think(self) -> bool:
        return self.reasoning_markers is not None and self.gen.rstrip().endswith(self.reasoning_markers[0])

    @property
    def uses_think_flag(self) -> bool:
        return bool(self.variants)

    def with_default_system(self, system: str) -> ChatFormat:
        """The same format with ``system`` rendered as its default system block, in every think mode."""
        variants = {mode: {**pieces, "default_block": self.piece("sys_before", mode) + system
                           + self.piece("sys_after", mode)}
                    for mode, pieces in self.variants.items()}
        return dataclasses.replace(self, default_block=self.sys_before + system + self.sys_after, variants=variants)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hf_render(tok: Any, messages: list[dict[str, str]], bos: str, *, add_generation_prompt: bool = False,
              continue_final: bool = False, **kwargs: Any) -> str:
    """``apply_chat_template`` as text, minus the BOS token the runtime adds itself."""
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final, **kwargs)
    except Exception as err:  # jinja raise_exception, missing keys, ...: all mean "cannot probe"
        raise TemplateRaised(str(err)) from None
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


@contextmanager
def frozen_clock(day: str) -> Iterator[None]:
    """transformers' ``strftime_now`` answers as if today were ``day`` (YYYY-MM-DD), noon local time."""
    import datetime as _dt

    from transformers.utils import chat_template_utils

    fixed = _dt.datetime.fromisoformat(day).replace(hour=12)

    class _Frozen(_dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> _dt.datetime:  # noqa: ARG003 -- the signature datetime.now has
            return fixed

    real = chat_template_utils.datetime
    chat_template_utils.datetime = _Frozen
    try:
        yield
    finally:
        chat_template_utils.datetime = real


def _after(text: str, marker: str) -> str:
    i = text.find(marker)
    if i < 0 or text.count(marker) != 1:
        raise UntranslatableTemplate(f"the template does not render message content verbatim (probe {marker!r})")
    return text[i + len(marker):]


def _before(text: str, marker: str) -> str:
    i = text.find(marker)
    if i < 0 or text.count(marker) != 1:
        raise UntranslatableTemplate(f"the template does not render message content verbatim (probe {marker!r})")
    return text[:i]


def special_tokens(tok: Any) -> list[str]:
    """Every added token flagged special, longest first (so scans match whole tokens)."""
    found = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found.update(getattr(tok, "all_special_tokens", []) or [])
    return sorted((t for t in found if t), key=len, reverse=True)


def _specials_in(text: str, specials: list[str]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(text):
        for t in specials:
            if text.startswith(t, i):
                out.append((i, t))
                i += len(t)
                break
        else:
            i += 1
    return out


def runtime_adds_bos(tok: Any) -> bool:
    """Whether tokenizing plain text prepends BOS (llama.cpp does the same from the GGUF's add_bos flag)."""
    bos_id = getattr(tok, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == bos_id


def _split_turn_boundary(seg: str, pre: str, specials: list[str], also: tuple[str, ...] = ()) -> tuple[str, str]:
    """Split the text between an assistant answer and the next user message into (assistant close, user open).

    The user open must end ``pre`` (what precedes the first user message) and every text in ``also`` (what
    precedes it after a system message). Among the splits that allow, the one chosen puts the cut right before
    the special token that introduces the user role, so stops and readability come out natural; else the
    user open is the longest text all of them end with.
    """
    ends = (pre, *also)
    low = seg.lower()
    pos = low.find("user")
    if pos >= 0:
        starts = [i for i, _ in _specials_in(seg, specials) if i <= pos]
        if starts and all(t.endswith(seg[starts[-1]:]) for t in ends):
            return seg[:starts[-1]], seg[starts[-1]:]
    k = len(os.path.commonprefix([t[::-1] for t in (seg, *ends)]))
    return seg[:len(seg) - k], seg[len(seg) - k:]


def probe_chat_format(tok: Any, reasoning_markers: tuple[str, str] | None = None) -> ChatFormat:
    """Read a :class:`ChatFormat` off ``tok.chat_template`` by rendering sentinel conversations.

    The probe renders dozens of conversations; its answer (or refusal) is kept on the tokenizer object for its
    template and markers, so the Modelfile and the vLLM manifests of one call read the same probe once."""
    source = getattr(tok, "chat_template", None)
    key = (source if isinstance(source, str) else json.dumps(source), reasoning_markers)
    probed = getattr(tok, "_grpoctl_chat_formats", None)
    if probed is None:
        probed = {}
        try:
            tok._grpoctl_chat_formats = probed
        except AttributeError:  # a tokenizer that takes no attributes is probed every time
            pass
    if key not in probed:
        try:
            probed[key] = _probe(tok, reasoning_markers)
        except UntranslatableTemplate as err:
            probed[key] = err
        except (ValueError, IndexError) as err:  # a sentinel went missing: the template rewrites content
            probed[key] = UntranslatableTemplate(f"the template's output does not have a role/turn structure ({err})")
    found = probed[key]
    if isinstance(found, UntranslatableTemplate):
        raise found
    return copy.deepcopy(found)  # callers may change theirs


def _probe(tok: Any, reasoning_markers: tuple[str, str] | None) -> ChatFormat:
    if not getattr(tok, "chat_template", None):
        raise UntranslatableTemplate("the tokenizer has no chat template")
    source = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template)
    bos = tok.bos_token if (tok.bos_token and runtime_adds_bos(tok)) else ""
    specials = special_tokens(tok)
    markers = reasoning_markers or next(((o, "</" + o[1:]) for o in THINK_OPEN_TAGS if o in source), None)

    modes = {mode: _probe_mode(tok, bos, specials, markers, kw) for mode, kw in THINK_MODES.items()}
    base = modes["default"]
    for got in modes.values():
        for key in ("think", "last_turn_empty", "trailer", "system_error"):
            if got[key] != base[key]:
                raise UntranslatableTemplate(f"the thinking switch (enable_thinking) changes {key.replace('_', ' ')}; "
                                             f"only text that differs by the switch can be translated")
    variants = {mode: diff for mode in ("on", "off")
                if (diff := {k: modes[mode][k] for k in TEXT_PIECES if modes[mode][k] != base[k]})}

    family = next((name for marker, name in FAMILY_MARKERS
                   if marker in base["user_open"] + base["asst_open"] + base["user_close"]), "generic")
    fmt = ChatFormat(family=family, bos=bos, reasoning_markers=markers, variants=variants,
                     **{k: base[k] for k in (*TEXT_PIECES, "think", "last_turn_empty", "system_error", "trailer")})
    fmt.stops = stop_tokens(tok, fmt, specials)
    return fmt


def _probe_mode(tok: Any, bos: str, specials: list[str], markers: tuple[str, str] | None,
                think_kw: dict[str, bool]) -> dict[str, Any]:
    """The format's pieces in one think mode (``think_kw`` passed to every render)."""
    trailer = ""  # text some templates append only when no generation prompt follows (Phi-3's EOS)

    def r(msgs: list[tuple[str, str]], **kw: Any) -> str:
        text = hf_render(tok, [{"role": a, "content": b} for a, b in msgs], bos, **think_kw, **kw)
        if trailer and not kw.get("add_generation_prompt") and text.endswith(trailer):
            text = text[:-len(trailer)]
        return text

    r_u = r([("user", U1)])
    r_ug = r([("user", U1)], add_generation_prompt=True)
    if not r_ug.startswith(r_u):
        # Ollama never renders a finished conversation without a generation prompt or a continued
        # answer, so such a trailer never reaches it; it only has to be recognised and set aside.
        k = len(os.path.commonprefix([r_u, r_ug]))
        for text in (r_u, r_ug):  # never split inside a special token
            k = next((i for i, t in _specials_in(text, specials) if i < k < i + len(t)), k)
        trailer = r_u[k:]
        if U1 in trailer or not r([("user", U1)]) == r_u[:len(r_u) - len(trailer)]:
            raise UntranslatableTemplate("the generation prompt is not appended after the conversation")
        r_u = r_u[:len(r_u) - len(trailer)]
    pre, user_close = _before(r_u, U1), _after(r_u, U1)
    gen = r_ug[len(r_u):]

    r_uau = r([("user", U1), ("assistant", A1), ("user", U2)])
    if not r_uau.startswith(pre + U1 + user_close) or not r_uau.endswith(U2 + user_close):
        raise UntranslatableTemplate("user turns are not rendered the same way each time")
    asst_open = r_uau[len(pre + U1 + user_close):r_uau.index(A1)]
    seg = r_uau[r_uau.index(A1) + len(A1):r_uau.index(U2)]

    system_error, sys_block_user = "", None
    try:
        r_su = r([("system", S), ("user", U1)])
    except TemplateRaised as err:  # e.g. Gemma: "System role not supported"
        system_error = err.message or "the chat template rejects system messages"
    else:
        sys_block_user = _before(r_su, U1)
        if S not in sys_block_user or _after(r_su, U1) != user_close:
            raise UntranslatableTemplate("the system message is not rendered as a block before the first user turn")
    also = (sys_block_user[sys_block_user.index(S) + len(S):],) if sys_block_user is not None else ()
    asst_close, user_open = _split_turn_boundary(seg, pre, specials, also)
    if not pre.endswith(user_open):
        raise UntranslatableTemplate("the first user turn is opened differently from later ones")
    default_block = pre[:len(pre) - len(user_open)]
    sys_before, sys_after = "", ""
    if sys_block_user is not None:
        if not sys_block_user.endswith(user_open):
            raise UntranslatableTemplate("the system message is not rendered as a block before the first user turn")
        sys_before, sys_after = sys_block_user[:len(sys_block_user) - len(user_open)].split(S, 1)

    # Reasoning in earlier answers: kept verbatim, dropped, or shown only after the last user turn.
    think, think_open, think_close, last_turn_empty = "none", "", "", False
    if markers:
        o, c = markers
        with_reason = f"{o}\n{R}\n{c}{ANS}"
        r_h = r([("user", U1), ("assistant", with_reason), ("user", U2)])
        if R not in r_h:
            if r_h != r([("user", U1), ("assistant", ANS), ("user", U2)]):
                raise UntranslatableTemplate("earlier answers with reasoning are rendered in an unrecognised way")
            think = "drop"
            r_l = r([("user", U1), ("assistant", with_reason)])
            if R in r_l:
                head = pre + U1 + user_close + asst_open
                if not r_l.startswith(head):
                    raise UntranslatableTemplate("the last answer's reasoning block has an unrecognised shape")
                block = r_l[len(head):r_l.index(ANS)]
                think_open, think_close = block.split(R, 1)
                think = "last_turn"
                empty = r([("user", U1), ("assistant", ANS)])
                last_turn_empty = empty == head + think_open + think_close + ANS + asst_close
                if not last_turn_empty and empty != head + ANS + asst_close:
                    raise UntranslatableTemplate("the last answer without reasoning has an unrecognised shape")
    return dict(sys_before=sys_before, sys_after=sys_after, default_block=default_block, user_open=user_open,
                user_close=user_close, asst_open=asst_open, asst_close=asst_close, gen=gen, think=think,
                think_open=think_open, think_close=think_close, last_turn_empty=last_turn_empty,
                system_error=system_error, trailer=trailer)


def stop_tokens(tok: Any, fmt: ChatFormat, specials: list[str] | None = None) -> list[str]:
    """End-of-turn / end-of-text tokens the template emits, plus EOS: every special token in the turn
    markers, except reasoning tags (the model must be free to write those)."""
    specials = specials if specials is not None else special_tokens(tok)
    skip = set(fmt.reasoning_markers or ()) | {fmt.bos} | set(THINK_OPEN_TAGS)
    out: list[str] = []
    for piece in (fmt.asst_close, fmt.user_open, fmt.user_close, fmt.asst_open):
        for _, t in _specials_in(piece, specials):
            if t not in out and t not in skip:
                out.append(t)
    eos = getattr(tok, "eos_token", None)
    if eos and eos not in out and eos not in skip:
        out.append(eos)
    return out


# --- Go template emission ---------------------------------------------------------------------------

def go_string_literal(s: str) -> str:
    """A Go interpreted string literal for ``s`` using only printable ASCII-safe escapes."""
    out = ['"']
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            cp = ord(ch)
            out.append(f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _text_is_raw_safe(s: str) -> bool:
    # Raw template text must not open/close actions, must survive a Modelfile """ block, and must contain
    # only characters Ollama's Modelfile parser keeps (it drops non-printable runes).
    return ("{{" not in s and "}}" not in s and '"""' not in s and not s.endswith('"') and not s.startswith('"')
            and all(ch.isprintable() or ch in "\n\t" for ch in s))


class _Emitter:
    def __init__(self) -> None:
        self.parts: list[tuple[str, str]] = []

    def act(self, a: str) -> None:
        self.parts.append(("act", a))

    def text(self, t: str) -> None:
        if t:
            self.parts.append(("text", t) if _text_is_raw_safe(t) else ("act", go_string_literal(t)))

    def text_by_think(self, default: str, on: str, off: str) -> None:
        """Text that depends on the request's think flag: ``on``/``off`` when it was set, ``default`` when not;
        plain text when all three are the same."""
        if on == off == default:
            self.text(default)
            return
        if on == default:
            self.act("if and $.IsThinkSet (not $.Think)")
            self.text(off)
        elif off == default:
            self.act("if and $.IsThinkSet $.Think")
            self.text(on)
        else:
            self.act("if $.IsThinkSet")
            self.act("if $.Think")
            self.text(on)
            self.act("else")
            self.text(off)
            self.act("end")
        self.act("else")
        self.text(default)
        self.act("end")

    def piece(self, fmt: ChatFormat, name: str) -> None:
        """One text piece of ``fmt``, switched on the think flag where the template switches it."""
        self.text_by_think(fmt.piece(name), fmt.piece(name, "on"), fmt.piece(name, "off"))

    def render(self) -> str:
        out: list[str] = []
        for i, (kind, val) in enumerate(self.parts):
            if kind == "text":
                out.append(val)
                continue
            nxt = self.parts[i + 1][0] if i + 1 < len(self.parts) else None
            # Between two actions a line break is free: the right-trim marker swallows it.
            out.append("{{ " + val + (" -}}\n" if nxt == "act" else " }}"))
        return "".join(out)


def to_go_template(fmt: ChatFormat) -> str:
    """The Ollama ``TEMPLATE`` reproducing ``fmt`` from Ollama's chat data."""
    e = _Emitter()
    if not fmt.system_supported:
        # The chat template raises on a system message; Go has no raise, but executing an undefined template
        # is an error too, so Ollama refuses such a request as transformers and llama.cpp do.
        e.act("if $.System")
        e.act(f"template {go_string_literal(fmt.system_error)} .")
        e.act("end")
        e.piece(fmt, "default_block")
    elif any(fmt.piece(n, m) for n in ("sys_before", "sys_after", "default_block") for m in THINK_MODES):
        e.act("if $.System")
        e.piece(fmt, "sys_before")
        e.act("$.System")
        e.piece(fmt, "sys_after")
        if any(fmt.piece("default_block", m) for m in THINK_MODES):
            e.act("else")
            e.piece(fmt, "default_block")
        e.act("end")
    else:
        e.act("$.System")
    if fmt.think == "last_turn":
        e.act("$lastUser := -1")
        e.act("range $i, $_ := .Messages")
        e.act('if eq .Role "user"')
        e.act("$lastUser = $i")
        e.act("end")
        e.act("end")
    # Fields are read through the dot (.Role, .Content, .Thinking): Ollama finds a model's reasoning tags
    # by looking for a `.Thinking` field inside the range over .Messages (thinking/template.go, InferTags).
    e.act("range $i, $_ := .Messages")  # `.Messages`, not `$.Messages`: InferTags looks for that field
    e.act("$last := eq (len (slice $.Messages $i)) 1")
    e.act('if eq .Role "user"')
    e.piece(fmt, "user_open")
    e.act(".Content")
    e.piece(fmt, "user_close")
    if any(fmt.piece("gen", m) for m in THINK_MODES):
        e.act("if $last")
        e.piece(fmt, "gen")
        e.act("end")
    e.act('else if eq .Role "assistant"')
    e.piece(fmt, "asst_open")
    if fmt.think == "last_turn":
        e.act("if and (gt $i $lastUser) (or $last .Thinking)" if fmt.last_turn_empty
              else "if and (gt $i $lastUser) .Thinking")
        e.piece(fmt, "think_open")
        e.act(".Thinking")
        e.piece(fmt, "think_close")
        e.act("end")
    elif fmt.think == "drop" and fmt.reasoning_markers:
        # Never rendered (the chat template drops earlier reasoning too); it declares the reasoning tags
        # so Ollama treats the model as a thinking model and splits reasoning off its answers.
        e.act("if false")
        e.text(fmt.reasoning_markers[0])
        e.act(".Thinking")
        e.text(fmt.reasoning_markers[1])
        e.act("end")
    e.act(".Content")
    if any(fmt.piece("asst_close", m) for m in THINK_MODES):
        e.act("if not $last")
        e.piece(fmt, "asst_close")
        e.act("end")
    e.act("end")
    e.act("end")
    return e.render()
