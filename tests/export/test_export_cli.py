"""`grpoctl export` end to end on run directories and adapter folders, and its bad-input answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.fsutil import sha256_file


def _run(*args: str):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def _one_clean_line(result, code: int, pattern: str) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grpoctl: "), result.stderr
    assert pattern in err[0], err[0]
    assert "Traceback" not in result.output


def test_export_run_writes_merged_model_and_complete_manifest(qwen3_run, tmp_path):
    out = tmp_path / "export"
    result = _run(qwen3_run, "--output-dir", out, "--merged", "16bit", "--lora")
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output and "manifest:" in result.output
    manifest = json.loads((out / "artifacts.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(f["path"] for f in manifest["files"]) == [p for p in on_disk if p != "artifacts.json"]
    for f in manifest["files"]:
        assert f["sha256"] == sha256_file(out / f["path"]) and f["size"] == (out / f["path"]).stat().st_size
    kinds = {f["path"].split("/")[0]: f["kind"] for f in manifest["files"]}
    assert kinds == {"merged": "merged", "lora": "lora", "verify.json": "report", "vllm": "manifest"}
    assert manifest["verify"]["status"] == "ok" and manifest["verify"]["summary"]["modules"] == 14
    assert manifest["merged"]["chat_template"] is True
    prov = manifest["provenance"]
    assert prov["adapter"]["sha256"] == sha256_file(qwen3_run / "adapter" / "adapter_model.safetensors")
    assert prov["base_model"]["path"] and "peft" in prov["libraries"]


def test_lora_output_serves_like_the_original_adapter(qwen3_run, tiny_qwen3, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert _run(qwen3_run, "-o", out, "--lora", "-q").exit_code == 0
    assert not (out / "merged").exists()  # --lora alone does not merge
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert cfg["inference_mode"] is True and not Path(cfg["base_model_name_or_path"]).is_absolute()
    ids = torch.tensor([[5, 17, 42, 99]])
    logits = []
    for folder in (qwen3_run / "adapter", out / "lora"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen3), folder)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(*logits)


def test_verify_only_writes_just_the_report(qwen3_run, tmp_path):
    out = tmp_path / "report"
    result = _run(qwen3_run, "--verify-only", "-o", out)
    assert result.exit_code == 0, result.output
    assert "down_proj" in result.output and "verify: OK" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["verify.json"]
    assert json.loads((out / "verify.json").read_text())["summary"]["zero_b"] == 0


def test_fresh_adapter_fails_export_and_writes_nothing(fresh_adapter, tiny_qwen3, tmp_path):
    out = tmp_path / "export"
    _one_clean_line(_run(fresh_adapter, "--base", tiny_qwen3, "-o", out), 7, "never trained")
    assert not out.exists()


def test_adapter_folder_with_local_base_exports_beside_itself(qwen3_adapter, tmp_path):
    # adapter_config names the fixture's folder, which exists here: no --base needed
    result = _run(qwen3_adapter, "--force", "-q")
    assert result.exit_code == 0, result.output
    out = qwen3_adapter.parent / f"{qwen3_adapter.name}-export"
    assert (out / "artifacts.json").is_file() and (out / "merged" / "model.safetensors").is_file()


def test_directory_without_adapter_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_clean_line(_run(tmp_path / "empty"), 3, "holds no adapter")


def test_run_without_adapter_is_refused(qwen3_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text((qwen3_run / "run.json").read_text())
    _one_clean_line(_run(run), 3, "has no adapter")


def test_adapter_whose_base_is_not_here_needs_base(qwen3_adapter, tmp_path):
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/nowhere/model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    _one_clean_line(_run(moved), 3, "pass --base")


def test_missing_base_path_is_refused(qwen3_adapter, tmp_path):
    _one_clean_line(_run(qwen3_adapter, "--base", tmp_path / "no-such-model", "-o", tmp_path / "x"), 3,
                    "does not exist")


def test_existing_output_needs_force(qwen3_run, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _one_clean_line(_run(qwen3_run, "-o", out), 5, "--force")
    assert (out / "keep.txt").read_text() == "user data"
    assert _run(qwen3_run, "-o", out, "--force", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "artifacts.json").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without CUDA")
def test_merged_4bit_without_cuda_says_so_before_any_work(qwen3_run, tmp_path):
    out = tmp_path / "export"
    _one_clean_line(_run(qwen3_run, "--merged", "4bit", "-o", out), 6, "needs a CUDA GPU")
    assert not out.exists()


def test_strict_turns_partly_trained_into_a_failure(tiny_qwen3, tmp_path):
    from tests.conftest import make_run

    run = make_run(tmp_path / "run", tiny_qwen3, {"zero_b": "layers.0.mlp"})
    result = _run(run, "--verify-only")
    assert result.exit_code == 0 and "verify: WARN" in result.output
    _one_clean_line(_run(run, "--strict"), 7, "--strict: 3 of 14 modules have a zero update")
    assert not (run / "export" / "artifacts.json").exists()
    # the earlier --verify-only report alone does not count as an existing export
    assert _run(run, "-q").exit_code == 0 and (run / "export" / "artifacts.json").is_file()


def test_bad_input_through_the_real_entry_point_prints_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "export", str(tmp_path / "empty")],
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("grpoctl: ")


def test_export_to_a_relative_output_dir(qwen3_run, tmp_path, monkeypatch):
    """Users type `grpoctl export runs/x -o runs/x/export`: relative paths must not be joined twice."""
    monkeypatch.chdir(tmp_path)
    result = _run(qwen3_run, "-o", "rel/export", "--lora", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "rel/export/artifacts.json").read_text())
    assert all((tmp_path / "rel/export" / f["path"]).is_file() for f in manifest["files"])


def test_unknown_gguf_type_is_one_line_listing_valid_types_and_writes_nothing(qwen3_run, tmp_path):
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", "q8_0,q3_x")
    _one_clean_line(result, 2, "unknown GGUF type 'q3_x'")
    assert "q4_k_m" in result.stderr and "q5_k_m" in result.stderr
    assert not out.exists()


def test_quiet_export_prints_only_what_was_written(qwen3_run, tmp_path):
    """-q: the conversion's progress lines and the parity table go through the export's one output channel too."""
    result = _run(qwen3_run, "-o", tmp_path / "export", "--gguf", "q8_0", "--lora", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1] == f"manifest: {tmp_path / 'export' / 'artifacts.json'}", result.stdout
    kinds = ("gguf:q8_0", "lora", "manifest", "modelfile", "report")  # the "KIND  N files  SIZE" summary
    assert [line for line in lines[:-1] if not line.startswith(kinds)] == [], result.stdout


def test_system_prompt_no_modelfile_can_carry_skips_the_manifests_and_the_printed_command_writes_them(
        tiny_qwen3, tmp_path):
    """The export's own artifacts land; the manifests step says so and prints the `grpoctl manifests` command
    (a manifests flag, --no-system) that writes them, and that command runs as printed."""
    import shlex
    import subprocess
    import sys

    from tests.conftest import make_run

    run = make_run(tmp_path / "run", tiny_qwen3)
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["data"]["system_prompt"] = 'say """\nthen "quote"'  # no Modelfile quoting carries both
    (run / "run.json").write_text(json.dumps(meta))
    out = tmp_path / "my export"
    result = _run(run, "-o", out, "--gguf", "f16")
    assert result.exit_code == 0, result.output
    assert (out / "artifacts.json").is_file() and list((out / "gguf").glob("*-F16.gguf"))
    assert not (out / "gguf" / "Modelfile").exists()
    note = next(ln for ln in result.output.splitlines() if ln.startswith("note: no Modelfile or vLLM manifests"))
    command = note.split("`")[-2]
    assert command == f"grpoctl manifests {shlex.quote(str(out))} --no-system"
    argv = shlex.split(command)
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "SYSTEM" not in modelfile and "FROM ./" in modelfile


