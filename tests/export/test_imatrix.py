"""Importance-matrix quants with llama.cpp's real llama-imatrix and llama-quantize on the tiny fixtures and
the embedded SmolLM2: the matrix is computed from the run's prompts and really read, bad matrices and types
that need one are one line, the calibration set holds no probe text, the artifacts are recorded, and the
gain over the plain quants is measured on held-out probes (asserted on SmolLM2, against broken matrices too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.errors import DataError
from grpoctl.export import gguf as gg
from grpoctl.export import imatrix as im
from grpoctl.export.quantize import quantize
from grpoctl.fsutil import sha256_file
from grpoctl.gguftypes import TYPES
from grpoctl.llamacpp_tools import tool
from tests.conftest import convert_tiny, make_run
from tests.export.gguf_support import read_gguf


def _run(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def _one_clean_line(result, code: int, *patterns: str) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grpoctl: "), result.stderr
    assert all(p in err[0] for p in patterns), err[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_bf16(tiny_qwen3, tmp_path_factory) -> Path:
    """The tiny Qwen3 as the 16-bit GGUF intermediate the quantizer and llama-imatrix read."""
    return convert_tiny(tiny_qwen3, tmp_path_factory.mktemp("imatrix") / "tiny-BF16.gguf", "bf16")


@pytest.fixture(scope="module")
def tiny_matrix(tiny_bf16, tiny_qwen3, llama_tools) -> Path:
    """A matrix computed by llama-imatrix over training prompts + solutions rendered with the fixture's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    rows = [json.loads(line) for line in (Path(gg.__file__).parents[1] / "data" / "arith_gsm.jsonl").read_text()
            .splitlines()[:80]]
    text = "\n".join(im.render_prompt(tok, [{"role": "user", "content": r["question"]}]) + r["answer"] + "<|im_end|>"
                     for r in rows)
    cal = tiny_bf16.parent / "tiny-calibration.txt"
    cal.write_text(text)
    matrix = tiny_bf16.parent / "tiny-imatrix.gguf"
    info = im.compute_matrix(tiny_bf16, cal, matrix, len(tok(text)["input_ids"]))
    assert info["datasets"] == ["tiny-calibration.txt"]  # the file's own name, not a temporary path
    return matrix


