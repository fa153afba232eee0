"""Publish an export to the Hugging Face Hub: one repo per artifact family, each with its model card.

    merged        -> OWNER/NAME            (transformers, 16-bit safetensors)
    merged-4bit   -> OWNER/NAME-bnb-4bit   (transformers + bitsandbytes nf4)
    lora          -> OWNER/NAME-lora       (PEFT adapter)
    gguf          -> OWNER/NAME-GGUF       (llama.cpp / Ollama files + Modelfile)

Everything goes through huggingface_hub (``create_repo``, ``get_paths_info``, ``create_commit``); no
request to the Hub is written by hand. Idempotence: before a commit, the remote sha256 (LFS files) or
git blob id (small files) of every path is compared with the local one, and unchanged files are left out;
when nothing changed, no commit is made. Resumption: LFS objects that reached the Hub before an
interruption are reported present by the LFS batch endpoint (or deduplicated by Xet storage), so a re-run
sends only what is missing. Every local file is checked against ``artifacts.json`` first, so a file that
changed or was truncated after export is never published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from grpoctl.argtypes import checked
from grpoctl.artifacts import ARTIFACTS_FILE, Artifacts, FileEntry, find_export
from grpoctl.errors import HubError, InputNotFoundError, OfflineError, UsageError, VerificationError
from grpoctl.exportlayout import GGUF_DIR, LORA_DIR, MERGED_4BIT_DIR, MERGED_DIR
from grpoctl.fsutil import DISK_FULL, disk_full_error, human_bytes
from grpoctl.options import option

# kind -> (default repo suffix, directory prefix stripped from paths in the repo)
FAMILIES: dict[str, tuple[str, str]] = {
    "merged": ("", f"{MERGED_DIR}/"),
    "merged-4bit": ("-bnb-4bit", f"{MERGED_4BIT_DIR}/"),
    "lora": ("-lora", f"{LORA_DIR}/"),
    "gguf": ("-GGUF", f"{GGUF_DIR}/"),
}
ORDER = ("merged", "merged-4bit", "lora", "gguf")
_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_MAX_REPO_ID = 96
T = TypeVar("T")


@dataclass
class PushFile:
    """One file of a repo: where it comes from, where it goes, and what happened to it."""

    path_in_repo: str
    local: Path | None  # None for a file push generates (the model card, its reward plot)
    size: int
    sha256: str
    status: str = "planned"  # planned | new | changed | unchanged
    data: bytes | None = None  # a generated file's bytes


@dataclass
class RepoPush:
    kind: str
    repo_id: str
    files: list[PushFile] = field(default_factory=list)
    url: str | None = None
    commit: str | None = None  # None: nothing committed (dry run or already up to date)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def changed(self) -> list[PushFile]:
        return [f for f in self.files if f.status in ("new", "changed")]


@dataclass
class PushReport:
    source: Path
    revision: str
    dry_run: bool
    repos: list[RepoPush] = field(default_factory=list)
    stale: str | None = None  # why the export is older than its run's adapter (pushed with allow_stale)

    def lines(self) -> list[str]:
        """Human-readable summary, one repo block after another (what the CLI prints)."""
        out: list[str] = [f"warning: {self.stale}"] if self.stale else []
        for r in self.repos:
            if self.dry_run:
                head = f"{r.kind:<12} -> {r.repo_id} @ {self.revision}  ({len(r.files)} files, {human_bytes(r.size)})"
            elif r.commit:
                head = (f"{r.kind:<12} -> {r.repo_id} @ {self.revision}  committed {len(r.changed)} of "
                        f"{len(r.files)} files ({human_bytes(sum(f.size for f in r.changed))}), commit {r.commit[:12]}")
            else:
                head = f"{r.kind:<12} -> {r.repo_id} @ {self.revision}  up to date ({len(r.files)} files), no commit"
            out.append(head)
            for f in r.files:
                out.append(f"    {f.status:<9} {human_bytes(f.size):>10}  {f.path_in_repo}")
            if r.url and not self.dry_run:
                out.append(f"    {r.url}")
        return out


# --- input ---------------------------------------------------------------------------------------
def validate_repo_id(repo: str) -> tuple[str, str]:
    """``OWNER/NAME`` with Hub-legal parts; rejects path tricks before anything is sent."""
    if not isinstance(repo, str) or repo != repo.strip() or any(c.isspace() for c in repo):
        raise UsageError(f"invalid repo id {repo!r}: it must be OWNER/NAME without spaces")
    parts = repo.split("/")
    if len(parts) != 2:
        raise UsageError(f"invalid repo id {repo!r}: expected exactly OWNER/NAME (one '/'), e.g. alice/qwen3-grpo")
    for part in parts:
        if part in (".", "..") or ".." in part or "--" in part or not _PART.match(part) or part.endswith(".git"):
            raise UsageError(f"invalid repo id {repo!r}: {part!r} is not a valid Hub name (letters, digits, "
                             "'-', '_', '.'; no '..' or '--'; must start and end with a letter or digit)")
    if len(repo) > _MAX_REPO_ID:
        raise UsageError(f"invalid repo id {repo!r}: longer than {_MAX_REPO_ID} characters")
    return parts[0], parts[1]


def parse_what(what: list[str] | str | None, artifacts: Artifacts) -> list[str]:
    """Kinds to push; by default every family the export holds, in a fixed order."""
    present = [k for k in ORDER if family_files(artifacts, k)]
    if what is None:
        if not present:
            raise InputNotFoundError(f"{artifacts.root / ARTIFACTS_FILE} lists no merged, merged-4bit, lora or gguf "
                                     "files; nothing to push")
        return present
    items = what.split(",") if isinstance(what, str) else list(what)
    kinds = [w.strip().lower() for w in items if w.strip()]
    unknown = [k for k in kinds if k not in FAMILIES]
    if unknown or not kinds:
        raise UsageError(f"unknown --what {','.join(unknown) or '(empty)'}; choose from {','.join(ORDER)}")
    missing = [k for k in kinds if k not in present]
    if missing:
        have = ", ".join(present) or "none"
        raise InputNotFoundError(f"the export has no {', '.join(missing)} files (it has: {have});"
                                 " re-run `grpoctl export` with that output or drop it from --what")
    return [k for k in ORDER if k in kinds]


def repo_names(repo: str, kinds: list[str], names: dict[str, str] | None = None) -> dict[str, str]:
    """Repo id per kind: the Hub's conventional suffixes unless overridden."""
    validate_repo_id(repo)
    names = dict(names or {})
    unknown = [k for k in names if k not in FAMILIES]
    if unknown:
        raise UsageError(f"unknown repo kind {','.join(unknown)}; choose from {','.join(ORDER)}")
    out = {}
    for kind in kinds:
        rid = names.get(kind) or repo + FAMILIES[kind][0]
        validate_repo_id(rid)
        out[kind] = rid
    if len(set(out.values())) != len(out):
        raise UsageError(f"two artifact families would go to the same repo ({out}); give them distinct names")
    return out


