"""Register a GGUF with a running Ollama daemon through the ``ollama`` Python client, then chat with it.

The daemon is reached where ``OLLAMA_HOST`` points (the client's own rule; ``--host`` overrides it).
Registration is what ``ollama create`` does for a local file, over the documented API:

    HEAD /api/blobs/sha256:<digest>   is the GGUF already there?  (200 / 404)
    POST /api/blobs/sha256:<digest>   upload it; the daemon checks the digest    (201 / 400)
    POST /api/create                  {model, files: {<name>.gguf: digest}, template, system, parameters}

The template, stop parameters and system prompt come from the export's generated Modelfile when there
is one; otherwise the stops, context length, sampling and system prompt come from the GGUF and the
training run. Without a TEMPLATE, Ollama 0.30 and later render the GGUF's own ``tokenizer.chat_template``
(llama.cpp's Jinja engine) unless ``ollama create`` attaches a template of its own registry; older Ollama
renders Go templates only. Where that would not be the model's chat template, the checked Go template
``grpoctl manifests`` recorded in ``artifacts.json`` is sent instead (see :func:`plan_registration`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import ServeError, UsageError
from grpoctl.manifests.modelfile import Modelfile, read_modelfile
from grpoctl.serve.common import RecordedAnswer, SmokeResult, chat_messages
from grpoctl.serve.gguf_info import GGUFInfo
from grpoctl.serve.source import ServeTarget

DEFAULT_HOST = "http://127.0.0.1:11434"
_CHUNK = 1 << 20

# Model name grammar (ollama/ollama types/model/name.go): [host/][namespace/]model[:tag]; every part starts
# with a letter, digit or '_' and continues with those, '-' or '.'; namespaces take no '.', only the host
# may hold ':'; hosts are at most 350 characters, other parts at most 80.
_PART_RULES = {  # part -> (extra characters allowed after the first, max length)
    "host": ("-_.:", 350),
    "namespace": ("-_", 80),
    "model": ("-_.", 80),
    "tag": ("-_.", 80),
}


def _part_ok(kind: str, s: str) -> bool:
    extra, limit = _PART_RULES[kind]
    if not 1 <= len(s) <= limit or not (s[0].isascii() and (s[0].isalnum() or s[0] == "_")):
        return False
    return all(c.isascii() and (c.isalnum() or c in extra) for c in s[1:])


def check_model_name(name: str) -> None:
    """Raise a UsageError, before anything is uploaded, for a name the daemon's parser would reject."""
    s, tag = name, None
    if s.rfind(":") > s.rfind("/"):
        s, tag = s.rsplit(":", 1)
    parts = s.split("/")
    problems = []
    if len(parts) > 3:
        problems.append("at most host/namespace/model")
    else:
        kinds = ["host", "namespace", "model"][-len(parts):]
        problems += [f"bad {k} {p!r}" for k, p in zip(kinds, parts, strict=True) if not _part_ok(k, p)]
    if tag is not None and not _part_ok("tag", tag):
        problems.append(f"bad tag {tag!r}")
    if problems:
        raise UsageError(f"Ollama would reject the model name {name!r} ({'; '.join(problems)}): use "
                         "[namespace/]name[:tag] with letters, digits, '_', '-' and '.', each part starting "
                         "with a letter, digit or '_' (e.g. --name my-model:q4_k_m)")


def resolve_host(host: str | None = None) -> str:
    return host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


def _client(host: str | None, timeout: float | None = None) -> Any:
    import ollama

    return ollama.Client(host=resolve_host(host), timeout=timeout)


def _http(client: Any) -> Any:
    """The client's configured httpx client (base URL from OLLAMA_HOST, auth headers): the ``ollama``
    package has no call for ``GET /api/version`` or ``HEAD /api/blobs``, so those go through it."""
    return client._client


def _no_daemon(host: str, err: Exception | None = None) -> ServeError:
    why = f" ({type(err).__name__})" if err is not None else ""
    return ServeError(f"no Ollama daemon answers at {resolve_host(host)}{why}; start one with `ollama serve` "
                      "(or set OLLAMA_HOST to where one runs)")


def ping(host: str | None = None, timeout: float = 1.0) -> str:
    """The daemon's version (``GET /api/version``); raises ServeError when none answers."""
    import httpx

    client = _client(host, timeout=timeout)
    try:
        r = _http(client).get("/api/version")
        r.raise_for_status()
        return str(r.json().get("version", "unknown"))
    except (httpx.HTTPError, ValueError, OSError) as e:
        raise _no_daemon(host, e) from None
    finally:
        client.close()


# /api/create takes `files` (blob digests) since Ollama 0.5.0; older daemons only take a Modelfile text.
MIN_VERSION = (0, 5, 0)