def _rewrite_matrix(src: Path, dst: Path, edit) -> None:
    """Copy a GGUF matrix through gguf-py, ``edit(name, values)`` returning new values for an entry (or None)."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch="")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(reader.fields["imatrix.datasets"].contents()))
    writer.add_uint32("imatrix.chunk_count", reader.fields["imatrix.chunk_count"].contents())
    writer.add_uint32("imatrix.chunk_size", reader.fields["imatrix.chunk_size"].contents())
    for t in reader.tensors:
        values = np.array(t.data, dtype=np.float32)
        new = edit(t.name, values)
        writer.add_tensor(t.name, values if new is None else np.asarray(new, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- what may be asked ---------------------------------------------------------------------------------

@pytest.mark.parametrize("types", ["q4_k_m,iq4_xs", "q2_k", "iq2_xxs,q8_0", "iq3_xxs"])
def test_types_that_need_a_matrix_are_one_line_exit_2_without_one(qwen3_run, tmp_path, types):
    """Refused before any work: no verify table, no folder (llama.cpp itself would refuse iq2_xxs only
    after the conversion, tensor by tensor, and make iq3_xxs and q2_k without complaint)."""
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", types)
    _one_clean_line(result, 2, "need", "importance matrix", "--imatrix auto")
    assert all(t in result.stderr for t in types.split(",") if t.startswith(("iq", "q2")))
    assert result.stdout == "" and not out.exists() and list(tmp_path.iterdir()) == []


def test_every_iq_and_q2_k_type_needs_a_matrix_and_every_quantizer_type_reads_one():
    assert {t for t in TYPES if t.startswith(("iq", "q2_k"))} == {t for t, g in TYPES.items() if g.needs_imatrix}
    assert not any(TYPES[t].reads_imatrix for t in ("f16", "bf16", "f32", "q8_0"))
    assert all(TYPES[t].reads_imatrix for t in ("q4_k_m", "q5_0", "q6_k", "iq4_xs", "q2_k"))


@pytest.mark.parametrize(("args", "patterns"), [
    (["--gguf", "q8_0,f16", "--imatrix", "auto"], ["changes none of q8_0, f16"]),
    (["--imatrix", "auto"], ["apply to GGUF quants", "--gguf"]),
    (["--gguf", "q4_k_m", "--imatrix", "m.gguf", "--calibration", "c.txt"], ["give one of them"]),
])
def test_imatrix_options_that_cannot_work_are_one_line_exit_2(qwen3_run, tmp_path, args, patterns):
    out = tmp_path / "export"
    _one_clean_line(_run(qwen3_run, "-o", out, *args), 2, *patterns)
    assert not out.exists()


def test_auto_from_an_adapter_folder_without_a_run_asks_for_calibration_text(qwen3_adapter, tmp_path):
    out = tmp_path / "export"
    result = _run(qwen3_adapter, "-o", out, "--gguf", "q4_k_m", "--imatrix", "auto")
    _one_clean_line(result, 2, "--calibration FILE")
    assert not out.exists()


def test_missing_matrix_file_is_exit_3(qwen3_run, tmp_path):
    _one_clean_line(_run(qwen3_run, "-o", tmp_path / "e", "--gguf", "q4_k_m", "--imatrix", tmp_path / "nope.gguf"),
                    3, "nope.gguf does not exist")


def test_corrupt_matrix_files_are_one_line_exit_4_before_any_work(qwen3_run, tiny_matrix, tiny_bf16, tmp_path):
    """Garbage, a GGUF cut short, and a model GGUF where a matrix belongs: llama.cpp's loader refuses each."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not an importance matrix\n" * 100)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_matrix.read_bytes()[: tiny_matrix.stat().st_size // 2])
    for bad in (garbage, cut, tiny_bf16):
        out = tmp_path / f"export-{bad.stem}"
        result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--imatrix", bad)
        _one_clean_line(result, 4, f"{bad} is not an importance matrix llama.cpp can read")
        assert not out.exists() and "verify: OK" not in result.output  # refused before the adapter was even read


def test_calibration_text_with_probe_text_is_refused(qwen3_run, tmp_path):
    from grpoctl.export.parity.probes import PROSE

    cal = tmp_path / "cal.txt"
    cal.write_text("Some text about arithmetic.\n" * 50 + PROSE[1] + "\n")
    result = _run(qwen3_run, "-o", tmp_path / "e", "--gguf", "q4_k_m", "--calibration", cal)
    _one_clean_line(result, 2, "contains parity probe text", "Photosynthesis")


def test_probe_hits_finds_every_probe_text_and_nothing_else():
    from grpoctl.export.parity.probes import CHATS, CODE, MATH, PROSE

    for text in [*PROSE, *MATH, *CODE, *(t for chat in CHATS for t in chat)]:
        assert im.probe_hits(f"before {text} after"), text
    assert im.probe_hits(MATH[0].splitlines()[0])  # one long line of a probe is enough
    assert not im.probe_hits("Ana had 31 stamps and gave away 8. How many stamps are left?")


# --- the quantizer reads the matrix --------------------------------------------------------------------

def test_plain_quants_are_byte_identical_in_process_and_through_llama_quantize(tiny_bf16, llama_tools, tmp_path):
    """Why plain types stay in-process: the tool writes the same bytes, and needs a build."""
    import subprocess

    for t in ("q4_k_m", "q5_0"):
        quantize(tiny_bf16, tmp_path / f"ctypes-{t}.gguf", t)
        subprocess.run([str(llama_tools.path("llama-quantize")), str(tiny_bf16), str(tmp_path / f"tool-{t}.gguf"),
                        TYPES[t].label, "2"], check=True, capture_output=True)
        assert (tmp_path / f"ctypes-{t}.gguf").read_bytes() == (tmp_path / f"tool-{t}.gguf").read_bytes()


