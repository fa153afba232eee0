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


def _imatrix_export(tmp_path, **section):
    from grpoctl.artifacts import CalibrationRecord, ImatrixSection

    (tmp_path / "gguf").mkdir()
    for name in ("M-Q4_K_M.gguf", "M-imatrix.gguf"):
        (tmp_path / "gguf" / name).write_bytes(b"GGUF" + name.encode())
    m = Artifacts(root=tmp_path)
    m.add_file(tmp_path / "gguf" / "M-Q4_K_M.gguf", "gguf:q4_k_m", imatrix="M-imatrix.gguf")
    matrix = m.add_file(tmp_path / "gguf" / "M-imatrix.gguf", "imatrix")
    cal = CalibrationRecord(source="run", file="M-calibration.txt", tokens=900, characters=3000, documents=64,
                            sampling={"temperature": 1.0})
    m.imatrix = ImatrixSection(**{"file": "M-imatrix.gguf", "sha256": matrix.sha256, "source": "computed",
                                  "entries": 14, "types": ["q4_k_m"], "held_out": True, "calibration": cal,
                                  "chunks": 3, "datasets": ["M-calibration.txt"], **section})
    return m


def test_the_imatrix_record_round_trips_with_the_quants_marked_and_its_keys_checked(tmp_path):
    m = _imatrix_export(tmp_path)
    m.save()
    data = json.loads((tmp_path / "artifacts.json").read_text())
    quant = next(f for f in data["files"] if f["kind"] == "gguf:q4_k_m")
    assert quant["imatrix"] == "M-imatrix.gguf" and "imatrix" not in next(f for f in data["files"]
                                                                           if f["kind"] == "imatrix")
    assert data["imatrix"]["calibration"]["documents"] == 64 and data["imatrix"]["held_out"] is True
    again = Artifacts.load(tmp_path)
    assert again.imatrix == m.imatrix and again.ggufs()["q4_k_m"].imatrix == "M-imatrix.gguf"

    data["imatrix"]["calibration"]["prompts"] = 64
    (tmp_path / "artifacts.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape('"imatrix.calibration.prompts" is not a key')):
        Artifacts.load(tmp_path)
    del data["imatrix"]["calibration"]["prompts"]
    quant["imatrix"] = True
    (tmp_path / "artifacts.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape('"files[0].imatrix" should be a string')):
        Artifacts.load(tmp_path)


@pytest.mark.parametrize(("section", "flags"), [
    ({}, "--imatrix auto"),
    ({"calibration": None, "source": "file", "given": "mats/m.gguf", "held_out": None}, "--imatrix mats/m.gguf"),
])
def test_the_reexport_command_asks_for_the_same_kind_of_matrix(tmp_path, section, flags):
    """Rebuilding an export whose quants were made with a matrix without one would change them (and refuse iq*)."""
    m = _imatrix_export(tmp_path, **section)
    assert f"--gguf q4_k_m {flags} " in m.reexport_command()
    m.imatrix = None
    assert "--imatrix" not in m.reexport_command()