def family_files(artifacts: Artifacts, kind: str) -> list[FileEntry]:
    """The files of one family's repo, in path order."""
    prefix = FAMILIES[kind][1]
    # the GGUF repo carries everything under gguf/: quantized files, Modelfile, parity report
    files = [f for f in artifacts.files if f.path.startswith(prefix) and (kind == "gguf" or f.kind == kind)]
    return sorted(files, key=lambda e: e.path)


# --- planning --------------------------------------------------------------------------------------
def plan(artifacts: Artifacts, repos: dict[str, str], revision: str) -> list[tuple[RepoPush, bytes]]:
    """Every repo with its files and generated model card; touches nothing remote."""
    from grpoctl.push.modelcard import REWARD_PLOT, CardContext, render_card, reward_plot

    export_dir = artifacts.root
    ctx = CardContext(artifacts=artifacts, run=artifacts.run, repos=repos, revision=revision)
    out = []
    for kind, repo_id in repos.items():
        prefix = FAMILIES[kind][1]
        push = RepoPush(kind=kind, repo_id=repo_id)
        entries = family_files(artifacts, kind)
        for entry in entries:
            in_repo = entry.path[len(prefix):]
            if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts or "\\" in entry.path:
                raise VerificationError(f"{ARTIFACTS_FILE} lists {entry.path!r}, which points outside the export "
                                        "directory; re-run `grpoctl export` instead of publishing it")
            if in_repo == "README.md":  # the generated card replaces whatever the exporter left
                continue
            push.files.append(PushFile(path_in_repo=in_repo, local=export_dir / entry.path, size=entry.size,
                                       sha256=entry.sha256))
        taken = {f.path_in_repo for f in push.files}
        plot = reward_plot(ctx) if REWARD_PLOT not in taken else None
        card = render_card(kind, ctx, entries, prefix, reward_plot=REWARD_PLOT if plot else None).encode()
        for name, data in (("README.md", card), (REWARD_PLOT, plot)):
            if data is not None:
                push.files.append(PushFile(path_in_repo=name, local=None, size=len(data),
                                           sha256=hashlib.sha256(data).hexdigest(), data=data))
        out.append((push, card))
    return out