def test_the_quantizer_reads_the_matrix_entry_by_entry(tiny_bf16, tiny_matrix, tmp_path):
    """With the matrix the file changes; one entry changed changes exactly that tensor; the legacy .dat of the
    same matrix is read too."""
    import subprocess

    quantize(tiny_bf16, tmp_path / "plain.gguf", "q4_k_m")
    mine = tmp_path / "imatrix.gguf"
    info = im.quantize_with_matrix(tiny_bf16, mine, "q4_k_m", tiny_matrix)
    assert info["without_matrix"] == [] and sum(info["tensor_types"].values()) >= 14
    meta, tensors = read_gguf(mine)
    assert meta["quantize.imatrix.file"] == tiny_matrix.name
    assert meta["quantize.imatrix.dataset"] == "tiny-calibration.txt"
    assert meta["quantize.imatrix.entries_count"] == im.matrix_entries(tiny_matrix) == 14
    plain_meta, plain = read_gguf(tmp_path / "plain.gguf")
    assert not [k for k in plain_meta if k.startswith("quantize.imatrix")]
    changed = {k for k in plain if plain[k] != tensors[k]}
    # the 64-wide rows fall back from Q4_K to Q5_0, which reads the matrix too (Q8_0, where Q6_K falls back, does not)
    assert {f"blk.{i}.{m}.weight" for i in (0, 1) for m in ("attn_q", "attn_k", "ffn_gate", "ffn_up")} <= changed

    target = "blk.0.ffn_gate.weight"
    edited = tmp_path / "edited-imatrix.gguf"
    # every other channel now matters a thousand times more: inside every quantization block
    _rewrite_matrix(tiny_matrix, edited, lambda name, v: _weigh_alternate(v) if name == f"{target}.in_sum2" else None)
    im.quantize_with_matrix(tiny_bf16, tmp_path / "edited.gguf", "q4_k_m", edited)
    _, edited_t = read_gguf(tmp_path / "edited.gguf")
    assert {k for k in tensors if tensors[k] != edited_t[k]} == {target}

    legacy = tmp_path / "legacy-imatrix.dat"
    subprocess.run([str(tool("llama-imatrix")), "-m", "/dev/null", "--in-file", str(tiny_matrix),
                    "--output-format", "dat", "-o", str(legacy)], check=True, capture_output=True)
    assert im.matrix_entries(legacy) == im.matrix_entries(tiny_matrix) == 14
    im.quantize_with_matrix(tiny_bf16, tmp_path / "legacy.gguf", "q4_k_m", legacy)
    _, legacy_t = read_gguf(tmp_path / "legacy.gguf")
    assert {k for k in plain if plain[k] != legacy_t[k]} == changed


def _weigh_alternate(values):
    """Every other channel a thousand times more important, so the weights change inside each block.

    The quantizer fits each block (32 weights for Q5_0, where these 64-wide rows fall back) to its weights
    relative to one another: scaling a whole block's importance (as "the second half of 64 channels x1000"
    did) leaves the best fit where it was, and whether a file changed then hung on float rounding in the
    compiled quantizer (1 block of 256 with one build, none with another or with x1024)."""
    out = values.copy()
    out[..., 1::2] *= 1000.0
    return out


def test_a_matrix_of_the_wrong_shape_or_for_another_model_is_one_line(tiny_bf16, tiny_matrix, tmp_path):
    wrong = tmp_path / "wrong-imatrix.gguf"
    _rewrite_matrix(tiny_matrix, wrong, lambda name, v: v[:32] if name == "blk.0.attn_q.weight.in_sum2" else None)
    with pytest.raises(DataError, match="does not fit this model: .*blk.0.attn_q.weight"):
        im.quantize_with_matrix(tiny_bf16, tmp_path / "out.gguf", "q4_k_m", wrong)
    assert not (tmp_path / "out.gguf").exists()

    other = tmp_path / "other-imatrix.gguf"
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(tiny_matrix)
    writer = GGUFWriter(other, arch="")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["other.txt"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 512)
    for t in reader.tensors:  # every entry renamed into a layer this model does not have
        writer.add_tensor(t.name.replace("blk.", "blk.9"), t.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DataError, match="no entry for any tensor of this model"):
        im.quantize_with_matrix(tiny_bf16, tmp_path / "out.gguf", "q4_k_m", other)
    assert not (tmp_path / "out.gguf").exists()