def check_version(version: str) -> None:
    """Refuse daemons older than the create API used here; versions that do not parse are let through."""
    parsed = parse_version(version)
    if parsed and parsed < MIN_VERSION:
        raise ServeError(f"Ollama {version} is too old: registering a GGUF by blob digest needs Ollama "
                         f"{'.'.join(map(str, MIN_VERSION))} or newer; upgrade it (https://ollama.com/download)")


@dataclass
class Registration:
    """Everything that goes into ``POST /api/create`` besides the blob itself."""

    name: str
    gguf: Path
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    source: str = "gguf"  # where template/parameters came from: "modelfile:<path>" or "gguf"
    renders_with: str = ""  # what the daemon renders prompts with, as Ollama's source says (for the user)

    def create_kwargs(self, digest: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.name, "files": {self.gguf.name: digest}}
        if self.template:
            kw["template"] = self.template
        if self.system:
            kw["system"] = self.system
        if self.parameters:
            kw["parameters"] = self.parameters
        if self.messages:
            kw["messages"] = self.messages
        if self.license:
            kw["license"] = self.license
        return kw


def find_modelfile(target: ServeTarget) -> Path | None:
    """The export's Modelfile for this GGUF: one whose FROM names it, else a lone ``gguf/Modelfile``."""
    gguf_dir = target.gguf.parent
    candidates = list(dict.fromkeys(
        [*target.modelfiles, *sorted(gguf_dir.glob("Modelfile*")), *sorted(gguf_dir.glob("*.Modelfile"))]))
    plain = None
    for path in candidates:
        try:
            mf = read_modelfile(path)
        except (UsageError, OSError, UnicodeDecodeError):
            continue
        if mf.from_ and Path(mf.from_).name == target.gguf.name:
            return path
        if path.name == "Modelfile":
            plain = path
    return plain if plain is not None and len(candidates) == 1 else None


def parse_version(version: str) -> tuple[int, int, int] | None:
    parts = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(p) for p in parts.groups()) if parts else None  # type: ignore[return-value]


def _checked_go_template(target: ServeTarget) -> str | None:
    """The Go template ``grpoctl manifests`` checked against the chat template but did not write (Ollama
    >= 0.30 renders the chat template itself), from the export's artifacts.json."""
    manifests = target.artifacts.manifests if target.artifacts is not None else None
    return manifests.ollama.go_template if manifests is not None else None


def _choose_template(reg: Registration, target: ServeTarget, info: GGUFInfo, version: str | None) -> None:
    """Without a TEMPLATE, send the checked Go template where the daemon would otherwise not render the
    model's chat template (ollama/ollama server/routes.go ``chatModeForModel``; server/model.go
    ``detectChatTemplate``), and say what renders prompts."""
    from grpoctl.manifests.ollama import NATIVE_CHAT_SINCE, ollama_prompt

    parsed = parse_version(version) if version else None
    native = parsed is None or parsed >= NATIVE_CHAT_SINCE
    if reg.template:
        reg.renders_with = "the TEMPLATE" + ("" if native else f" (Ollama {version} renders Go templates only)")
        return
    if native:
        predicted = ollama_prompt(info.chat_template, None) if info.chat_template else None
        if predicted is None or predicted.mode == "native":
            reg.renders_with = "the GGUF's own chat template (Ollama's native chat, llama.cpp's Jinja engine)"
            return
        instead = predicted.describe()
    else:
        instead = (f"Ollama {version}'s Go template for this GGUF (a registry match or its default), since "
                   f"native chat needs Ollama {'.'.join(map(str, NATIVE_CHAT_SINCE))}")
    go = _checked_go_template(target)
    if go:
        reg.template = go
        reg.renders_with = (f"the Go template `grpoctl manifests` checked against the chat template (without it: "
                            f"{instead})")
    else:
        reg.renders_with = (f"{instead}; no checked Go template of the chat template is recorded in the export "
                            "(`grpoctl manifests` writes one where the template translates)")


def plan_registration(target: ServeTarget, info: GGUFInfo, name: str, n_ctx: int | None,
                      modelfile: Path | None = None, version: str | None = None) -> Registration:
    """Decide template, system prompt and parameters: the generated Modelfile wins, else GGUF + run; for a
    daemon ``version`` that would not render the model's chat template without a TEMPLATE, the export's
    checked Go template is added."""
    modelfile = modelfile or find_modelfile(target)
    if modelfile is not None:
        mf: Modelfile = read_modelfile(modelfile)
        if mf.adapters:
            raise UsageError(f"{modelfile} has ADAPTER lines; serve registers merged GGUFs only")
        reg = Registration(name=name, gguf=target.gguf, template=mf.template,
                           system=mf.system if mf.system is not None else target.system_prompt,
                           parameters=mf.parameters, messages=mf.messages, license=mf.license,
                           source=f"modelfile:{modelfile}")
    else:
        params: dict[str, Any] = {}
        if info.stop_tokens:
            params["stop"] = list(info.stop_tokens)
        if n_ctx:
            params["num_ctx"] = int(n_ctx)
        params.update(target.sampling)
        reg = Registration(name=name, gguf=target.gguf, system=target.system_prompt, parameters=params,
                           source="gguf")
    _choose_template(reg, target, info, version)
    return reg


