"""Bad input to `grpoctl push` fails in one line before anything reaches the network; --dry-run plans offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.artifacts import Artifacts
from grpoctl.cli import cli
from grpoctl.errors import UsageError
from grpoctl.fsutil import human_bytes
from grpoctl.push.hub import push, validate_repo_id
from tests.hubserver import build_export


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return build_export(tmp_path)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # any request would go nowhere: these tests must fail (or plan) before the network
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_inputTestToken000000")


def _push(*args: str):
    return CliRunner().invoke(cli, ["push", *args])


@pytest.mark.parametrize("repo", ["alice", "alice/../x", "alice/..", "../x", "alice/x/y", "alice/x y", " alice/x",
                                  "alice/x--y", "alice/-x", "alice/x.git", "alice/", "/x", "al ice/x"])
def test_invalid_repo_id_is_a_usage_error(run_dir, repo):
    res = _push(str(run_dir), "--repo", repo)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("grpoctl: invalid repo id") and res.output.count("\n") == 1


def test_valid_repo_ids_pass():
    for repo in ("alice/tiny", "Org-1/qwen3.5_grpo", "a/b"):
        assert validate_repo_id(repo) == tuple(repo.split("/"))
    with pytest.raises(UsageError):
        validate_repo_id("a/" + "x" * 100)


def test_unknown_what_and_missing_family(run_dir):
    res = _push(str(run_dir), "--repo", "alice/tiny", "--what", "gguf,onnx")
    assert res.exit_code == 2 and "unknown --what onnx" in res.output
    res = _push(str(run_dir), "--repo", "alice/tiny", "--what", "merged-4bit")
    assert res.exit_code == 3 and "has no merged-4bit files" in res.output


def test_bad_repo_for_override(run_dir):
    res = _push(str(run_dir), "--repo", "alice/tiny", "--repo-for", "gguf")
    assert res.exit_code == 2 and "KIND=OWNER/NAME" in res.output
    res = _push(str(run_dir), "--repo", "alice/tiny", "--repo-for", "lora=alice/tiny")
    assert res.exit_code == 2 and "same repo" in res.output
    res = _push(str(run_dir), "--repo", "alice/tiny", "--repo-for", "gguf=alice/../g")
    assert res.exit_code == 2


def test_source_without_export(tmp_path):
    res = _push(str(tmp_path / "nope"), "--repo", "alice/tiny")
    assert res.exit_code == 3 and "does not exist" in res.output
    res = _push(str(tmp_path), "--repo", "alice/tiny")
    assert res.exit_code == 3 and "artifacts.json" in res.output


def test_dry_run_lists_repos_files_and_sizes_without_network(run_dir):
    report = push(run_dir, "alice/tiny", dry_run=True)
    manifest = Artifacts.load(run_dir / "export")
    by_repo = {r.repo_id: r for r in report.repos}
    assert list(by_repo) == ["alice/tiny", "alice/tiny-lora", "alice/tiny-GGUF"]
    gguf = by_repo["alice/tiny-GGUF"]
    assert {f.path_in_repo: f.size for f in gguf.files if f.local} == {
        f.path[len("gguf/"):]: f.size for f in manifest.files if f.path.startswith("gguf/")}
    res = _push(str(run_dir), "--repo", "alice/tiny", "--dry-run")
    assert res.exit_code == 0, res.output
    # the GGUF files, the Modelfile, the generated card and its reward curve
    assert f"alice/tiny-GGUF @ main  (5 files, {human_bytes(gguf.size)})" in res.output
    assert "Tiny-Q4_K_M.gguf" in res.output and "nothing was uploaded" in res.output


def test_manifest_path_outside_the_export_is_refused(run_dir):
    m = Artifacts.load(run_dir / "export")
    m.files[0].path = "gguf/../../run.json"
    m.save()
    res = _push(str(run_dir), "--repo", "alice/tiny", "--dry-run")
    assert res.exit_code == 7 and "outside the export" in res.output
