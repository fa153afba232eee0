"""A local Hugging Face Hub for protocol tests: the endpoints huggingface_hub 2.4 calls to create a repo,
commit files and read them back, over real HTTP on 127.0.0.1, storing everything it receives.

Legacy LFS only (basic transfer): the preupload and LFS batch answers never offer Xet, so clients must run
with ``HF_HUB_DISABLE_XET=1`` (huggingface_hub would otherwise upload through Xet storage, which this server
does not implement). Implemented, as huggingface_hub uses them:

    GET  /api/whoami-v2                                   token -> user
    POST /api/repos/create                                409 when it exists, 403 outside your namespaces
    GET  /api/models/{repo}[/revision/{rev}]              repo_info (404 RevisionNotFound)
    POST /api/models/{repo}/branch/{branch}               create_branch
    POST /api/validate-yaml                               model card front matter check
    POST /api/models/{repo}/preupload/{rev}               upload mode + remote oid per path
    POST /{repo}.git/info/lfs/objects/batch               LFS batch (no actions for stored objects)
    PUT  /_lfs/{oid}  POST /_lfs/{oid}/verify             basic transfer upload and verify
    POST /api/models/{repo}/commit/{rev}                  ndjson commit
    POST /api/models/{repo}/paths-info/{rev}              get_paths_info
    GET  /api/models/{repo}/tree/{rev}[/{path}]           list_repo_tree / list_repo_files
    GET|HEAD /{repo}/resolve/{rev}/{path}                 hf_hub_download

Fault injection for resume tests: ``hang_uploads_after = N`` makes every LFS upload after the N-th stored
one stall without an answer (until ``release()``), so a test can kill the client mid-push.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    size: int
    blob: str  # git blob id (of the pointer file for LFS)
    sha256: str | None = None  # set for LFS files
    data: bytes | None = None  # set for regular files


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict] = field(default_factory=dict)  # oid -> {"parent", "files", "summary"}


class HubState:
    """Everything the server knows; tests read it directly to assert what arrived."""

    def __init__(self, tokens: dict[str, dict]) -> None:
        self.tokens = tokens  # token -> {"name": user, "orgs": [org, ...]}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.lfs_puts: list[str] = []  # oids received, in order (completed uploads only)
        self.commit_log: list[tuple[str, str, list[str]]] = []  # (repo, oid, paths)
        self.requests: list[tuple[str, str]] = []
        self.hang_uploads_after: int | None = None
        self.hanging = 0
        self.uploads_started = 0  # counted on arrival, so concurrent uploads cannot all slip past the limit
        self._release = threading.Event()
        self.lock = threading.Lock()

    def release(self) -> None:
        self._release.set()

    def head_files(self, repo_id: str, rev: str = "main") -> dict[str, StoredFile]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[rev]]["files"]

    def content(self, f: StoredFile) -> bytes:
        return self.lfs[f.sha256] if f.sha256 else f.data  # type: ignore[return-value]

    def commits_to(self, repo_id: str) -> list[str]:
        return [oid for rid, oid, _ in self.commit_log if rid == repo_id]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _user(self, required: bool) -> dict | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            if required:
                raise _HubError(401, "Invalid username or password.")
            return None
        user = self.server.state.tokens.get(auth[7:])
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: dict | None, namespace: str) -> bool:
        return user is not None and (namespace == user["name"] or namespace in user.get("orgs", []))

    def _repo(self, repo_id: str, user: dict | None, write: bool = False) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        ns = repo_id.split("/")[0]
        if repo is None or (repo.private and not self._can_write(user, ns)):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if write and not self._can_write(user, ns):
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _head(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with state.lock:
            state.requests.append((method, path))
        try:
            for pattern, name in _ROUTES:
                m = re.fullmatch(pattern, path)
                verb = "get" if method == "HEAD" else method.lower()
                if m and name.startswith(verb + "_"):
                    args = [unquote(g) if g is not None else None for g in m.groups()]
                    getattr(self, name)(*args, query=query, head=method == "HEAD")
                    return
            raise _HubError(404, f"no route {method} {path}")
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._body_drain()
            self._send(e.status, {"error": e.message, **e.extra}, headers)

    def _body_drain(self) -> None:
        # an unread request body would corrupt the next request on this keep-alive connection
        if not getattr(self, "_consumed", False) and self.command in ("POST", "PUT"):
            self._consumed = True
            try:
                self._body()
            except Exception:
                pass

    def _read(self) -> bytes:
        self._consumed = True
        return self._body()

    def do_GET(self) -> None:
        self._consumed = False
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._consumed = False
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._consumed = False
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._consumed = False
        self._dispatch("PUT")

    # endpoints -------------------------------------------------------------------------------
    def get_whoami(self, query, head):
        user = self._user(required=True)
        self._send(200, {"type": "user", "name": user["name"],
                         "orgs": [{"name": o, "roleInOrg": "write"} for o in user.get("orgs", [])],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def post_create(self, query, head):
        user = self._user(required=True)
        body = json.loads(self._read() or b"{}")
        ns = body.get("organization") or user["name"]
        repo_id = f"{ns}/{body['name']}"
        if not self._can_write(user, ns):
            raise _HubError(403, f'You don\'t have the rights to create a model under the namespace "{ns}"')
        state = self.server.state
        with state.lock:
            if repo_id in state.repos:
                # like the Hub, the conflict answer still carries the repo url (create_repo(exist_ok=True) reads it)
                raise _HubError(409, "You already created this model repo", url=f"{self.server.base}/{repo_id}")
            repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            attrs = StoredFile(size=len(GITATTRIBUTES), blob=git_blob_sha1(GITATTRIBUTES), data=GITATTRIBUTES)
            oid = _new_oid(repo_id, "initial")
            repo.commits[oid] = {"parent": None, "files": {".gitattributes": attrs}, "summary": "initial commit"}
            repo.branches["main"] = oid
            state.repos[repo_id] = repo
        self._send(200, {"url": f"{self.server.base}/{repo_id}", "name": repo_id})

    def get_repo_info(self, ns, name, rev, query, head):
        repo_id = f"{ns}/{name}"
        repo = self._repo(repo_id, self._user(required=False))
        oid = self._head(repo, rev or "main")
        files = repo.commits[oid]["files"]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def post_branch(self, ns, name, branch, query, head):
        repo = self._repo(f"{ns}/{name}", self._user(required=True), write=True)
        body = json.loads(self._read() or b"{}")
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        repo.branches[branch] = self._head(repo, body.get("startingPoint") or "main")
        self._send(200, {})

    def post_validate_yaml(self, query, head):
        body = json.loads(self._read())
        text = body.get("content", "")
        errors = []
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            self._send(400, {"errors": errors, "warnings": []})
        else:
            self._send(200, {"errors": [], "warnings": []})

    def post_preupload(self, ns, name, rev, query, head):
        repo = self._repo(f"{ns}/{name}", self._user(required=True), write=True)
        files = repo.commits[self._head(repo, rev)]["files"]
        out = []
        for f in json.loads(self._read())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20 or b"\0" in sample
            remote = files.get(f["path"])
            oid = None if remote is None else (remote.sha256 or remote.blob)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._send(200, {"files": out, "commitOid": self._head(repo, rev)})

    def post_lfs_batch(self, ns, name, query, head):
        self._repo(f"{ns}/{name}", self._user(required=True), write=True)
        body = json.loads(self._read())
        state = self.server.state
        objects = []
        for o in body["objects"]:
            if o["oid"] in state.lfs:
                objects.append({"oid": o["oid"], "size": o["size"]})  # already stored: nothing to send
            else:
                objects.append({"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{self.server.base}/_lfs/{o['oid']}"},
                    "verify": {"href": f"{self.server.base}/_lfs/{o['oid']}/verify"}}})
        self._send(200, {"transfer": "basic", "objects": objects},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def put_lfs_upload(self, oid, query, head):
        state = self.server.state
        with state.lock:
            state.uploads_started += 1
            stall = state.hang_uploads_after is not None and state.uploads_started > state.hang_uploads_after
            state.hanging += stall
        if stall:
            state._release.wait(60)
            self.close_connection = True
            return  # never answer: the client sees the connection die
        data = self._read()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HubError(400, "sha256 of the uploaded content does not match the LFS oid")
        with state.lock:
            state.lfs[oid] = data
            state.lfs_puts.append(oid)
        self._send(200, {})

    def post_lfs_verify(self, oid, query, head):
        self._read()
        if oid not in self.server.state.lfs:
            raise _HubError(404, "object not found")
        self._send(200, {})

    def post_commit(self, ns, name, rev, query, head):
        repo_id = f"{ns}/{name}"
        repo = self._repo(repo_id, self._user(required=True), write=True)
        state = self.server.state
        lines = [json.loads(line) for line in self._read().splitlines() if line.strip()]
        with state.lock:
            if rev not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            parent = repo.branches[rev]
            files = dict(repo.commits[parent]["files"])
            header = lines[0]["value"]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            touched = []
            for item in lines[1:]:
                v = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = StoredFile(size=len(data), blob=git_blob_sha1(data), data=data)
                elif item["key"] == "lfsFile":
                    if v["oid"] not in state.lfs:
                        raise _HubError(400, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    size = len(state.lfs[v["oid"]])
                    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{v['oid']}\n"
                               f"size {size}\n").encode()
                    files[v["path"]] = StoredFile(size=size, blob=git_blob_sha1(pointer), sha256=v["oid"])
                elif item["key"] == "deletedFile":
                    files.pop(v["path"], None)
                else:
                    raise _HubError(400, f"unsupported commit operation {item['key']}")
                touched.append(v["path"])
            oid = _new_oid(repo_id, header["summary"], time.time_ns())
            repo.commits[oid] = {"parent": parent, "files": files, "summary": header["summary"]}
            repo.branches[rev] = oid
            state.commit_log.append((repo_id, oid, touched))
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.server.base}/{repo_id}/commit/{oid}"})

    def _entry(self, path: str, f: StoredFile) -> dict:
        e = {"type": "file", "oid": f.blob, "size": f.size, "path": path}
        if f.sha256:
            e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return e

    def post_paths_info(self, ns, name, rev, query, head):
        repo = self._repo(f"{ns}/{name}", self._user(required=False))
        files = repo.commits[self._head(repo, rev)]["files"]
        paths = parse_qs(self._read().decode()).get("paths", [])
        self._send(200, [self._entry(p, files[p]) for p in paths if p in files])

    def get_tree(self, ns, name, rev, sub, query, head):
        repo = self._repo(f"{ns}/{name}", self._user(required=False))
        files = repo.commits[self._head(repo, rev)]["files"]
        prefix = (sub.strip("/") + "/") if sub and sub.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            out.append(self._entry(p, files[p]))
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._send(200, out)

    def get_resolve(self, ns, name, rev, path, query, head):
        repo = self._repo(f"{ns}/{name}", self._user(required=False))
        oid = self._head(repo, rev)
        f = repo.commits[oid]["files"].get(path)
        if f is None:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        data = self.server.state.content(f)
        etag = f'"{f.sha256 or f.blob}"'
        headers = {"X-Repo-Commit": oid, "ETag": etag}
        if f.sha256:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(f.size)})
        self._send(200, raw=data, headers=headers, head=head)


_REPO = r"([\w.\-]+)/([\w.\-]+)"
_ROUTES = [
    (r"/api/whoami-v2", "get_whoami"),
    (r"/api/repos/create", "post_create"),
    (r"/api/validate-yaml", "post_validate_yaml"),
    (rf"/api/models/{_REPO}/preupload/(.+)", "post_preupload"),
    (rf"/api/models/{_REPO}/commit/(.+)", "post_commit"),
    (rf"/api/models/{_REPO}/paths-info/(.+)", "post_paths_info"),
    (rf"/api/models/{_REPO}/branch/(.+)", "post_branch"),
    (rf"/api/models/{_REPO}/tree/([^/]+)(/.*)?", "get_tree"),
    (rf"/api/models/{_REPO}(?:/revision/(.+))?", "get_repo_info"),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "post_lfs_batch"),
    (r"/_lfs/([0-9a-f]{64})", "put_lfs_upload"),
    (r"/_lfs/([0-9a-f]{64})/verify", "post_lfs_verify"),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", "get_resolve"),
]


def _new_oid(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.base = f"http://127.0.0.1:{self.server_address[1]}"


class FakeHub:
    """Context manager: a running local Hub; ``.url`` for HF_ENDPOINT, ``.state`` for assertions."""

    def __init__(self, tokens: dict[str, dict]) -> None:
        self.state = HubState(tokens)
        self._server = _Server(self.state)
        self.url = self._server.base
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --- an export directory to push ----------------------------------------------------------------------
def build_export(root, *, with_run: bool = True, seed: int = 0):
    """A run with a small but complete export: merged, lora and two GGUF quants, Modelfile, and artifacts.json with
    the sections export writes, built from the contract's own types (file contents are random bytes). Returns the
    run directory (or the export directory without a run)."""
    import random
    from pathlib import Path

    from grpoctl.artifacts import (
        Artifacts,
        NoiseFloor,
        ParityFloor,
        ParityResult,
        ParitySection,
        Provenance,
        VerifySection,
        VerifySummary,
    )
    from grpoctl.models import EMBEDDED_ID, identify
    from grpoctl.rundir import BaseModelRef

    root = Path(root)
    run = root / "run"
    export = run / "export" if with_run else root / "export"

    def rnd(n: int, key: str) -> bytes:
        return random.Random(f"{seed}-{key}").randbytes(n)

    files = {
        "merged/model.safetensors": rnd(24_576, "merged"),
        "merged/config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n',
        "merged/tokenizer_config.json": b'{"eos_token": "<|im_end|>"}\n',
        "lora/adapter_model.safetensors": rnd(8_192, "lora"),
        "lora/adapter_config.json": b'{"peft_type": "LORA", "r": 16, "lora_alpha": 32}\n',
        "gguf/Tiny-Q4_K_M.gguf": b"GGUF" + rnd(16_384, "q4"),
        "gguf/Tiny-Q8_0.gguf": b"GGUF" + rnd(32_768, "q8"),
        "gguf/Modelfile": b"FROM ./Tiny-Q4_K_M.gguf\nPARAMETER stop <|im_end|>\n",
    }
    for rel, data in files.items():
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        (export / rel).write_bytes(data)
    base = identify(BaseModelRef(id=EMBEDDED_ID, path=str(root / "no-such-base")))
    m = Artifacts(root=export, provenance=Provenance(source=str(run), run=str(run) if with_run else None,
                                                     base_model=base))
    m.add_tree(export / "merged", "merged")
    m.add_tree(export / "lora", "lora")
    m.add_file(export / "gguf/Tiny-Q4_K_M.gguf", "gguf:q4_k_m")
    m.add_file(export / "gguf/Tiny-Q8_0.gguf", "gguf:q8_0")
    m.add_file(export / "gguf/Modelfile", "modelfile")
    m.verify = VerifySection(status="ok", strict=False, adapter=str(run / "adapter"), base=EMBEDDED_ID,
                             adapter_sha256="ab" * 32,
                             summary=VerifySummary(modules=14, zero_b=0, zero_delta=0, max_abs_b=0.004,
                                                   delta_norm_min=0.0021, delta_norm_max=0.0123))

    def measured(type_: str, top1: float, kl: float) -> ParityResult:
        return ParityResult(type=type_, top1=top1, kl=kl, positions=945, floor=ParityFloor(top1=0.85, kl=0.15),
                            passed=True, tokenizer={"ok": True}, answer="19")

    m.parity = ParitySection(
        reference="base + adapter applied by PEFT (peft 0.21.0, unmerged) in transformers, float32 on cpu",
        probes={"texts": 9, "positions": 945, "kinds": {"prose": 2, "math": 2, "code": 2, "chat": 3},
                "system_prompt": "Think, then answer."},
        noise_floor=NoiseFloor(what="the reference in bf16 vs float32", top1=0.974, kl=0.001),
        reference_confidence=0.61, top1_gated=True, reference_answer="19",
        files={"Tiny-Q4_K_M.gguf": measured("q4_k_m", 0.889, 0.059), "Tiny-Q8_0.gguf": measured("q8_0", 0.971, 0.004)},
        passed=True)
    m.save()
    if not with_run:
        return export
    (run / "run.json").write_text(json.dumps({
        "config": {
            "model": {"max_seq_length": 1024},
            "data": {"dataset": "openai/gsm8k", "system_prompt": "Think, then answer."},
            "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "rewards": {"functions": ["correctness", "format_exact", "language_consistency"],
                        "weights": {"correctness": 2.0, "format_exact": 0.5}, "language": "id"},
            "trainer": {"backend": "trl", "max_steps": 2, "learning_rate": 5e-06, "num_generations": 4,
                        "temperature": 1.0},
        },
        "base_model": {"id": "embedded:SmolLM2-135M-Instruct", "path": str(root / "no-such-base")},
    }))
    (run / "summary.json").write_text(json.dumps({"steps": 2, "mean_reward_first": 0.25, "window": 1,
                                                  "mean_reward_last": 0.8125, "stop_reason": "max_steps"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.25}) + "\n"
                                       + json.dumps({"step": 2, "reward": 0.8125}) + "\n")
    return run