def check_local_files(pushes: list[RepoPush]) -> None:
    """Refuse to publish a file that no longer matches ``artifacts.json`` (edited, truncated, missing)."""
    from tqdm.auto import tqdm

    from grpoctl.fsutil import sha256_file

    files = [f for p in pushes for f in p.files if f.local is not None]
    for f in tqdm(files, desc="checking sha256", unit="file", disable=len(files) < 2 or None):
        if not f.local.is_file():
            raise VerificationError(f"{f.local} is listed in {ARTIFACTS_FILE} but missing; re-run `grpoctl export`")
        if f.local.stat().st_size != f.size or sha256_file(f.local) != f.sha256:
            raise VerificationError(f"{f.local} changed since export (size or sha256 differs from {ARTIFACTS_FILE}); "
                                    "re-run `grpoctl export` instead of publishing it")


# --- errors --------------------------------------------------------------------------------------
def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    # any Hub token shape that slipped into a server message
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    return text.splitlines()[0] if text.strip() else text


def hub_call(fn: Callable[[], T], repo_id: str, endpoint: str, token: str | None, revision: str | None = None) -> T:
    """Run one Hub interaction; failures become one actionable line and the token never leaks through.

    The typed error is raised after the ``except`` block so it carries no ``__context__``: the original
    exception holds the HTTP request, whose headers hold the token.
    """
    mapped: Exception | None = None
    try:
        return fn()
    except Exception as err:  # every failure is mapped, or re-raised unchanged
        mapped = _map_error(err, repo_id, endpoint, token, revision)
        if mapped is None:
            raise
    raise mapped


