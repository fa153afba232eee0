"""A protocol test server for the Ollama HTTP API (not Ollama itself: no Ollama binary can run here).

It implements the documented endpoints grpoctl's client side uses (ollama/ollama docs/api.md) and checks
what it receives the way the daemon does:

    GET  /api/version                 {"version": ...}
    HEAD /api/blobs/sha256:<hex>      200 if stored, 404 if not, 400 for a malformed digest
    POST /api/blobs/sha256:<hex>      stores the body; 400 when its sha256 is not the digest in the URL
    POST /api/create                  400 for an invalid name or a file digest it does not hold; streams
                                      NDJSON progress ending in {"status": "success"}
    POST /api/chat                    404 for an unknown model; answers with llama.cpp on the stored GGUF

Which template renders a chat follows Ollama's source (v0.30 and later), restated here independently of
grpoctl's own model of it:

- create (server/create.go, server/model.go ``detectChatTemplate``): a request ``template`` becomes the
  model's Go template; without one, Ollama's registry template closest to the GGUF's chat template is
  attached when fewer than 100 edits away (template/template.go ``Named``, Levenshtein on runes);
- chat (server/routes.go ``chatModeForModel``, ``shouldUseGoTemplate``; server/images.go
  ``shouldPreferChatTemplate``): the Go template renders the prompt unless the GGUF's chat template has
  more capabilities (tools: "tools"/"tool_call" in it; thinking: "<think>" and "</think>") or
  OLLAMA_GO_TEMPLATE=0; otherwise the prompt is the GGUF's chat template ("native", llama-server's Jinja;
  here llama-cpp-python's Jinja formatter stands in for llama.cpp's C++ engine), with
  ``enable_thinking`` when the request sets ``think`` (llm/llama_server.go ``llamaServerChatTemplateKwargs``);
- a model that can think gets ``think: true`` when the request leaves it unset (routes.go ChatHandler).

Go templates are rendered by Go's own text/template with the data Ollama's template.Execute passes
(grpoctl's renderer program). Each chat records ``mode`` ("native" / "go"), ``template`` (which one) and
the ``prompt``, then llama.cpp completes that prompt.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The daemon's name grammar, restated independently of grpoctl's checker.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
_NAME = re.compile(rf"^(?:(?:[A-Za-z0-9_][A-Za-z0-9_.:-]{{0,349}}/)?[A-Za-z0-9_][A-Za-z0-9_-]{{0,79}}/)?{_PART}"
                   rf"(?::{_PART})?$")


class FakeOllama:
    def __init__(self, blob_dir: Path, version: str = "0.33.0-protocol-test", go_template_env: str = "",
                 go_renderer: Path | None = None) -> None:
        self.blob_dir = Path(blob_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.version = version
        self.go_template_env = go_template_env  # the daemon's OLLAMA_GO_TEMPLATE ("" unset, "0", "1")
        self.go_renderer = go_renderer  # the Go text/template renderer program (grpoctl/manifests/gorender)
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.created: dict[str, dict[str, Any]] = {}  # model name -> /api/create body
        self.chats: list[dict[str, Any]] = []
        self.chat_error: str | None = None  # set to make /api/chat answer 500 with this error
        self._llamas: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    def __enter__(self) -> FakeOllama:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for llm in self._llamas.values():
            llm.close()

    # --- what Ollama renders, from its source ----------------------------------------------------
    def _gguf_chat_template(self, path: Path) -> tuple[str, str, str]:
        """(chat template, BOS text, EOS text) from the GGUF's metadata, read by llama.cpp."""
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            def text(tok: int) -> str:
                return llm.detokenize([tok], special=True).decode() if tok >= 0 else ""

            return llm.metadata.get("tokenizer.chat_template", ""), text(llm.token_bos()), text(llm.token_eos())
        finally:
            llm.close()

    def _go(self, request: dict[str, Any]) -> Any:
        """Run the Go text/template program (it renders with the data Ollama's template.Execute passes)."""
        if self.go_renderer is None:
            raise RuntimeError("this FakeOllama has no Go renderer to render Go templates with")
        proc = subprocess.run([str(self.go_renderer)], input=json.dumps(request), capture_output=True, text=True,
                              timeout=120, check=True)
        return json.loads(proc.stdout)

    def _go_caps(self, go_template: str) -> list[str]:
        """server/images.go goTemplateCapabilities: tools from .Tools, thinking when thinking.InferTags finds
        tags (a .Thinking field between two text nodes in the range over .Messages; run in Go on the parse tree)."""
        caps = ["tools"] if re.search(r"\.Tools\b", go_template) else []
        tags = self._go({"template": go_template, "cases": [], "infer_tags": True})
        if isinstance(tags, dict) and tags["open"] and tags["close"]:
            caps.append("thinking")
        return caps

    def _chat_mode(self, spec: dict[str, Any]) -> str:
        go, chat = spec["_go_template"], spec["_chat_template"]
        version = tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])
        if version < (0, 30, 0):  # before the llama-server runner every prompt came from a Go template
            return "go" if go is not None else "default"
        if go is None:
            return "native"
        if self.go_template_env in ("0", "1"):
            return "go" if self.go_template_env == "1" else "native"
        return "native" if len(_chat_caps(chat)) > len(self._go_caps(go)) else "go"

    def _answer(self, model: str, body: dict[str, Any]) -> tuple[str, str]:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        spec = self.created[model]
        digest = next(iter(spec["files"].values()))
        params = spec.get("parameters") or {}
        options = body.get("options") or {}
        mode = self._chat_mode(spec)
        messages = list(body.get("messages") or [])
        if spec.get("system") and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": spec["system"]})
        caps = (_chat_caps(spec["_chat_template"]) if mode == "native"
                else self._go_caps(spec["_go_template"]) if mode == "go" else [])
        think = body.get("think")
        if think is None and "thinking" in caps:
            think = True
        if mode == "default":  # template.DefaultTemplate `{{ .Prompt }}` (+ `{{ .Response }}`): bare message text
            prompt = "".join(m["content"] for m in messages if m.get("role") in ("user", "assistant"))
        elif mode == "native":
            kw = {} if think is None else {"enable_thinking": bool(think)}
            prompt = Jinja2ChatFormatter(spec["_chat_template"], spec["_eos"], spec["_bos"])(
                messages=messages, **kw).prompt
        else:
            out = self._go({"template": spec["_go_template"],
                            "cases": [{"messages": messages, "think": think, "default_system": ""}]})[0]
            if out.get("error"):
                raise ValueError(out["error"])
            prompt = out["output"]
        source = {"go": spec["_template_source"], "native": "gguf"}.get(mode, "default")
        self.chats[-1].update(mode=mode, template=source, think=think, prompt=prompt)
        with self._lock:
            if model not in self._llamas:
                self._llamas[model] = llama_cpp.Llama(model_path=str(self.blob_path(digest)),
                                                      n_ctx=int(params.get("num_ctx", 2048)), verbose=False)
            out = self._llamas[model].create_completion(prompt, max_tokens=int(options.get("num_predict", 64)),
                                                        temperature=float(options.get("temperature", 0.0)),
                                                        stop=params.get("stop"))
        choice = out["choices"][0]
        return choice["text"] or "", choice["finish_reason"] or "stop"

    # --- HTTP -------------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: Any = None, ndjson: list[dict] | None = None) -> None:
                if ndjson is not None:
                    data = b"".join(json.dumps(o).encode() + b"\n" for o in ndjson)
                    ctype = "application/x-ndjson"
                else:
                    data = b"" if body is None else json.dumps(body).encode()
                    ctype = "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _json(self) -> dict[str, Any]:
                return json.loads(self._body() or b"{}")

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                if self.path == "/api/version":
                    return self._send(200, {"version": fake.version})
                self._send(404, {"error": "not found"})

            def do_HEAD(self) -> None:
                fake.requests.append(("HEAD", self.path))
                digest = self.path.removeprefix("/api/blobs/")
                if not _DIGEST.match(digest):
                    return self._send(400)
                self._send(200 if fake.blob_path(digest).is_file() else 404)

            def do_POST(self) -> None:
                fake.requests.append(("POST", self.path))
                if self.path.startswith("/api/blobs/"):
                    return self._blob(self.path.removeprefix("/api/blobs/"))
                if self.path == "/api/create":
                    return self._create(self._json())
                if self.path == "/api/chat":
                    return self._chat(self._json())
                self._send(404, {"error": "not found"})

            def _blob(self, digest: str) -> None:
                data = self._body()
                if not _DIGEST.match(digest):
                    return self._send(400, {"error": f"invalid digest format {digest!r}"})
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                if actual != digest:
                    return self._send(400, {"error": f"digest mismatch, expected {digest}, got {actual}"})
                fake.blob_path(digest).write_bytes(data)
                self._send(201)

            def _create(self, body: dict[str, Any]) -> None:
                name = body.get("model") or ""
                if not _NAME.match(name):
                    return self._send(400, {"error": "invalid model name"})
                files = body.get("files") or {}
                if not files:
                    return self._send(400, {"error": "neither 'from' or 'files' was specified"})
                for fname, digest in files.items():
                    path = fake.blob_path(digest)
                    if not path.is_file():
                        return self._send(400, {"error": f"blob {digest} for {fname} does not exist"})
                    with open(path, "rb") as f:
                        if f.read(4) != b"GGUF":
                            return self._send(400, {"error": f"{fname} is not a GGUF file"})
                chat, bos, eos = fake._gguf_chat_template(fake.blob_path(next(iter(files.values()))))
                go, source = body.get("template"), "modelfile"
                if not go:
                    go, source = _registry_template(chat)
                fake.created[name] = dict(body, _chat_template=chat, _bos=bos, _eos=eos, _go_template=go,
                                          _template_source=source)
                progress = [{"status": "parsing GGUF"},
                            *({"status": f"using existing layer {d}"} for d in files.values()),
                            {"status": "writing manifest"}, {"status": "success"}]
                if body.get("stream", True):
                    return self._send(200, ndjson=progress)
                self._send(200, progress[-1])

            def _chat(self, body: dict[str, Any]) -> None:
                model = body.get("model", "")
                if model not in fake.created:
                    return self._send(404, {"error": f"model '{model}' not found"})
                fake.chats.append(body)
                if fake.chat_error:
                    return self._send(500, {"error": fake.chat_error})
                try:
                    content, reason = fake._answer(model, body)
                except ValueError as err:  # the template refused the conversation
                    return self._send(500, {"error": str(err)})
                now = _dt.datetime.now(_dt.UTC).isoformat()
                final = {"model": model, "created_at": now, "message": {"role": "assistant", "content": content},
                         "done": True, "done_reason": reason}
                if body.get("stream", True):
                    first = {"model": model, "created_at": now, "done": False,
                             "message": {"role": "assistant", "content": content}}
                    final["message"]["content"] = ""
                    return self._send(200, ndjson=[first, final])
                self._send(200, final)

        return Handler


# --- Ollama's rules, restated from its source -----------------------------------------------------------

def _levenshtein(a: str, b: str) -> int:
    """Edit distance by code point (agnivade/levenshtein on runes), plain dynamic programming."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _registry_template(chat_template: str) -> tuple[str | None, str]:
    """template.Named: the registry entry with the smallest distance (first on ties), if below 100."""
    from grpoctl.manifests.ollama_registry import REGISTRY  # Ollama's template/index.json and *.gotmpl, as data

    best, score = None, 1 << 30
    for name, jinja, _caps, _rt, go in REGISTRY:
        if abs(len(jinja) - len(chat_template)) >= min(score, 100):
            continue  # the distance is at least the length difference
        d = _levenshtein(chat_template, jinja)
        if d < score:
            best, score = (go, f"registry:{name}"), d
    return best if best is not None and score < 100 else (None, "none")


def _chat_caps(chat_template: str) -> list[str]:
    """server/images.go chatTemplateCapabilities (the first two rules)."""
    caps = []
    if "tools" in chat_template or "tool_call" in chat_template:
        caps.append("tools")
    if "<think>" in chat_template and "</think>" in chat_template:
        caps.append("thinking")
    return caps