def test_export_without_llama_tools_says_in_its_summary_that_the_template_was_not_checked(qwen3_run, tmp_path,
                                                                                          monkeypatch):
    """The per-file line in the parity table sits among passes; the closing lines say it too, with the fix."""
    from grpoctl import llamacpp_tools

    monkeypatch.delenv(llamacpp_tools.ENV_BIN, raising=False)
    monkeypatch.setattr(llamacpp_tools, "cached_root", lambda version=None: tmp_path / "no-tools")
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", "q8_0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    done = lines.index(f"export complete: {out}")  # then the list of what was written
    note = lines[done - 1]
    assert note.startswith("note: chat template of ") and "-Q8_0.gguf NOT checked" in note, result.stdout
    assert "grpoctl doctor --build-llama-tools" in note and "--force" in note
    rep = json.loads((out / "gguf" / "parity.json").read_text())
    assert all("not built" in f["tokenizer"]["template"]["skipped"] for f in rep["files"].values())


def test_no_template_note_when_every_template_was_checked_or_is_absent():
    from grpoctl.artifacts import ParityFloor, ParityResult
    from grpoctl.export.parity.report import unchecked_template_note

    def result(template):
        return ParityResult(type="q8_0", top1=1.0, kl=0.0, positions=10, floor=ParityFloor(top1=0.9, kl=0.1),
                            passed=True, tokenizer={"template": template}, answer="")

    checked = {"passed": True, "departures": [], "engine_departures": []}
    assert unchecked_template_note({"a.gguf": result(checked), "b.gguf": result("missing from the GGUF")}) is None
    note = unchecked_template_note({"a.gguf": result(checked), "b.gguf": result({"passed": None, "skipped": "x"})})
    assert note is not None and "of b.gguf NOT checked" in note and "a.gguf" not in note
