from __future__ import annotations

import hashlib
import json
import re

import pytest

from grpoctl.artifacts import SCHEMA_VERSION, Artifacts, Provenance, VerifySection, VerifySummary
from grpoctl.errors import DataError, InputNotFoundError
from grpoctl.rundir import BaseModelRef


def _verify() -> VerifySection:
    return VerifySection(status="ok", strict=False, adapter="/runs/a/adapter", base="x/y", adapter_sha256="0" * 64,
                         summary=VerifySummary(modules=4, zero_b=0, zero_delta=0, max_abs_b=0.1,
                                               delta_norm_min=0.01, delta_norm_max=0.2))


def test_artifacts_record_size_sha_and_sections_and_round_trip(tmp_path):
    (tmp_path / "gguf").mkdir()
    blob = b"GGUF" + bytes(range(200))
    (tmp_path / "gguf" / "M-Q4_K_M.gguf").write_bytes(blob)
    m = Artifacts(root=tmp_path, provenance=Provenance(base_model=BaseModelRef(id="x/y", path="/models/y")))
    m.add_file(tmp_path / "gguf" / "M-Q4_K_M.gguf", "gguf:q4_k_m", quant="Q4_K_M")
    m.verify = _verify()
    m.save()
    data = json.loads((tmp_path / "artifacts.json").read_text())
    (entry,) = data["files"]
    assert entry == {"path": "gguf/M-Q4_K_M.gguf", "kind": "gguf:q4_k_m", "size": len(blob),
                     "sha256": hashlib.sha256(blob).hexdigest(), "extra": {"quant": "Q4_K_M"}}
    assert data["schema"] == SCHEMA_VERSION and data["verify"]["summary"]["modules"] == 4
    assert data["provenance"]["base_model"] == {"id": "x/y", "path": "/models/y"}
    assert "torch" in data["provenance"]["libraries"]
    again = Artifacts.load(tmp_path)
    assert [f.path for f in again.by_kind("gguf")] == ["gguf/M-Q4_K_M.gguf"]
    assert again.ggufs()["q4_k_m"].size == len(blob)
    assert again.verify == m.verify and again.provenance == m.provenance


@pytest.mark.parametrize("command", ["manifests", "serve", "push"])
def test_a_record_of_another_schema_is_one_line_and_a_non_zero_exit(tmp_path, command):
    """The untyped schema-1 record (what earlier grpoctl wrote) and a future schema alike: each later stage refuses
    it in one line saying to re-export, before reading any of its sections."""
    from click.testing import CliRunner

    from grpoctl.cli import cli

    (tmp_path / "artifacts.json").write_text(json.dumps({
        "schema": 1, "grpoctl_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00",
        "provenance": {"base_model": {"id": "embedded:SmolLM2-135M-Instruct"}}, "files": [],
        "verify": {"status": "ok", "summary": {"modules": 4}}}))
    args = {"manifests": [str(tmp_path)], "serve": [str(tmp_path), "--engine", "llamacpp"],
            "push": [str(tmp_path), "--repo", "alice/tiny", "--dry-run"]}[command]
    res = CliRunner().invoke(cli, [command, *args])
    assert res.exit_code == 4 and "Traceback" not in res.output, res.output
    (line,) = [x for x in res.output.splitlines() if x.strip()]
    assert line.startswith("grpoctl: ") and "has schema 1;" in line and "re-export" in line, line


@pytest.mark.parametrize(("change", "says"), [
    (lambda d: {**d, "schema": 3}, "has schema 3; this grpoctl"),
    (lambda d: {**d, "verify": {**d["verify"], "modules_trained": 14}}, '"verify.modules_trained" is not a key'),
    (lambda d: {**d, "verify": {**d["verify"], "summary": {"modules": "4"}}}, "verify.summary lacks zero_b"),
    (lambda d: {**d, "parity": {"files": {}}}, "parity lacks reference"),
])
def test_a_record_of_another_shape_is_one_line_naming_the_key(tmp_path, change, says):
    m = Artifacts(root=tmp_path, verify=_verify())
    m.save()
    path = tmp_path / "artifacts.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(DataError, match=re.escape(says)):
        Artifacts.load(tmp_path)


def test_adding_a_file_twice_keeps_one_entry(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("1")
    m = Artifacts(root=tmp_path)
    m.add_file(f, "report")
    f.write_text("22")
    m.add_file("a.txt", "report")
    assert len(m.files) == 1 and m.files[0].size == 2


def test_load_without_manifest_says_what_to_run(tmp_path):
    with pytest.raises(InputNotFoundError, match="grpoctl export"):
        Artifacts.load(tmp_path)


def test_paths_relative_to_the_working_directory_are_recorded_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel_root = tmp_path.relative_to(tmp_path) / "runs" / "demo"
    (rel_root / "gguf").mkdir(parents=True)
    (rel_root / "gguf" / "a.gguf").write_bytes(b"x")
    m = Artifacts(root=rel_root)
    assert m.add_file(rel_root / "gguf" / "a.gguf", "gguf:q8_0").path == "gguf/a.gguf"
    assert m.add_file("gguf/a.gguf", "gguf:q8_0").path == "gguf/a.gguf"
    assert len(m.files) == 1
