"""Protocol tests: `grpoctl push` against a local Hub server (tests/hubserver.py) over real HTTP.

The server speaks only the legacy LFS upload path, so every test runs huggingface_hub with Xet disabled
(HF_HUB_DISABLE_XET=1, "no_xet" in the test names): real pushes to huggingface.co go through Xet storage,
which cannot run here.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.artifacts import Artifacts
from grpoctl.cli import cli
from grpoctl.report import reward_chart
from grpoctl.rundir import RunDir
from tests.hubserver import FakeHub, build_export

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_aliceWriteToken0123456789"
BAD_TOKEN = "hf_revokedToken9876543210zz"
LFS_PATHS = ("merged/model.safetensors", "lora/adapter_model.safetensors", "gguf/Tiny-Q4_K_M.gguf",
             "gguf/Tiny-Q8_0.gguf")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return build_export(tmp_path / "work")


def _push(*args: str):
    return CliRunner().invoke(cli, ["push", *args], catch_exceptions=False)


def _subprocess_env(hub: FakeHub, tmp_path: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-sub"),
               HF_HUB_OFFLINE="0", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


def _remote_files(hub: FakeHub, repo_id: str, revision: str = "main") -> dict[str, tuple[int, str]]:
    """(size, sha256) per file as the Hub reports and serves them (tree listing + resolve downloads)."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=hub.url, token=TOKEN)
    out = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=revision):
        if entry.path == ".gitattributes" or not hasattr(entry, "blob_id"):
            continue
        local = hf_hub_download(repo_id, entry.path, revision=revision, endpoint=hub.url, token=TOKEN,
                                cache_dir=os.environ["HF_HOME"] + "/dl")
        digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()
        if entry.lfs is not None:
            assert entry.lfs.sha256 == digest
        out[entry.path] = (entry.size, digest)
    return out


def test_protocol_no_xet_push_remote_files_equal_local_artifacts(hub_env, run_dir):
    res = _push(str(run_dir), "--repo", "alice/tiny")
    assert res.exit_code == 0, res.output
    manifest = Artifacts.load(run_dir / "export")
    expected = {
        "alice/tiny": "merged/", "alice/tiny-lora": "lora/", "alice/tiny-GGUF": "gguf/",
    }
    for repo_id, prefix in expected.items():
        remote = _remote_files(hub_env, repo_id)
        local = {f.path[len(prefix):]: (f.size, f.sha256) for f in manifest.files if f.path.startswith(prefix)}
        readme = remote.pop("README.md")
        assert readme[0] > 0
        plot = remote.pop("reward.svg")  # the reward curve the card shows, drawn from the run's metrics
        assert plot[1] == hashlib.sha256(reward_chart(RunDir(run_dir)).encode()).hexdigest()
        assert remote == local
        assert len(hub_env.state.commits_to(repo_id)) == 1
    # large files went through LFS, each exactly once
    lfs_oids = {f.sha256 for f in manifest.files if f.path in LFS_PATHS}
    assert sorted(hub_env.state.lfs_puts) == sorted(lfs_oids)
    # huggingface_hub had the generated card's metadata validated before uploading
    assert ("POST", "/api/validate-yaml") in hub_env.state.requests
    assert "alice/tiny-GGUF @ main  committed 5 of 5 files" in res.output


def test_protocol_no_xet_second_push_makes_no_commit_and_uploads_nothing(hub_env, run_dir):
    assert _push(str(run_dir), "--repo", "alice/tiny").exit_code == 0
    commits, puts = list(hub_env.state.commit_log), list(hub_env.state.lfs_puts)
    seen = len(hub_env.state.requests)

    res = _push(str(run_dir / "export"), "--repo", "alice/tiny")  # the export dir itself this time
    assert res.exit_code == 0, res.output
    assert hub_env.state.commit_log == commits
    assert hub_env.state.lfs_puts == puts
    second = hub_env.state.requests[seen:]
    assert not [r for r in second if "/commit/" in r[1] or "/lfs/" in r[1] or r[1].startswith("/_lfs/")]
    assert res.output.count("up to date") == 3