def test_a_matrix_that_reads_but_does_not_fit_fails_the_export_with_one_line_and_leaves_nothing(
        qwen3_run, tiny_matrix, tmp_path):
    """A matrix llama.cpp's loader reads (so it passes the check before any work) whose entry for one tensor has
    the wrong width: the export stops at the quantizer with one line naming the tensor, and no folder, no staged
    sibling, no half-written GGUF is left. The same file with the entry intact makes the export succeed."""
    wrong = tmp_path / "mats" / "wrong-imatrix.gguf"
    wrong.parent.mkdir()
    _rewrite_matrix(tiny_matrix, wrong, lambda name, v: v[:32] if name == "blk.0.attn_q.weight.in_sum2" else None)
    assert im.matrix_entries(wrong) == 14
    out = tmp_path / "exports" / "export"
    out.parent.mkdir()
    result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--imatrix", wrong, "--no-manifests")
    _one_clean_line(result, 4, f"the importance matrix {wrong} does not fit this model", "blk.0.attn_q.weight")
    assert "converting" in result.output  # it failed where the matrix is read, after the work had started
    assert list(out.parent.iterdir()) == []

    result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--imatrix", tiny_matrix, "--no-manifests", "-q")
    assert result.exit_code == 0, result.output


def test_an_export_is_not_added_to_with_quants_made_otherwise_than_its_own(qwen3_run, tiny_matrix, tmp_path):
    """Adding to an export: a type already there made without the matrix is not silently kept (nor replaced)
    when asked with one; a new matrix quant joins plain ones; a second matrix beside the first is refused.
    Each refusal is one line, exit 5, and leaves the export as it was."""
    out = tmp_path / "export"
    assert _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--no-manifests", "-q").exit_code == 0
    before = (out / "artifacts.json").read_text()
    _one_clean_line(_run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--imatrix", tiny_matrix, "--no-manifests"), 5,
                    "Q4_K_M.gguf was made without an importance matrix", "--force")
    assert (out / "artifacts.json").read_text() == before

    result = _run(qwen3_run, "-o", out, "--gguf", "q5_0", "--imatrix", tiny_matrix, "--no-manifests", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "artifacts.json").read_text())
    kinds = {f["kind"]: f for f in manifest["files"]}
    assert "imatrix" not in kinds["gguf:q4_k_m"] and kinds["gguf:q5_0"]["imatrix"]
    assert kinds["imatrix"]["sha256"] == sha256_file(tiny_matrix)

    before = (out / "artifacts.json").read_text()
    _one_clean_line(_run(qwen3_run, "-o", out, "--gguf", "q4_0", "--imatrix", tiny_matrix, "--no-manifests"), 5,
                    "already holds GGUF quants made with an importance matrix")
    _one_clean_line(_run(qwen3_run, "-o", out, "--gguf", "q5_0", "--no-manifests"), 5,
                    "Q5_0.gguf was made with an importance matrix")
    assert (out / "artifacts.json").read_text() == before


def test_a_calibration_text_too_short_for_two_chunks_is_refused():
    with pytest.raises(DataError, match="needs at least"):
        im.chunk_size(40)
    assert im.chunk_size(2000) == 512 and im.chunk_size(300) == 128


# --- calibration from the run ----------------------------------------------------------------------------

