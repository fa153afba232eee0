"""Ollama's side of the manifests: what Ollama renders a Modelfile's model with, the TEMPLATE that makes it
render the chat template, and the Modelfiles of an export planned from that (:func:`modelfiles`).

The Modelfile format itself (quoting, parsing, writing) is ``grpoctl.manifests.modelfile``; writing the
files and recording them is ``grpoctl.manifests.api``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpoctl.artifacts import OllamaSection
from grpoctl.errors import DependencyError, UsageError, VerificationError
from grpoctl.exportlayout import GGUF_DIR
from grpoctl.manifests.context import ManifestContext

if TYPE_CHECKING:
    from grpoctl.rundir import RunDir

# --- Which template Ollama renders a Modelfile's model with ---------------------------------------------
#
# Followed from ollama/ollama's source (no Ollama runs here):
# - ``ollama create`` from a GGUF (server/create.go -> server/model.go ``detectChatTemplate``) attaches a Go
#   template of its own registry when the GGUF's chat template is within Levenshtein distance 100 of one it
#   knows (template/template.go ``Named``); a Modelfile TEMPLATE replaces it (create.go ``setTemplate``).
# - Before v0.30.0 every chat is rendered from that Go template (TEMPLATE, registry, or ``{{ .Prompt }}``).
# - From v0.30.0 (runner: llama-server) a model is rendered "natively" -- the GGUF's own Jinja chat template
#   through llama.cpp's engine -- unless it has a Go template that is used (server/routes.go
#   ``chatModeForModel``, ``usesOllamaRenderedChat``, ``shouldUseGoTemplate``): a Go template is used unless
#   OLLAMA_GO_TEMPLATE=0, or unless the chat template has more capabilities than the Go template
#   (server/images.go ``shouldPreferChatTemplate``; ignored when OLLAMA_GO_TEMPLATE is set at all).

NATIVE_CHAT_SINCE = (0, 30, 0)  # v0.30.0: llama-server runner, GGUF chat templates rendered by llama.cpp
REGISTRY_MAX_DISTANCE = 100  # template.Named: a registry template matches below this edit distance


def bounded_edit_distance(a: str, b: str, bound: int) -> int:
    """Levenshtein distance between ``a`` and ``b`` (by code point, as Go's agnivade/levenshtein on runes),
    or ``bound`` when it is at least ``bound``. Only a band of width ``bound`` around the diagonal can hold a
    smaller distance, so that band is all that is computed."""
    if abs(len(a) - len(b)) >= bound:
        return bound
    if len(a) < len(b):
        a, b = b, a
    big = bound
    prev = [j if j < big else big for j in range(len(b) + 1)]
    for i in range(1, len(a) + 1):
        lo, hi = max(1, i - bound), min(len(b), i + bound)
        cur = [big] * (len(b) + 1)
        cur[0] = i if i < big else big
        ca = a[i - 1]
        for j in range(lo, hi + 1):
            cost = 0 if ca == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost, big)
        if min(cur[lo - 1:hi + 1]) >= bound:
            return bound
        prev = cur
    return min(prev[len(b)], bound)


@dataclass(frozen=True)
class RegistryTemplate:
    name: str
    distance: int
    capabilities: tuple[str, ...]
    tool_round_trip: bool


def registry_template(chat_template: str) -> RegistryTemplate | None:
    """The registry Go template ``ollama create`` attaches for ``chat_template`` (template.Named: the closest
    entry, the first one on ties, if closer than 100 edits), or None."""
    from grpoctl.manifests.ollama_registry import REGISTRY

    best: RegistryTemplate | None = None
    bound = REGISTRY_MAX_DISTANCE
    for name, jinja, caps, round_trip, _go in REGISTRY:
        d = bounded_edit_distance(chat_template, jinja, bound)
        if d < bound:
            best, bound = RegistryTemplate(name, d, caps, round_trip), d
    return best


def chat_template_capabilities(chat_template: str) -> tuple[str, ...]:
    """What Ollama reads off a GGUF chat template (server/images.go ``chatTemplateCapabilities``)."""
    caps = []
    if "tools" in chat_template or "tool_call" in chat_template:
        caps.append("tools")
    split_think = ("content.split('</think>')" in chat_template or 'content.split("</think>")' in chat_template)
    if ("<think>" in chat_template and "</think>" in chat_template) or (
            split_think and "reasoning_content" not in chat_template and "<SPECIAL_12>" not in chat_template):
        caps.append("thinking")
    return tuple(caps)


def chat_template_has_tool_round_trip(chat_template: str) -> bool:
    """server/images.go ``chatTemplateHasToolRoundTrip``."""
    if "tools" not in chat_template and "tool_call" not in chat_template:
        return False
    calls = "tool_calls" in chat_template or "assistant_tool_call" in chat_template
    return calls and any(s in chat_template for s in (
        "tool_response", "tool_results", "role'] == 'tool'", "role'] == \"tool\"", "role\"] == 'tool'",
        "role\"] == \"tool\"", "message.role == 'tool'", "message.role == \"tool\"", "ipython"))


def prefers_chat_template(chat_template: str, go_capabilities: tuple[str, ...], go_tool_round_trip: bool) -> bool:
    """server/images.go ``shouldPreferChatTemplate`` (v0.30.11 and later; v0.30.0-v0.30.10 had only the first
    rule): the GGUF's chat template wins over a Go template that has fewer capabilities."""
    chat_caps = chat_template_capabilities(chat_template)
    chat_rt = chat_template_has_tool_round_trip(chat_template)
    if len(chat_caps) > len(go_capabilities):
        return not go_tool_round_trip or chat_rt
    if set(chat_caps) != set(go_capabilities) or "tools" not in chat_caps:
        return False
    return chat_rt and not go_tool_round_trip


@dataclass(frozen=True)
class OllamaPrompt:
    """Which template renders prompts for a model created from a Modelfile, on Ollama >= 0.30 (default env)."""

    mode: str  # "native": the GGUF's chat template through llama.cpp; "template": the Modelfile's TEMPLATE;
    #            "registry": a Go template of Ollama's registry that ``ollama create`` attached
    registry: RegistryTemplate | None = None

    def describe(self) -> str:
        if self.mode == "native":
            return "the GGUF's own chat template, rendered by llama.cpp (native chat)"
        if self.mode == "template":
            return "the Modelfile's TEMPLATE"
        assert self.registry is not None
        return (f"Ollama's registry template {self.registry.name!r} (attached by `ollama create`: the chat template "
                f"is {self.registry.distance} edits from it), not the model's chat template")

    def story(self) -> str:
        """What Ollama 0.30 and later render prompts with, and how to change it where that is not the model's
        chat template: the one account both the Modelfile's comment and the printed note give (routes.go
        ``shouldUseGoTemplate``: OLLAMA_GO_TEMPLATE=0 turns the Go template off, so the GGUF's renders)."""
        said = f"Ollama 0.30 and later render prompts with {self.describe()}"
        if self.mode == "registry":
            said += ("; started with OLLAMA_GO_TEMPLATE=0, Ollama renders the GGUF's own chat template with "
                     "llama.cpp instead")
        return said


def ollama_prompt(chat_template: str, template_capabilities: tuple[str, ...] | None) -> OllamaPrompt:
    """Predict, from Ollama's source, what renders prompts on Ollama >= 0.30 (OLLAMA_GO_TEMPLATE unset) for a
    GGUF with ``chat_template`` created with a TEMPLATE of ``template_capabilities`` (None: no TEMPLATE)."""
    if template_capabilities is not None:
        return OllamaPrompt("native" if prefers_chat_template(chat_template, template_capabilities, False)
                            else "template")
    reg = registry_template(chat_template)
    if reg is None or prefers_chat_template(chat_template, reg.capabilities, reg.tool_round_trip):
        return OllamaPrompt("native")
    return OllamaPrompt("registry", reg)


def llama_cpp_departures(chat_template: str, fmt: Any = None) -> list[str]:
    """Where llama.cpp's chat layer, which renders Ollama's native chat, departs from transformers for this
    chat template, as far as its source says so for every template (llama.cpp common/chat.cpp, as vendored
    in llama-cpp-python 0.3.36; both measured with llama-server's /apply-template). Departures that depend
    on more than the template text (see docs/manifests.md, *Native renders measured*) are not predicted."""
    out = []
    if "date_string" in chat_template and "strftime_now" not in chat_template:
        out.append("llama.cpp sets date_string to today's date (common_chat_extra_context) where transformers "
                   "leaves it undefined, so the template's own default date is replaced")
    if fmt is not None and not fmt.system_supported:
        out.append("llama.cpp folds a system message into the first user turn "
                   "(workaround::system_message_not_supported) where the chat template raises")
    return out


def check_native(tok: Any, gguf: Path, markers: tuple[str, str] | None, system: str | None,
                 chat_template_file: Path | None = None) -> Any:
    """Ollama's native chat, checked: the check's conversations that end with a user turn, rendered from the
    GGUF's own chat template by llama.cpp's chat layer and C++ Jinja engine (llama-server's
    ``POST /apply-template``, what Ollama >= 0.30 calls) and by transformers; a FidelityReport. The think flag
    is passed as ``chat_template_kwargs`` the way Ollama passes it, and left out only for a model Ollama does
    not treat as thinking (for one it does, Ollama always sets it). ``chat_template_file`` replaces the GGUF's
    template (for measuring templates on one GGUF). DependencyError when llama.cpp's tools are not built or
    the GGUF does not load."""
    from grpoctl.chatprobes import conversations
    from grpoctl.llamacpp_tools import apply_template, llama_server
    from grpoctl.manifests.gorender import FidelityReport
    from grpoctl.manifests.templates import TemplateRaised, hf_render

    source = tok.chat_template if isinstance(tok.chat_template, str) else ""
    thinks = "thinking" in chat_template_capabilities(source)
    convs = [c for c in conversations(system, markers or ("<think>", "</think>"))
             if c.ends_with_user and c.day is None and not (thinks and c.think is None)]
    cases: list[dict[str, Any]] = []
    with llama_server(gguf, chat_template_file) as url:
        for c in convs:
            kw = {} if c.think is None else {"enable_thinking": c.think}
            try:
                hf, hf_error = hf_render(tok, c.messages, "", add_generation_prompt=True, **kw), ""
            except TemplateRaised as err:
                hf, hf_error = "", err.message or "error"
            ll, ll_error = apply_template(url, c.messages, kw)
            match = bool(hf_error) == bool(ll_error) and (bool(hf_error) or hf == ll)
            entry: dict[str, Any] = {"name": c.name, "shape": c.shape, "match": match}
            if not match:
                entry.update(expected=hf or f"<error: {hf_error}>", got=ll or f"<error: {ll_error}>")
            cases.append(entry)
    return FidelityReport(all(c["match"] for c in cases), cases)


# --- The Modelfile's template ------------------------------------------------------------------------------

TEMPLATE_MODES = ("auto", "go", "native")


@dataclass
class TemplatePlan:
    """What the Modelfile carries for the chat format, and what each Ollama version renders prompts with."""

    template: str | None  # the TEMPLATE to write; None: none
    stops: list[str]
    fmt: Any = None  # the probed ChatFormat (None when the template has no role/turn structure)
    go_template: str | None = None  # the translated Go template, written or not
    go_faithful: bool = False  # the Go check passed on every probe conversation
    section: dict[str, Any] = field(default_factory=dict)  # artifacts.json manifests.ollama
    notes: list[str] = field(default_factory=list)
    prompt: OllamaPrompt | None = None  # what Ollama >= 0.30 renders prompts with, given this TEMPLATE


def _template_capabilities(fmt: Any) -> tuple[str, ...]:
    # The translated template declares reasoning tags (.Thinking between them in the range over .Messages, the
    # rule of Ollama's thinking.InferTags) exactly when the chat template drops or moves earlier reasoning.
    return ("thinking",) if fmt is not None and fmt.think != "none" and fmt.reasoning_markers else ()


def plan_template(tok: Any, markers: tuple[str, str] | None, system: str | None, mode: str = "auto", *,
                  force: bool = False, unchecked_ok: bool = False, gguf: Path | None = None) -> TemplatePlan:
    """Decide the Modelfile's TEMPLATE for the tokenizer's chat template.

    ``auto`` writes what makes Ollama >= 0.30 render exactly the chat template: no TEMPLATE when Ollama then
    renders the GGUF's own template natively, else the translated Go template if it passed the check (a
    registry template of Ollama's would take over otherwise). ``go`` always writes the translated Go template
    (Ollama < 0.30 renders nothing else); ``native`` never does. A Go template that failed the check is
    written only as ``go`` with ``force``; one that could not be checked (no Go) only with ``force`` or
    ``unchecked_ok``. With ``gguf`` and llama.cpp's tools built, the native render is checked too
    (:func:`check_native`); where it differs from transformers and the Go template does not, auto writes
    the Go template.
    """
    from grpoctl.manifests.gorender import check_fidelity
    from grpoctl.manifests.templates import UntranslatableTemplate, probe_chat_format, to_go_template

    if mode not in TEMPLATE_MODES:
        raise UsageError(f"--ollama-template {mode!r}: choose one of {', '.join(TEMPLATE_MODES)}")
    chat_template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    plan = TemplatePlan(template=None, stops=[tok.eos_token] if getattr(tok, "eos_token", None) else [])
    sec = plan.section
    sec["template_mode"] = mode
    refusal = ""  # why the Go template is not a faithful copy ("" when it is)
    unchecked: DependencyError | None = None
    try:
        plan.fmt = probe_chat_format(tok, markers)
    except UntranslatableTemplate as err:
        sec.update(translated=False, reason=str(err))
        refusal = f"the chat template cannot be translated to a Go template ({err})"
    else:
        fmt = plan.fmt
        plan.stops = fmt.stops
        plan.go_template = to_go_template(fmt)
        sec.update(translated=True, family=fmt.family, reasoning=fmt.think, bos_added_by_runtime=bool(fmt.bos),
                   stops=fmt.stops)
        try:
            report = check_fidelity(tok, fmt, plan.go_template, system if fmt.system_supported else None)
        except DependencyError as err:
            unchecked = err
            sec["fidelity"] = f"not checked: {err}"
            refusal = f"the Go template could not be checked against transformers ({err})"
        else:
            plan.go_faithful = report.passed
            sec["fidelity"] = {"passed": report.passed, "conversations": [c["name"] for c in report.cases],
                               "failed_shapes": report.failed_shapes, "failures": report.failures}
            if not report.passed:
                refusal = f"the Go template cannot reproduce the chat template: {report.meaning}"
                sec["reason"] = report.reason

    no_template = ollama_prompt(chat_template, None) if chat_template else OllamaPrompt("native")
    native: Any = None  # the native check's FidelityReport, when it ran
    if gguf is not None and mode != "go" and no_template.mode == "native":
        try:
            native = check_native(tok, gguf, markers or (plan.fmt.reasoning_markers if plan.fmt else None), system)
        except DependencyError as err:
            sec["native_check"] = f"not run: {err}"
        else:
            sec["native_check"] = {"passed": native.passed, "conversations": [c["name"] for c in native.cases],
                                   "failures": native.failures}
    # auto: the native render unless a registry template would take over, or llama.cpp departs from
    # transformers for this template (checked, else known from its source) and the checked Go template does not
    native_departs = no_template.mode == "native" and (
        not native.passed if native is not None else bool(llama_cpp_departures(chat_template, plan.fmt)))
    wants_go = mode == "go" or (mode == "auto" and (no_template.mode != "native"
                                                    or (native_departs and plan.go_faithful)))
    if wants_go and plan.go_template is None:
        if mode == "go":
            raise UsageError(f"--ollama-template go: {refusal}; Ollama >= 0.30 renders the chat template itself "
                             "(leave --ollama-template at auto)")
    elif wants_go and plan.go_faithful:
        plan.template = plan.go_template
    elif wants_go and unchecked is not None:
        if not (force or unchecked_ok):
            raise unchecked
        plan.template = plan.go_template
        plan.notes.append(f"Ollama TEMPLATE written unchecked: {refusal}")
    elif wants_go and mode == "go":
        if not force:
            raise VerificationError(f"{refusal}; pass --force to write it anyway, or leave --ollama-template at "
                                    "auto (Ollama >= 0.30 renders the chat template itself)")
        plan.template = plan.go_template
        plan.notes.append(f"TEMPLATE written because of --force although {refusal}")

    new = no_template if plan.template is None else ollama_prompt(chat_template, _template_capabilities(plan.fmt))
    # Native: the chat template itself, through llama.cpp's engine and chat layer: checked when it could run.
    departures = llama_cpp_departures(chat_template, plan.fmt) if new.mode == "native" and native is None else []
    if new.mode == "native" and native is not None and not native.passed:
        departures = [f"llama.cpp renders {', '.join(c['name'] for c in native.failures)} differently"]
    new_faithful: bool | None = (native.passed if new.mode == "native" and native is not None
                                 else None if new.mode == "native" and not departures
                                 else new.mode == "template" and plan.go_faithful)
    if plan.template is not None:
        old, old_faithful = "the Modelfile's TEMPLATE", plan.go_faithful
    else:  # before 0.30 a registry match is used whatever its capabilities
        match = no_template.registry or (registry_template(chat_template) if chat_template else None)
        old = (f"Ollama's registry template {match.name!r}" if match
               else "Ollama's default template {{ .Prompt }}")
        old_faithful = False
    sec.update(template_written=plan.template is not None, renders_with={">=0.30": new.describe(), "<0.30": old},
               faithful={">=0.30": new_faithful, "<0.30": old_faithful})
    if plan.template is None and plan.go_faithful:
        sec["go_template"] = plan.go_template  # for Ollama < 0.30: `--ollama-template go`, or grpoctl serve

    if departures:
        sec["llama_cpp_departures"] = departures
        plan.notes.append("Ollama >= 0.30 renders the chat template with llama.cpp, which differs from "
                          "transformers here: " + "; ".join(departures))
    plan.prompt = new
    if new.mode == "registry":
        why = refusal or "--ollama-template native was asked for"
        plan.notes.append(f"{new.story()} (no TEMPLATE written: {why})")
    elif new_faithful is False and not departures:
        plan.notes.append(f"Ollama >= 0.30 renders prompts with {new.describe()}, not checked to equal the chat "
                          f"template: {refusal}")
    if not old_faithful:
        fix = ("write the checked Go template for them with --ollama-template go" if plan.go_faithful
               else f"no Modelfile can fix that there: {refusal}")
        plan.notes.append(f"Ollama < 0.30 renders prompts with {old}, not the chat template; {fix}")
    checked = (f", checked byte for byte in Go text/template on {len(sec['fidelity']['conversations'])} "
               "conversations" if new.mode == "template" and plan.go_faithful else "")
    if new.mode == "native" and native is not None and native.passed:
        checked = (f", checked byte for byte with llama.cpp's engine (llama-server) on {len(native.cases)} "
                   "conversations")
    elif new.mode == "native" and not departures:
        checked = " (not checked: llama.cpp's tools are not built; `grpoctl doctor --build-llama-tools`)"
    sec["summary"] = f"Ollama >= 0.30 renders prompts with {new.describe()}{checked}"
    return plan


# --- The Modelfiles of an export ---------------------------------------------------------------------------

class SystemPromptRefused(UsageError):
    """The training system prompt cannot go into a Modelfile as it is; ``no_system`` leaves it out."""


def _bake_system(ctx: ManifestContext, fmt: Any, system: str) -> str:
    """A TEMPLATE whose default system block is ``system``, for prompts no Modelfile quoting can carry.

    Ollama turns SYSTEM into a leading system message, which the template renders as
    sys_before + .System + sys_after; baking that text into the no-system branch gives the same bytes.
    Checked here with Go: baked template without SYSTEM == plain template with SYSTEM.
    """
    from grpoctl.chatprobes import conversations
    from grpoctl.manifests.gorender import render_go
    from grpoctl.manifests.templates import to_go_template

    baked = to_go_template(fmt.with_default_system(system))
    plain = to_go_template(fmt)
    convs = [c for c in conversations(markers=fmt.reasoning_markers) if c.messages[0]["role"] != "system"]
    cases = [{"messages": c.messages, "think": c.think} for c in convs]
    want = render_go(plain, [dict(c, default_system=system) for c in cases])
    got = render_go(baked, cases)
    if want != got:
        raise VerificationError("the system prompt cannot be quoted in a Modelfile and baking it into TEMPLATE "
                                "changes the prompt; rephrase it or pass --no-system")
    ctx.notes.append("the system prompt cannot be quoted in a Modelfile (lines ending in \" and \"\"\"), so it is "
                     "the TEMPLATE's default system block instead of a SYSTEM line")
    return baked


def _sampling_parameters(run: RunDir | None) -> dict[str, float | int]:
    if run is None:
        return {}
    out: dict[str, float | int] = {"num_ctx": run.max_seq_length}
    for key, val in run.sampling.items():
        out[key] = int(val) if key == "top_k" else float(val)
    return out


def modelfiles(ctx: ManifestContext, tok: Any) -> tuple[dict[Path, str], OllamaSection]:
    """The Modelfile(s) of the export's GGUFs (one per GGUF, ``Modelfile`` for the default type) and the files
    the Hub gives to ``ollama run hf.co/...``, by path, and what they say (artifacts.json ``manifests.ollama``)."""
    from grpoctl.manifests.modelfile import Modelfile, quote_value

    by_quant = {q.upper(): f for q, f in ctx.artifacts.ggufs().items()}
    if not by_quant:
        ctx.notes.append("no GGUF in the export: no Modelfile written; add one with "
                         f"`{ctx.artifacts.export_command('--gguf', 'q4_k_m')}`")
        return {}, OllamaSection(written=False)
    from grpoctl.gguftypes import canonical_type, default_type

    wanted = canonical_type(ctx.options.quant).upper() if ctx.options.quant else None
    if wanted and wanted not in by_quant:
        raise UsageError(f"--quant {ctx.options.quant}: the export has {', '.join(sorted(by_quant))} GGUFs only")
    default = wanted or default_type(by_quant).upper()
    system = None if ctx.options.no_system else (ctx.run.system_prompt if ctx.run else None)
    plan = plan_template(tok, ctx.run.reasoning_markers if ctx.run else None, system, ctx.options.ollama_template,
                         force=ctx.options.force, unchecked_ok=ctx.options.unchecked_ok,
                         gguf=ctx.export_dir / by_quant[default].path)
    template, stops, section, fmt = plan.template, plan.stops, plan.section, plan.fmt
    ctx.notes += plan.notes
    if system and fmt is not None and not fmt.system_supported:
        ctx.notes.append("the chat template has no system role, so the training system prompt is left out of "
                         "the Modelfile")
        system = None
    if system:
        try:
            quote_value(system, "the system prompt")
        except UsageError as err:
            if not plan.go_faithful:
                raise SystemPromptRefused(str(err)) from None
            try:
                template, system = _bake_system(ctx, fmt, system), None
            except VerificationError as baked:
                raise SystemPromptRefused(str(baked)) from None
            section.update(system_in_template=True, template_written=True)
    gguf_out = ctx.out_dir / GGUF_DIR
    base = ctx.artifacts.provenance.base_model
    license_ = base.license if base else None
    params = _sampling_parameters(ctx.run)
    comments = ["Ollama Modelfile written by grpoctl from the model's own chat template and training settings.",
                "Create the model: ollama create <name> -f <this file>"]
    if template is None:
        native = plan.prompt is None or plan.prompt.mode == "native"
        comments.append("No TEMPLATE: Ollama 0.30 and later render the chat template embedded in the GGUF "
                        "(llama.cpp's Jinja engine)." if native else f"No TEMPLATE: {plan.prompt.story()}.")
        if plan.go_faithful:
            comments.append("For Ollama before 0.30: grpoctl manifests RUN --ollama-template go")
    else:
        comments.append("TEMPLATE: the chat template in Ollama's Go template language, checked byte for byte "
                        "against transformers.")
    files: dict[Path, str] = {}
    for quant, entry in sorted(by_quant.items()):
        rel = os.path.relpath(ctx.export_dir / entry.path, gguf_out)
        mf = Modelfile(from_=f"./{rel}" if not rel.startswith("..") else rel, template=template, system=system,
                       parameters={"stop": stops, **params}, license=[license_] if license_ else [],
                       comments=comments)
        text = mf.render()
        if quant == default:
            files[gguf_out / "Modelfile"] = text
        if len(by_quant) > 1:
            files[gguf_out / f"Modelfile.{quant}"] = text
    hub = _hub_files(template if template is not None else plan.go_template if plan.go_faithful else None,
                     system, {"stop": stops, **params})
    files.update({gguf_out / name: text for name, text in hub.items()})
    if "template" not in hub:
        ctx.notes.append("no checked Go template: `ollama run hf.co/...` uses the template the Hub picks from the "
                         "GGUF's metadata")
    section.update(written=True, default_quant=default, quants=sorted(by_quant), system=bool(system),
                   parameters=params, license=license_, hub_files=sorted(hub))
    return files, OllamaSection(**section)


def _hub_files(template: str | None, system: str | None, parameters: dict[str, Any]) -> dict[str, str]:
    """The files the Hub hands to ``ollama run hf.co/OWNER/REPO``, at the GGUF repo's root (the Hub's Ollama docs:
    ``template``, a Go template; ``system``; ``params``, JSON): the Modelfile's TEMPLATE (else the checked Go
    template), SYSTEM and PARAMETERs. Ollama reads the first two as the file's bytes (server/images.go GetModel),
    so nothing is added to them, and ``params`` into api.Options (``FromMap``: JSON numbers, ``stop`` a list)."""
    out = {"params": json.dumps(parameters, indent=2, ensure_ascii=False) + "\n"}
    if template is not None:
        out["template"] = template
    if system:
        out["system"] = system
    return out
