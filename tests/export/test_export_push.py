"""`grpoctl export --push`: the finished export lands on the Hub (protocol test against tests/hubserver.py, legacy
LFS path with HF_HUB_DISABLE_XET=1, not the real Hub)."""

from __future__ import annotations

import hashlib

from click.testing import CliRunner

from grpoctl.artifacts import Artifacts
from grpoctl.cli import cli


def test_protocol_no_xet_export_push_uploads_the_export_it_just_wrote(hub_env, qwen3_run, tmp_path):
    out = tmp_path / "export"
    res = CliRunner().invoke(cli, ["export", str(qwen3_run), "-o", str(out), "--lora", "-q", "--push", "alice/tiny"])
    assert res.exit_code == 0, res.output
    manifest = Artifacts.load(out)
    state = hub_env.state
    local = {f.path.removeprefix("lora/"): f.sha256 for f in manifest.by_kind("lora")}
    remote = state.head_files("alice/tiny-lora")
    assert set(local) <= set(remote)
    for name, sha in local.items():
        assert hashlib.sha256(state.content(remote[name])).hexdigest() == sha, name
    assert "README.md" in remote  # the generated model card


def test_export_push_with_an_invalid_repo_fails_before_any_work(qwen3_run, tmp_path):
    out = tmp_path / "export"
    res = CliRunner().invoke(cli, ["export", str(qwen3_run), "-o", str(out), "--push", "alice/../x"])
    assert res.exit_code == 2, res.output
    assert not out.exists()
