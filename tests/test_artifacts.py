from __future__ import annotations

import hashlib
import json

import pytest

from grpoctl.artifacts import ArtifactManifest
from grpoctl.errors import InputNotFoundError


def test_manifest_records_size_sha_and_round_trips(tmp_path):
    (tmp_path / "gguf").mkdir()
    blob = b"GGUF" + bytes(range(200))
    (tmp_path / "gguf" / "M-Q4_K_M.gguf").write_bytes(blob)
    m = ArtifactManifest(root=tmp_path, provenance={"base_model": {"id": "x/y"}})
    m.add_file(tmp_path / "gguf" / "M-Q4_K_M.gguf", "gguf:q4_k_m", quant="Q4_K_M")
    m.sections["verify"] = {"status": "ok"}
    m.save()
    data = json.loads((tmp_path / "artifacts.json").read_text())
    (entry,) = data["files"]
    assert entry == {"path": "gguf/M-Q4_K_M.gguf", "kind": "gguf:q4_k_m", "size": len(blob),
                     "sha256": hashlib.sha256(blob).hexdigest(), "extra": {"quant": "Q4_K_M"}}
    assert data["verify"] == {"status": "ok"}
    assert data["provenance"]["base_model"] == {"id": "x/y"}
    assert "torch" in data["provenance"]["libraries"]
    again = ArtifactManifest.load(tmp_path)
    assert [f.path for f in again.by_kind("gguf")] == ["gguf/M-Q4_K_M.gguf"]
    assert again.sections["verify"] == {"status": "ok"}


def test_adding_a_file_twice_keeps_one_entry(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("1")
    m = ArtifactManifest(root=tmp_path)
    m.add_file(f, "report")
    f.write_text("22")
    m.add_file("a.txt", "report")
    assert len(m.files) == 1 and m.files[0].size == 2


def test_load_without_manifest_says_what_to_run(tmp_path):
    with pytest.raises(InputNotFoundError, match="grpoctl export"):
        ArtifactManifest.load(tmp_path)


def test_paths_relative_to_the_working_directory_are_recorded_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel_root = tmp_path.relative_to(tmp_path) / "runs" / "demo"
    (rel_root / "gguf").mkdir(parents=True)
    (rel_root / "gguf" / "a.gguf").write_bytes(b"x")
    m = ArtifactManifest(root=rel_root)
    assert m.add_file(rel_root / "gguf" / "a.gguf", "gguf:q8_0").path == "gguf/a.gguf"
    assert m.add_file("gguf/a.gguf", "gguf:q8_0").path == "gguf/a.gguf"
    assert len(m.files) == 1