def _upload_chunks(path: Path, size: int) -> Iterator[bytes]:
    from tqdm import tqdm

    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="upload blob",
                                     disable=size < (64 << 20)) as bar:
        while block := f.read(_CHUNK):
            bar.update(len(block))
            yield block


def push_blob(client: Any, path: Path, digest: str) -> bool:
    """Upload ``path`` as blob ``sha256:<digest>`` unless the daemon has it; returns True if uploaded."""
    import httpx

    http = _http(client)
    url = f"/api/blobs/sha256:{digest}"
    r = http.head(url)
    if r.status_code == 200:
        return False
    if r.status_code != 404:
        raise ServeError(f"Ollama answered HEAD {url} with HTTP {r.status_code}")
    size = path.stat().st_size
    try:
        r = http.post(url, content=_upload_chunks(path, size), headers={"Content-Length": str(size)})
    except httpx.HTTPError as e:
        raise ServeError(f"uploading {path.name} to Ollama failed: {e}") from None
    if r.status_code not in (200, 201):
        raise ServeError(f"Ollama refused the blob {path.name} (HTTP {r.status_code}: {r.text.strip()[:200]})")
    return True


def register(reg: Registration, digest: str, host: str | None = None,
             echo: Callable[[str], None] = print) -> None:
    """Upload the GGUF blob (if needed) and create the model; progress lines go to ``echo``."""
    import httpx
    from ollama import ResponseError

    check_model_name(reg.name)
    client = _client(host)
    try:
        uploaded = push_blob(client, reg.gguf, digest)
        echo(f"blob sha256:{digest[:12]}... {'uploaded' if uploaded else 'already on the daemon'}")
        last = None
        for progress in client.create(**reg.create_kwargs(f"sha256:{digest}"), stream=True):
            if progress.status and progress.status != last:
                echo(f"ollama: {progress.status}")
                last = progress.status
        if last != "success":
            raise ServeError(f"Ollama did not confirm creating {reg.name} (last status: {last})")
    except ResponseError as e:
        raise ServeError(f"Ollama could not create {reg.name}: {e.error} (HTTP {e.status_code})") from None
    except (ConnectionError, httpx.ConnectError) as e:
        raise _no_daemon(host, e) from None
    finally:
        client.close()


def smoke_chat(name: str, question: str, max_tokens: int, host: str | None = None,
               system_prompt: str | None = None, reasoning_markers: tuple[str, str] | None = None,
               recorded: RecordedAnswer | None = None) -> SmokeResult:
    """One chat through ``/api/chat``. The system prompt registered with the model applies by itself;
    ``system_prompt`` here is only what the report shows. With ``recorded``, the export's parity question is
    asked greedily too (its system prompt sent as a message, which replaces the registered one), and its answer
    must be the one the export recorded for the file."""
    from ollama import ResponseError

    client = _client(host)
    greedy = None
    try:
        resp = client.chat(model=name, messages=chat_messages(None, question), stream=False,
                           options={"num_predict": max_tokens, "temperature": 0.0})
        if recorded is not None:
            again = client.chat(model=name, messages=chat_messages(recorded.system_prompt, recorded.question),
                                stream=False, options={"num_predict": recorded.max_tokens, "temperature": 0.0,
                                                       "top_k": 1, "repeat_penalty": 1.0})
            greedy = again.message.content or ""
    except ResponseError as e:
        raise ServeError(f"Ollama chat with {name} failed: {e.error} (HTTP {e.status_code})") from None
    except ConnectionError as e:
        raise _no_daemon(host, e) from None
    finally:
        client.close()
    return SmokeResult(engine="ollama", model=name, system_prompt=system_prompt, question=question,
                       answer=resp.message.content or "", finish_reason=resp.done_reason,
                       reasoning_markers=reasoning_markers, recorded=recorded, greedy=greedy)


def usage_hint(name: str, host: str | None, question: str) -> str:
    import json
    import shlex

    client = _client(host)
    base = str(_http(client).base_url).rstrip("/")
    client.close()
    body = {"model": name, "messages": chat_messages(None, question), "stream": False}
    return (f"  ollama run {name}\n"
            f"  curl {base}/api/chat -d {shlex.quote(json.dumps(body, ensure_ascii=False))}")