def test_protocol_no_xet_changed_file_commits_only_that_file(hub_env, run_dir):
    assert _push(str(run_dir), "--repo", "alice/tiny", "--what", "gguf").exit_code == 0
    export = run_dir / "export"
    (export / "gguf/Tiny-Q8_0.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    m = Artifacts.load(export)
    m.add_file(export / "gguf/Tiny-Q8_0.gguf", "gguf:q8_0")
    m.save()
    res = _push(str(run_dir), "--repo", "alice/tiny", "--what", "gguf")
    assert res.exit_code == 0, res.output
    _, _, paths = hub_env.state.commit_log[-1]
    assert sorted(paths) == ["README.md", "Tiny-Q8_0.gguf"]  # the card lists the new sha256
    assert _remote_files(hub_env, "alice/tiny-GGUF")["Tiny-Q8_0.gguf"][1] == m.by_kind("gguf:q8_0")[0].sha256


def test_protocol_no_xet_killed_push_resumes_without_resending_finished_files(hub_env, run_dir, tmp_path):
    state = hub_env.state
    # merged (1 LFS file) and lora (1) complete, the GGUF repo gets one of its two files before the stall
    state.hang_uploads_after = 3
    env = _subprocess_env(hub_env, tmp_path, TOKEN)
    cmd = [sys.executable, "-m", "grpoctl", "push", str(run_dir), "--repo", "alice/tiny"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while state.hanging == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.hanging >= 1, proc.communicate(timeout=5)
        while len(state.lfs_puts) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    state.hang_uploads_after = None
    state.release()

    sent_before = list(state.lfs_puts)
    assert len(sent_before) == 3
    assert state.commits_to("alice/tiny-GGUF") == []  # killed before its commit

    res = _push(str(run_dir), "--repo", "alice/tiny")
    assert res.exit_code == 0, res.output
    resent = state.lfs_puts[len(sent_before):]
    assert len(resent) == 1 and resent[0] not in sent_before  # only the file that never arrived
    manifest = Artifacts.load(run_dir / "export")
    assert {f.sha256 for f in manifest.files if f.path in LFS_PATHS} == set(state.lfs_puts)
    assert len(state.commits_to("alice/tiny")) == 1  # finished repos got no second commit
    assert len(state.commits_to("alice/tiny-GGUF")) == 1
    remote = _remote_files(hub_env, "alice/tiny-GGUF")
    assert remote["Tiny-Q4_K_M.gguf"][1] == manifest.by_kind("gguf:q4_k_m")[0].sha256
    assert remote["Tiny-Q8_0.gguf"][1] == manifest.by_kind("gguf:q8_0")[0].sha256


def test_protocol_no_xet_bad_token_fails_and_never_prints_it(hub_env, run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    res = CliRunner().invoke(cli, ["push", str(run_dir), "--repo", "alice/tiny"])
    assert res.exit_code == 12
    assert BAD_TOKEN not in res.output and BAD_TOKEN not in (res.stderr or "")
    assert "401" in res.output and "hf auth login" in res.output
    assert not hub_env.state.commit_log

    proc = subprocess.run([sys.executable, "-m", "grpoctl", "push", str(run_dir), "--repo", "alice/tiny"],
                          cwd=ROOT, env=_subprocess_env(hub_env, tmp_path, BAD_TOKEN), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 12
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("grpoctl: ")


def test_protocol_no_xet_foreign_namespace_is_403(hub_env, run_dir):
    res = _push(str(run_dir), "--repo", "bob/tiny", "--what", "lora")
    assert res.exit_code == 12
    assert "no write access to the namespace 'bob'" in res.output
    assert TOKEN not in res.output
    assert "bob/tiny-lora" not in hub_env.state.repos


def test_protocol_no_xet_org_namespace_and_name_override(hub_env, run_dir):
    res = _push(str(run_dir), "--repo", "grpo-org/tiny", "--what", "gguf,lora",
                "--repo-for", "gguf=grpo-org/tiny-quants", "--private")
    assert res.exit_code == 0, res.output
    assert set(hub_env.state.repos) == {"grpo-org/tiny-quants", "grpo-org/tiny-lora"}
    assert all(r.private for r in hub_env.state.repos.values())


def test_protocol_no_xet_missing_revision_is_404_then_branch_push_works(hub_env, run_dir):
    from huggingface_hub import HfApi

    res = _push(str(run_dir), "--repo", "alice/tiny", "--what", "lora", "--revision", "dev")
    assert res.exit_code == 12
    assert "revision 'dev' does not exist in alice/tiny-lora" in res.output
    HfApi(endpoint=hub_env.url, token=TOKEN).create_branch("alice/tiny-lora", branch="dev")
    res = _push(str(run_dir), "--repo", "alice/tiny", "--what", "lora", "--revision", "dev")
    assert res.exit_code == 0, res.output
    assert "adapter_model.safetensors" in hub_env.state.head_files("alice/tiny-lora", "dev")
    assert "adapter_model.safetensors" not in hub_env.state.head_files("alice/tiny-lora", "main")


def test_protocol_no_network_and_offline_mode_exit_10(hub_env, run_dir, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    res = _push(str(run_dir), "--repo", "alice/tiny")
    assert res.exit_code == 10 and "cannot reach the Hub" in res.output

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = _push(str(run_dir), "--repo", "alice/tiny")
    assert res.exit_code == 10 and "HF_HUB_OFFLINE" in res.output
    # planning needs neither network nor token
    assert _push(str(run_dir), "--repo", "alice/tiny", "--dry-run").exit_code == 0


def test_protocol_no_xet_tampered_artifact_is_refused_before_upload(hub_env, run_dir):
    gguf = run_dir / "export" / "gguf" / "Tiny-Q4_K_M.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-100])  # truncated after export
    res = _push(str(run_dir), "--repo", "alice/tiny")
    assert res.exit_code == 7 and "changed since export" in res.output
    assert not hub_env.state.repos and not hub_env.state.lfs_puts


def test_protocol_no_xet_library_error_carries_no_token_or_original_request(hub_env, run_dir):
    from grpoctl.errors import HubError
    from grpoctl.push.hub import push

    with pytest.raises(HubError) as info:
        push(run_dir, "alice/tiny", token=BAD_TOKEN)
    err = info.value
    # the original httpx error holds the request and its Authorization header: it must not travel along
    assert err.__cause__ is None and err.__context__ is None
    assert BAD_TOKEN not in str(err) and BAD_TOKEN not in repr(err)


def test_protocol_no_xet_model_card_on_the_hub_parses_and_holds_no_token(hub_env, run_dir):
    from huggingface_hub import ModelCard, hf_hub_download, metadata_load

    assert _push(str(run_dir), "--repo", "alice/tiny", "--what", "gguf").exit_code == 0
    path = hf_hub_download("alice/tiny-GGUF", "README.md", endpoint=hub_env.url, token=TOKEN,
                           cache_dir=os.environ["HF_HOME"] + "/dl")
    text = Path(path).read_text()
    assert TOKEN not in text
    meta = metadata_load(path)
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"] and "grpo" in meta["tags"]
    assert ModelCard(text).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_protocol_no_xet_huggingface_hub_itself_skips_unchanged_files(hub_env):
    """The second safety net: even without grpoctl's pre-check, huggingface_hub compares the remote oid from
    the preupload answer with the local one and makes no commit when nothing changed."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    api.create_repo("alice/raw", exist_ok=True)
    blob = os.urandom(8192)

    def ops():
        return [CommitOperationAdd("w.safetensors", blob), CommitOperationAdd("notes.txt", b"hello\n")]

    first = api.create_commit("alice/raw", ops(), commit_message="one")
    puts = len(hub_env.state.lfs_puts)
    again = api.create_commit("alice/raw", ops(), commit_message="two")
    assert again.oid == first.oid
    assert len(hub_env.state.commits_to("alice/raw")) == 1
    assert len(hub_env.state.lfs_puts) == puts


def test_protocol_no_xet_gguf_repo_gets_the_ollama_template_system_and_params_at_its_root(hub_env, tmp_path,
                                                                                            tiny_qwen3):
    """`ollama run hf.co/alice/tiny-GGUF` reads `template`, `system` and `params` at the repo's root (the Hub's
    Ollama docs): push puts there the files the manifests wrote, which say what the Modelfile says."""
    from grpoctl.manifests.api import ManifestOptions, write_manifests
    from grpoctl.rundir import RunDir
    from tests.manifests.conftest import TEMPLATES, write_export, write_run
    from tests.manifests.test_hub_ollama_files import hub_files_departures

    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False, system_prompt="Think, then answer.")
    export = write_export(run)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "smollm2.jinja"))
    assert hub_files_departures(export / "gguf") == []
    res = _push(str(run), "--repo", "alice/tiny", "--what", "gguf")
    assert res.exit_code == 0, res.output
    remote = _remote_files(hub_env, "alice/tiny-GGUF")
    for name in ("template", "system", "params"):
        local = (export / "gguf" / name).read_bytes()
        assert remote[name] == (len(local), hashlib.sha256(local).hexdigest()), name
    state = hub_env.state
    card = state.content(state.head_files("alice/tiny-GGUF")["README.md"]).decode()
    assert "reads `template`, `system`, `params` from this repo" in card