def test_training_rows_holding_probe_text_stay_out_of_the_calibration_set(tiny_qwen3, tmp_path):
    """A training set that happens to hold a probe question: that row is dropped, the rest is prompts rendered
    with the chat template and the training system prompt, each followed by a sampled completion."""
    from transformers import AutoTokenizer

    from grpoctl.export.parity.probes import CHATS
    from grpoctl.rundir import RunDir

    data = tmp_path / "data.jsonl"
    rows = [{"question": f"Budi has {n} apples and eats 2. How many are left?", "answer": f"{n} - 2\n#### {n - 2}"}
            for n in range(5, 11)]
    rows.insert(3, {"question": CHATS[0][0], "answer": "#### 19"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = make_run(tmp_path / "run", tiny_qwen3)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["config"]["data"]["dataset"] = str(data)
    (run_dir / "run.json").write_text(json.dumps(meta))
    request = im.ImatrixRequest(run=RunDir(run_dir), samples=64, max_new_tokens=8)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    dest = tmp_path / "cal.txt"
    info = im.build_calibration(request, tiny_qwen3, run_dir / "adapter", tok, gg.end_of_turn_ids(tiny_qwen3), dest)
    text = dest.read_text()
    assert info["rows"] == 7 and info["rows_with_probe_text"] == 1 and info["documents"] == 6
    assert im.probe_hits(text) == [] and CHATS[0][0] not in text
    assert text.count("You are a careful math tutor.") == 6 and text.count("<|im_start|>assistant\n<think>\n") == 6
    assert "Budi has 7 apples" in text and info["completions"] == "sampled from the trained model"


# --- end to end --------------------------------------------------------------------------------------------

def test_tiny_run_imatrix_auto_is_computed_from_the_run_and_compared_on_held_out_probes(qwen3_run, tmp_path,
                                                                                        llama_tools):
    """`--imatrix auto` on a tiny-fixture run: the calibration text is the run's own training prompts (chat
    template, system prompt) with sampled completions and no probe text; the quants record the matrix that
    made them; plain and imatrix quants are measured side by side on the parity probes; the matrix and its
    calibration text are artifacts with their sha256, pushed with the GGUFs and named in the model card.

    No direction of the gain is asserted here: the tiny model's weights are random, so there is no structure
    for a matrix to weigh. Measured on this fixture (mean KL on the probes): q2_k plain 0.0386, run's matrix
    0.0379, a uniform matrix 0.0365; iq3_xxs 0.0342 / 0.0333 / 0.0320. A uniform matrix doing as well as the
    run's says the differences are noise; the gain is asserted on SmolLM2 (below), where it is not."""
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m,iq4_xs,q8_0", "--imatrix", "auto", "--no-manifests")
    assert result.exit_code == 0, result.output
    assert "plain vs imatrix quant on held-out probes" in result.output
    parity_json = json.loads((out / "gguf" / "parity.json").read_text())
    rep = parity_json["imatrix"]
    assert rep["held_out"] is True and set(rep["types"]) == {"q4_k_m", "iq4_xs"}  # q8_0 ignores a matrix
    manifest = json.loads((out / "artifacts.json").read_text())
    by_kind = {f["kind"]: f for f in manifest["files"]}
    for t in ("q4_k_m", "iq4_xs"):
        row, shipped = rep["types"][t], parity_json["files"][Path(by_kind[f"gguf:{t}"]["path"]).name]
        plain, mine = row["plain"], row["imatrix"]
        assert mine == {k: shipped[k] for k in ("top1", "kl", "kl_p99")}  # the file shipped is the one compared
        assert plain["kl"] > 0 and mine["kl_p99"] is not None and plain != mine, (t, row)
        assert row["gain"]["kl"] == pytest.approx((plain["kl"] - mine["kl"]) / plain["kl"], abs=1e-3)
    name = Path(by_kind["gguf:q4_k_m"]["path"]).name.removesuffix("-Q4_K_M.gguf")
    for kind, file in (("imatrix", f"{name}-imatrix.gguf"), ("calibration", f"{name}-calibration.txt")):
        entry = by_kind[kind]
        assert entry["path"] == f"gguf/{file}" and entry["sha256"] == sha256_file(out / entry["path"])
    # the matrix is computed over the run's own prompts: the shipped arithmetic set, as training rendered it
    cal, cal_text = manifest["imatrix"]["calibration"], (out / "gguf" / f"{name}-calibration.txt").read_text()
    questions = [json.loads(line)["question"] for line in
                 (Path(gg.__file__).parents[1] / "data" / "arith_gsm.jsonl").read_text().splitlines()]
    assert cal["source"] == "run" and cal["completions"] == "sampled from the trained model"
    assert sum(q in cal_text for q in questions) == cal["documents"] == 64
    assert cal_text.count("<|im_start|>system\nYou are a careful math tutor.<|im_end|>") == 64
    assert manifest["imatrix"]["datasets"] == [f"{name}-calibration.txt"] and manifest["imatrix"]["chunks"] >= 2
    assert by_kind["gguf:q4_k_m"]["imatrix"] == f"{name}-imatrix.gguf"
    assert "imatrix" not in by_kind["gguf:q8_0"]
    assert manifest["imatrix"]["sha256"] == by_kind["imatrix"]["sha256"] and manifest["imatrix"]["entries"] == 14
    assert im.probe_hits((out / "gguf" / f"{name}-calibration.txt").read_text()) == []
    meta, _ = read_gguf(out / "gguf" / f"{name}-Q4_K_M.gguf")
    assert meta["quantize.imatrix.file"] == f"{name}-imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == f"{name}-calibration.txt"
    assert not list((out / "gguf").glob("plain-*")) and not list(out.rglob(".gguf-work-*"))
    # pushed with the GGUF repo and named in its model card
    from grpoctl.artifacts import Artifacts
    from grpoctl.push.hub import plan

    [(pushed, card_bytes)] = plan(Artifacts.load(out), {"gguf": "alice/tiny-GGUF"}, "main")
    assert {f"{name}-imatrix.gguf", f"{name}-calibration.txt"} <= {f.path_in_repo for f in pushed.files}
    card = card_bytes.decode()
    assert f"`llama-quantize --imatrix {name}-imatrix.gguf`" in card and f"`{name}-calibration.txt`" in card
    assert "| Q4_K_M (imatrix) |" in card and "| Q8_0 |" in card
    gain = rep["types"]["q4_k_m"]["gain"]["kl"]
    assert f"{abs(gain) * 100:.1f}% {'lower' if gain >= 0 else 'higher'} |" in card


def test_a_users_matrix_is_used_and_published(qwen3_run, tiny_matrix, tmp_path):
    """-q holds for the matrix's lines too: its quantizing lines and the plain vs imatrix table go through the
    export's one output channel."""
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--imatrix", tiny_matrix, "--no-manifests", "-q")
    assert result.exit_code == 0, result.output
    assert "importance matrix" not in result.stdout and "plain vs imatrix" not in result.stdout, result.stdout
    manifest = json.loads((out / "artifacts.json").read_text())
    [entry] = [f for f in manifest["files"] if f["kind"] == "imatrix"]
    assert entry["sha256"] == sha256_file(tiny_matrix) == manifest["imatrix"]["sha256"]
    assert manifest["imatrix"]["entries"] == 14 and manifest["imatrix"]["given"] == str(tiny_matrix)
    assert not [f for f in manifest["files"] if f["kind"] == "calibration"]
    assert manifest["imatrix"]["source"] == "file" and manifest["imatrix"]["held_out"] is None
    assert json.loads((out / "gguf" / "parity.json").read_text())["imatrix"]["types"]["q4_k_m"]["plain"]



def test_smollm2_run_imatrix_auto_beats_the_plain_quants_and_a_broken_matrix_does_not(smollm2_dir, tmp_path,
                                                                                       llama_tools, monkeypatch):
    """The embedded SmolLM2 with a trained-looking adapter: the matrix from the run's prompts and sampled
    completions gives q4_k_m and q2_k a lower mean KL than the plain quants' on the held-out probes (most
    of SmolLM2's tensors, 576 columns, fall back from the K-quants to Q5_0/Q4_0/IQ4_NL, which read the matrix
    as well).

    The same comparison fails on broken matrices, on the same 16-bit GGUF and the same probes: the run's matrix
    with every entry made uniform (the imatrix code path without the run's information) does worse than the
    run's matrix, and the matrix inverted (weighing most the channels the run uses least) does worse than no
    matrix at all."""
    import numpy as np

    from grpoctl.artifacts import Artifacts
    from grpoctl.config import DEFAULT_SYSTEM_PROMPT
    from grpoctl.export.parity.measure import measure
    from grpoctl.export.parity.reference import prepare_reference
    from grpoctl.export.parity.scoring import FALLBACK_FLOOR
    from grpoctl.rundir import RunDir
    from tests.export.gguf_support import make_adapter as small_adapter

    refs = []
    real_prepare = prepare_reference
    monkeypatch.setattr(gg, "prepare_reference", lambda *a, **k: refs.append(real_prepare(*a, **k)) or refs[-1])
    run_dir = tmp_path / "run"
    small_adapter(smollm2_dir, run_dir / "adapter", r=8, alpha=16, std=0.002)
    (run_dir / "run.json").write_text(json.dumps({
        "base_model": {"id": "embedded:SmolLM2-135M-Instruct", "path": str(smollm2_dir)},
        "config": {"data": {"system_prompt": DEFAULT_SYSTEM_PROMPT, "max_samples": 64},
                   "trainer": {"max_completion_length": 32, "temperature": 1.0, "min_p": 0.1}}}))
    request = im.ImatrixRequest(run=RunDir(run_dir), samples=16)
    out = tmp_path / "export" / "gguf"
    artifacts = Artifacts(root=tmp_path / "export")
    name = "SmolLM2-135M-Instruct-grpo"
    gg.export_gguf(smollm2_dir, run_dir / "adapter", out, ["q4_k_m", "q2_k", "bf16"], name=name,
                   artifacts=artifacts, system_prompt=DEFAULT_SYSTEM_PROMPT, imatrix=request)
    rep = json.loads((out / "parity.json").read_text())
    assert rep["passed"] and rep["imatrix"]["held_out"] and set(rep["imatrix"]["types"]) == {"q4_k_m", "q2_k"}
    figures = {t: rep["imatrix"]["types"][t] for t in ("q4_k_m", "q2_k")}
    for t, row in figures.items():
        assert row["imatrix"]["kl"] < row["plain"]["kl"], (t, row)
    q4 = figures["q4_k_m"]["tensor_types"]
    assert q4.get("q5_0", 0) > q4.get("q4_K", 0) + q4.get("q6_K", 0)  # the fallback, as the docs say
    cal = artifacts.imatrix.calibration
    assert cal.documents == 16 and cal.max_new_tokens == 32 and cal.system_prompt == DEFAULT_SYSTEM_PROMPT

    matrix, bf16 = out / f"{name}-imatrix.gguf", out / f"{name}-BF16.gguf"
    broken = {"uniform": lambda v: np.full_like(v, v.mean()),
              "inverted": lambda v: v.max() * v.min() / np.maximum(v, 1e-6 * v.max())}
    kl = {}
    for label, edit in broken.items():
        bad = tmp_path / f"{label}-imatrix.gguf"
        _rewrite_matrix(matrix, bad, lambda n, v, edit=edit: edit(v) if n.endswith(".in_sum2") else None)
        im.quantize_with_matrix(bf16, tmp_path / f"{label}-q2_k.gguf", "q2_k", bad)
        kl[label] = measure(tmp_path / f"{label}-q2_k.gguf", "q2_k", refs[-1], FALLBACK_FLOOR).kl
    assert figures["q2_k"]["imatrix"]["kl"] < kl["uniform"], (figures["q2_k"], kl)
    assert kl["inverted"] > figures["q2_k"]["plain"]["kl"], (figures["q2_k"], kl)