def _map_error(err: BaseException, repo_id: str, endpoint: str, token: str | None,
               revision: str | None) -> Exception | None:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    owner = repo_id.split("/")[0]
    # huggingface_hub wraps upload failures (RuntimeError "Error while uploading ...") around the real cause
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:  # huggingface_hub's caches (Xet chunks, HF_HOME)
            from huggingface_hub import constants

            where = Path(seen.filename).parent if seen.filename else Path(constants.HF_HOME)
            return disk_full_error(seen, where, cleaned=False)
        if isinstance(seen, OfflineModeIsEnabled):
            return OfflineError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and check the network) "
                                "to publish, or use --dry-run to see the plan")
        if isinstance(seen, RevisionNotFoundError):
            return HubError(f"revision {revision!r} does not exist in {repo_id} (404); create the branch first "
                            f"(`hf repos branch create {repo_id} {revision}`) or drop --revision")
        if isinstance(seen, RepositoryNotFoundError):
            return HubError(f"repo {repo_id} not found or not accessible (404); check the name and that your token "
                            "can see it (`hf auth whoami`)")
        if isinstance(seen, HfHubHTTPError):
            status = seen.response.status_code if seen.response is not None else None
            if status == 401:
                return HubError("the Hub rejected the token (401 Unauthorized); log in with `hf auth login` or set "
                                "HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)")
            if status == 403:
                return HubError(f"no write access to the namespace {owner!r} (403 Forbidden); use a token with write "
                                f"permission for {owner!r} or push to your own namespace")
            server = _scrub(getattr(seen, "server_message", "") or "", token)
            detail = f": {server}" if server else ""
            return HubError(f"the Hub refused the push to {repo_id} (HTTP {status}){detail}")
        if isinstance(seen, (*_transport_errors(), ConnectionError, TimeoutError)):
            return OfflineError(f"cannot reach the Hub at {endpoint} ({type(seen).__name__}); check the network or "
                                "HF_ENDPOINT and re-run: finished uploads are not sent again")
        seen = seen.__cause__
    if isinstance(err, ValueError):  # huggingface_hub validation (e.g. model card metadata)
        return HubError(f"huggingface_hub rejected the push to {repo_id}: {_scrub(str(err), token)}")
    if isinstance(err, RuntimeError) and "uploading" in str(err):
        return HubError(f"upload to {repo_id} failed: {_scrub(str(err), token)}; re-run to resume")
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever httpx flavour huggingface_hub runs on (2.x uses ``httpx2``)."""
    out: list[type[BaseException]] = []
    for mod in ("httpx2", "httpx"):
        try:
            out.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


# --- the push ---------------------------------------------------------------------------------------
@dataclass
class PushOptions:
    """What ``grpoctl push`` takes besides the export: :func:`push`'s keyword arguments, each the flag of the same
    name (``--repo-for``'s ``KIND=OWNER/NAME`` values are parsed here, once, into ``{kind: repo id}``)."""

    repo: str = option(dataclasses.MISSING, metavar="OWNER/NAME", help="Repo of the merged model; the adapter goes "
                       "to NAME-lora, GGUF files to NAME-GGUF, 4-bit weights to NAME-bnb-4bit.")
    what: str | list[str] | None = option(metavar="KINDS", help="Comma-separated families to push: "
                                          "merged,merged-4bit,lora,gguf (default: all in the export).")
    repo_for: list[str] | dict[str, str] | None = option(multiple=True, metavar="KIND=OWNER/NAME",
                                                         help="Override one family's repo, e.g. --repo-for "
                                                         "gguf=alice/my-gguf (repeatable).")
    private: bool = option(False, help="Create new repos as private (existing repos keep their visibility).")
    revision: str | None = option(metavar="BRANCH", help="Existing branch to commit to (default: main).")
    dry_run: bool = option(False, help="List what would go where, with sizes; needs no network or token.")
    allow_stale: bool = option(False, help="Publish the export even though the run's adapter changed after it was "
                               "made (e.g. trained further with --resume).")

    def __post_init__(self) -> None:
        if isinstance(self.repo_for, (list, tuple)):
            self.repo_for = repo_overrides(self.repo_for) or None


def repo_overrides(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["gguf=alice/q"]`` -> ``{"gguf": "alice/q"}``; UsageError for a value that is not KIND=OWNER/NAME."""
    out = {}
    for v in values:
        kind, sep, repo_id = v.partition("=")
        if not sep or not kind.strip() or not repo_id.strip():
            raise UsageError(f"invalid value for --repo-for: {v!r} is not KIND=OWNER/NAME")
        out[kind.strip().lower()] = repo_id.strip()
    return out


@checked
def push(source: Path, repo: str, *, what: list[str] | str | None = None, private: bool = False,
         revision: str | None = None, dry_run: bool = False, token: str | None = None,
         repo_for: dict[str, str] | None = None, num_threads: int = 4, allow_stale: bool = False,
         names: dict[str, str] | None = None) -> PushReport:
    """Publish an export (``RUN`` or ``RUN/export``) to the Hub, one repo per artifact family.

    Arguments:
        source: a run directory (its ``export/`` is used) or an export directory with ``artifacts.json``.
        repo: ``OWNER/NAME`` for the merged model; the other families get ``-bnb-4bit``, ``-lora``, ``-GGUF``.
        what: families to push (merged, merged-4bit, lora, gguf); default: all the export holds.
        private: create new repos as private (existing repos keep their visibility).
        revision: branch to commit to (must exist); default ``main``.
        dry_run: only plan: list repos, files and sizes, without network or token.
        token: Hub token; default ``HF_TOKEN`` or the token stored by ``hf auth login``.
        repo_for: per-family repo id overrides, e.g. ``{"gguf": "alice/q-gguf"}`` (``--repo-for``; ``names``
            is its former spelling, still accepted).
        allow_stale: publish an export whose run's adapter changed since (trained further); refused otherwise.
    """
    artifacts = find_export(source)
    stale = artifacts.stale()
    if stale and not allow_stale:
        raise VerificationError(f"{stale}; pass --allow-stale to publish the old export anyway")
    kinds = parse_what(what, artifacts)
    repos = repo_names(repo, kinds, repo_for if repo_for is not None else names)
    if revision is not None and (not revision.strip() or any(c.isspace() for c in revision) or ".." in revision):
        raise UsageError(f"invalid --revision {revision!r}: give a branch name")
    rev = revision or "main"
    planned = plan(artifacts, repos, rev)
    report = PushReport(source=artifacts.root, revision=rev, dry_run=dry_run, repos=[p for p, _ in planned],
                        stale=stale)
    check_local_files(report.repos)
    if dry_run:
        return report

    from huggingface_hub import HfApi, constants, get_token

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if _offline():
        raise OfflineError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and check the network) to "
                           "publish, or use --dry-run to see the plan")
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN to a token with write access")
    api = HfApi(endpoint=endpoint, token=token)
    hub_call(api.whoami, repo, endpoint, token)
    for push_, _card in planned:
        _push_repo(api, push_, rev, revision, private, endpoint, token, num_threads)
    return report


def _push_repo(api, push_: RepoPush, rev: str, revision: str | None, private: bool,
               endpoint: str, token: str, num_threads: int) -> None:
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils.sha import git_hash

    rid = push_.repo_id

    def prepare() -> dict:
        push_.url = str(api.create_repo(rid, private=private, exist_ok=True, repo_type="model"))
        if revision is not None:
            api.repo_info(rid, revision=revision)  # 404 here is clearer than one mid-upload
        return {p.path: p for p in api.get_paths_info(rid, [f.path_in_repo for f in push_.files], revision=rev)}

    remote = hub_call(prepare, rid, endpoint, token, revision)

    ops = []
    for f in push_.files:
        r = remote.get(f.path_in_repo)
        data = f.data if f.local is None else None
        if r is None or not hasattr(r, "blob_id"):
            f.status = "new"
        elif r.lfs is not None:
            f.status = "unchanged" if r.lfs.sha256 == f.sha256 else "changed"
        else:
            local_blob = git_hash(data if data is not None else f.local.read_bytes()) if f.size < (10 << 20) else None
            f.status = "unchanged" if local_blob == r.blob_id else "changed"
        if f.status == "unchanged":
            continue
        op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=data if data is not None else str(f.local))
        # artifacts.json already holds the verified sha256: spare huggingface_hub a second full read
        op.upload_info.sha256 = bytes.fromhex(f.sha256)
        ops.append(op)
    if not ops:
        return
    what = ", ".join(f.path_in_repo for f in push_.files if f.status != "unchanged")
    message = f"grpoctl push: {push_.kind} ({len(ops)} file{'s' if len(ops) != 1 else ''})"
    info = hub_call(lambda: api.create_commit(rid, ops, commit_message=message, commit_description=f"Files: {what}",
                                              revision=rev, num_threads=num_threads),
                    rid, endpoint, token, revision)
    push_.commit = info.oid
