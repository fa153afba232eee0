"""The searched per-tensor quant recipe: ladders and groups, the greedy allocation under a byte budget, and the
search on a tiny fixture with llama.cpp's real llama-quantize: the file is no larger than the type's plain and
importance-matrix quants, follows its recipe tensor by tensor, and the recipe file alone rebuilds it
byte for byte through llama-quantize --tensor-type-file; a recipe that lies about the file is caught."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from grpoctl.cli import cli
from grpoctl.errors import ConversionError
from grpoctl.export import gguf as gg
from grpoctl.export import imatrix as im
from grpoctl.export import recipe as rc
from grpoctl.export.quantize import quantize
from grpoctl.fsutil import sha256_file
from grpoctl.llamacpp_tools import tool
from tests.conftest import convert_tiny


def _tensor(name: str, type_name: str, row: int = 576, rows: int = 576) -> rc.Tensor:
    return rc.Tensor(name=name, elements=row * rows, row=row, type=type_name)


# --- ladders, groups, allocation (no llama.cpp) -----------------------------------------------------------

def test_rows_not_a_multiple_of_256_step_through_32_wide_block_types_only():
    """SmolLM2's 576-wide rows cannot hold a K-quant (llama.cpp falls back to Q5_0 for Q4_K): their ladder is the
    32-wide types, so every step the recipe takes is a type the file really gets."""
    narrow, wide = _tensor("blk.0.attn_q.weight", "q5_0"), _tensor("blk.0.ffn_down.weight", "q4_k", row=1536)
    assert rc.ladder(narrow) == ["q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0"]
    assert (rc.step(narrow, 1), rc.step(narrow, -1)) == ("q5_1", "iq4_nl")
    assert (rc.step(wide, 1), rc.step(wide, -1)) == ("q5_k", "q3_k")
    assert rc.step(_tensor("blk.0.attn_v.weight", "q8_0"), 1) is None
    assert rc.ladder(_tensor("blk.0.attn_norm.weight", "f32", rows=1)) == []
    # a type off the ladder is placed by its bits per weight
    assert rc.ladder(_tensor("x", "q4_1")) == ["q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0"]


def test_groups_are_embedding_head_and_attention_and_mlp_of_bands_of_layers():
    tensors = [_tensor("token_embd.weight", "q8_0"), _tensor("output.weight", "q6_k", row=512)]
    for i in range(10):
        tensors += [_tensor(f"blk.{i}.attn_q.weight", "q5_0"), _tensor(f"blk.{i}.ffn_up.weight", "q5_0"),
                    _tensor(f"blk.{i}.attn_norm.weight", "f32", rows=1)]
    names = [g.name for g in rc.groups(tensors, bands=4)]
    assert names[:2] == ["token_embd", "output"]
    assert names[2:] == ["blk.0-2.attn", "blk.0-2.ffn", "blk.3-5.attn", "blk.3-5.ffn", "blk.6-8.attn",
                         "blk.6-8.ffn", "blk.9.attn", "blk.9.ffn"]
    assert [g.name for g in rc.groups(tensors, bands=100)][2:4] == ["blk.0.attn", "blk.0.ffn"]
    assert all(len(g.tensors) == 3 for g in rc.groups(tensors, bands=4)[2:8])  # norms are never moved


def _move(name: str, direction: int, delta: int, kl: float, se: float = 0.0) -> rc._Move:
    return rc._Move(group=rc.Group(name, []), direction=direction, types={}, delta_bytes=delta, kl=kl, se=se)


def test_allocation_pays_for_an_upgrade_with_the_cheapest_downgrades_and_never_exceeds_the_budget():
    base = 0.10
    moves = [_move("a", 1, 300, 0.06), _move("b", -1, -200, 0.101), _move("c", -1, -100, 0.11),
             _move("d", -1, -100, 0.15)]
    for room, picked, kl in ((0, {"a": 1, "b": -1, "c": -1}, 0.071), (100, {"a": 1, "b": -1}, 0.061),
                             (1000, {"a": 1}, 0.06)):
        chosen, predicted = rc.allocate(moves, base, room)
        assert {k: m.direction for k, m in chosen.items()} == picked, room
        assert sum(m.delta_bytes for m in chosen.values()) <= room
        assert predicted == pytest.approx(kl)
    # an upgrade whose downgrades would cost more KL than it saves is not taken
    chosen, _ = rc.allocate([_move("a", 1, 300, 0.06), _move("d", -1, -300, 0.15)], base, 0)
    assert chosen == {}


def test_a_downgrade_is_never_free_and_changes_within_their_standard_error_do_not_count():
    """What fitted the calibration text on SmolLM2 (bench/recipe.md): downgrades whose 512-position KL came out
    lower were taken for free, and upgrades chosen on gains of the size of the noise."""
    base = 0.10
    assert rc.allocate([_move("a", -1, -100, 0.099)], base, 0)[0] == {}  # fewer bits alone are not a gain
    # the same trade, paying with its measured cost or with that cost plus one standard error
    up, down = _move("u", 1, 100, 0.07, se=0.005), _move("d", -1, -100, 0.12)
    assert set(rc.allocate([up, down], base, 0)[0]) == {"u", "d"}  # saves 0.025 net, costs 0.02
    down.se = 0.01
    assert rc.allocate([up, down], base, 0)[0] == {}  # costs up to 0.03
    # a gain within one standard error is no reason to pay with a downgrade ...
    noisy = _move("n", 1, 100, 0.095, se=0.01)
    assert rc.allocate([noisy, _move("d", -1, -100, 0.1001)], base, 0)[0] == {}
    # ... but bytes left over go to it: more bits do not cost KL
    assert set(rc.allocate([noisy], base, 100)[0]) == {"n"} and rc.allocate([noisy], base, 99)[0] == {}
    assert rc.allocate([_move("w", 1, 100, 0.101)], base, 1000)[0] == {}  # measured worse: not taken


def test_paired_change_and_its_standard_error_over_blocks_of_positions():
    import numpy as np

    rng = np.random.default_rng(0)
    kls = rng.exponential(0.05, 4096)
    base = rc.Figures(kl=float(kls.mean()), kl_p99=0.0, top1=1.0, kls=kls)
    shifted = rc.Figures(kl=0.0, kl_p99=0.0, top1=1.0, kls=kls + 0.01)
    assert rc.paired(base, shifted) == (pytest.approx(0.01), pytest.approx(0.0, abs=1e-12))
    noise = rng.normal(0, 0.02, 4096)
    delta, se = rc.paired(base, rc.Figures(kl=0.0, kl_p99=0.0, top1=1.0, kls=kls + noise), block=64)
    assert delta == pytest.approx(noise.mean())
    assert se == pytest.approx(0.02 / np.sqrt(4096), rel=0.3)  # independent positions: the plain standard error
    assert rc.paired(base, shifted, block=4096)[1] == 0.0  # one block: no spread to measure


def _record(shipped: bool = True) -> rc.RecipeType:
    return rc.RecipeType(recipe="r.recipe.txt", sha256="", shipped=shipped, reason="calibration KL lower",
                         budget_bytes=100, bytes=90, calibration_kl=0.05, base_calibration_kl=0.06, predicted_kl=0.04,
                         tensor_types={}, changed=3, groups=[], variants=6, seconds=1.0)


def test_a_searched_file_worse_on_the_held_out_probes_is_not_shipped():
    """The search chooses on the calibration text; a file that is better there but not on the probes it never
    saw has fitted that text (measured on the SmolLM2 demo run at Q4_K_M: calibration KL 0.95x, probes 1.21x)."""
    record = _record()
    assert rc.confirm_held_out(record, searched_kl=0.047, matrix_kl=0.039) is False
    assert "held-out probes its mean KL 0.04700 is not below" in record.reason and not record.shipped
    record = _record()
    assert rc.confirm_held_out(record, searched_kl=0.089, matrix_kl=0.105) is True and record.shipped
    record = _record(shipped=False)
    assert rc.confirm_held_out(record, searched_kl=0.01, matrix_kl=0.1) is False  # never shipped on probes alone


def test_recipe_lines_are_anchored_per_tensor_and_read_back_as_llama_quantize_reads_them(tmp_path):
    path = rc.write_recipe(tmp_path / "r.recipe.txt", {"blk.1.attn_q.weight": "q5_0", "token_embd.weight": "q8_0"})
    assert path.read_text().splitlines() == [r"^blk\.1\.attn_q\.weight$=q5_0", r"^token_embd\.weight$=q8_0"]
    assert rc.read_recipe(path) == [(r"^blk\.1\.attn_q\.weight$", "q5_0"), (r"^token_embd\.weight$", "q8_0")]
    path.write_text("blk.1.attn_q.weight q5_0\n")
    with pytest.raises(ConversionError, match="is not PATTERN=TYPE"):
        rc.read_recipe(path)


# --- options ----------------------------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


@pytest.mark.parametrize(("args", "pattern"), [
    (["--gguf", "q4_k_m", "--quant-recipe", "search"], "add --imatrix auto"),
    (["--gguf", "q4_k_m", "--quant-recipe", "greedy", "--imatrix", "auto"], "is not one of search"),
    (["--quant-recipe", "search", "--imatrix", "auto"], "apply to GGUF quants"),
])
def test_a_recipe_search_that_cannot_work_is_one_line_exit_2(qwen3_run, tmp_path, args, pattern):
    result = _run(qwen3_run, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grpoctl: ") and pattern in err[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_users_matrix_without_its_calibration_text_cannot_be_searched_on(qwen3_run, tmp_path):
    result = _run(qwen3_run, "-o", tmp_path / "out", "--gguf", "q4_k_m", "--quant-recipe", "search", "--imatrix",
                  tmp_path / "some-matrix.gguf")
    assert result.exit_code == 2 and "--calibration FILE" in result.stderr, result.output


# --- the search on a tiny fixture, with llama.cpp -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_search(tiny_qwen3, tmp_path_factory, llama_tools):
    """The tiny Qwen3's BF16 GGUF, a matrix over a calibration text, its plain and imatrix Q4_K_M, and the search."""
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("recipe")
    bf16 = convert_tiny(tiny_qwen3, work / "tiny-BF16.gguf", "bf16")
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    rows = [json.loads(line) for line in (Path(gg.__file__).parents[1] / "data" / "arith_gsm.jsonl").read_text()
            .splitlines()[:80]]
    text = "\n".join(im.render_prompt(tok, [{"role": "user", "content": r["question"]}]) + r["answer"] + "<|im_end|>"
                     for r in rows)
    cal = work / "tiny-calibration.txt"
    cal.write_text(text)
    matrix = work / "tiny-imatrix.gguf"
    im.compute_matrix(bf16, cal, matrix, len(tok(text)["input_ids"]))
    imx, plain = work / "imatrix-Q4_K_M.gguf", work / "plain-Q4_K_M.gguf"
    im.quantize_with_matrix(bf16, imx, "q4_k_m", matrix)
    quantize(bf16, plain, "q4_k_m")
    calib = rc.CalibrationKL(bf16, text, positions=512, n_ctx=128)
    budget = min(imx.stat().st_size, plain.stat().st_size)
    found = rc.search(bf16, imx, "q4_k_m", matrix, calib, work / "search", "tiny", budget,
                      rc.RecipeRequest(bands=2), say=lambda _line: None)
    return {"bf16": bf16, "matrix": matrix, "imatrix": imx, "plain": plain, "budget": budget, "found": found,
            "calib": calib}


def test_the_search_measures_every_group_both_ways_and_stays_within_the_budget(tiny_search):
    found, record = tiny_search["found"], tiny_search["found"].record
    assert found.path.stat().st_size == record.bytes <= tiny_search["budget"] == record.budget_bytes
    names = {g.name for g in record.groups}
    assert names - {"output"} == {"token_embd", "blk.0.attn", "blk.0.ffn", "blk.1.attn", "blk.1.ffn"}, names
    # the fixture's rows are 64 wide (32-wide block types): every layer group can move both ways, the others
    # (Q8_0 at the top of the ladder, say) one way at least
    blocks = [g for g in record.groups if g.name.startswith("blk.")]
    assert all(g.higher_kl is not None and g.lower_kl is not None for g in blocks)
    assert all(g.higher_kl is not None or g.lower_kl is not None for g in record.groups)
    assert record.variants == sum((g.higher_kl is not None) + (g.lower_kl is not None) for g in record.groups)
    assert all(g.higher_bytes > 0 > g.lower_bytes for g in record.groups if g.lower_bytes is not None
               and g.higher_bytes is not None)
    # the KL figures are measured, not copied: the searched file is measured again from scratch
    again = tiny_search["calib"].measure(found.path)
    assert again.kl == pytest.approx(record.calibration_kl, abs=1e-6)
    assert record.shipped == (record.calibration_kl < record.base_calibration_kl)


def test_the_recipe_file_rebuilds_the_same_file_through_llama_quantize(tiny_search, tmp_path):
    """The recipe is reusable by hand: llama-quantize --imatrix M --tensor-type-file RECIPE, run as a user would,
    writes the searched file byte for byte; and every tensor has the type the recipe names."""
    found, matrix = tiny_search["found"], tiny_search["matrix"]
    rc.check_file(found.path, found.recipe)
    out = tmp_path / "again.gguf"
    subprocess.run([str(tool("llama-quantize")), "--imatrix", matrix.name, "--tensor-type-file", str(found.recipe),
                    str(tiny_search["bf16"]), str(out), "Q4_K_M", "2"], cwd=matrix.parent, check=True,
                   capture_output=True)
    assert sha256_file(out) == sha256_file(found.path)


def test_a_spliced_variant_is_the_file_llama_quantize_writes_for_its_recipe(tiny_search, tmp_path):
    """The search measures a group moved by splicing its tensors from a quant with every group moved into the
    importance-matrix quant; that is only sound if the result is what llama-quantize writes for the recipe with
    that one group moved. Checked byte for byte, for a group of each direction."""
    bf16, matrix, imx = tiny_search["bf16"], tiny_search["matrix"], tiny_search["imatrix"]
    tensors, _ = rc.read_tensors(imx)
    base = {t.name: t.type for t in tensors if rc._quantized(t.type)}
    layer = [g for g in rc.groups(tensors, bands=2) if g.name.startswith("blk.")][0]
    for direction in (1, -1):
        every = dict(base)
        for g in rc.groups(tensors, bands=2):
            every.update(g.types(direction) or {})
        donor = tmp_path / f"every-{direction}.gguf"
        rc.quantize_recipe(bf16, donor, "q4_k_m", matrix, rc.write_recipe(tmp_path / f"every-{direction}.txt", every))
        spliced, direct = tmp_path / f"spliced-{direction}.gguf", tmp_path / f"direct-{direction}.gguf"
        rc.splice(imx, donor, {t.name for t in layer.tensors}, spliced)
        rc.quantize_recipe(bf16, direct, "q4_k_m", matrix,
                           rc.write_recipe(tmp_path / f"one-{direction}.txt", {**base, **layer.types(direction)}))
        assert sha256_file(spliced) == sha256_file(direct), direction
        assert sha256_file(spliced) != sha256_file(imx)


def test_a_recipe_that_claims_a_type_the_file_does_not_have_fails_the_check(tiny_search, tmp_path):
    found = tiny_search["found"]
    lines = found.recipe.read_text().splitlines()
    pattern, _, type_name = lines[1].partition("=")
    broken = tmp_path / "broken.recipe.txt"
    broken.write_text("\n".join([lines[0], f"{pattern}={'q8_0' if type_name != 'q8_0' else 'q4_0'}", *lines[2:]]))
    with pytest.raises(ConversionError, match=r"does not follow its recipe broken\.recipe\.txt: .* the recipe says"):
        rc.check_file(found.path, broken)
    # and the importance-matrix quant the search started from is not the searched file, unless nothing changed
    if found.record.changed:
        with pytest.raises(ConversionError, match="does not follow its recipe"):
            rc.check_file(tiny_search["imatrix"], found.recipe)
    stray = tmp_path / "stray.recipe.txt"
    stray.write_text(found.recipe.read_text() + "^blk\\.7\\.attn_q\\.weight$=q4_0\n")
    with pytest.raises(ConversionError, match="names no tensor of the file"):
        rc.check_file(found.path, stray)


def test_export_with_a_searched_recipe_records_it_and_prints_one_table(qwen3_run, tmp_path, tiny_search):
    """`--quant-recipe search` on a tiny run: the table has the plain, importance-matrix and searched rows; the
    recipe section is in artifacts.json; a shipped searched file names its recipe (beside it, with its sha256)
    and follows it; the model card shows the table."""
    cal = tmp_path / "calibration.txt"
    cal.write_text(Path(tiny_search["matrix"].parent / "tiny-calibration.txt").read_text())
    out = tmp_path / "export"
    result = _run(qwen3_run, "-o", out, "--gguf", "q4_k_m", "--calibration", cal, "--quant-recipe", "search",
                  "--no-manifests")
    assert result.exit_code == 0, result.output
    assert "quant recipe: plain vs importance matrix vs searched recipe" in result.output
    manifest = json.loads((out / "artifacts.json").read_text())
    rec = manifest["quant_recipe"]["types"]["q4_k_m"]
    assert [r["variant"] for r in rec["rows"]] == ["plain", "imatrix", "searched"]
    assert sum(r["shipped"] for r in rec["rows"]) == 1 and rec["rows"][2]["shipped"] == rec["shipped"]
    assert rec["rows"][2]["bytes"] <= min(rec["rows"][0]["bytes"], rec["rows"][1]["bytes"])
    [entry] = [f for f in manifest["files"] if f["kind"] == "gguf:q4_k_m"]
    assert entry["size"] == next(r["bytes"] for r in rec["rows"] if r["shipped"])
    if rec["shipped"]:  # better on the calibration text and on the held-out probes
        assert rec["calibration_kl"] < rec["base_calibration_kl"] and rec["rows"][2]["kl"] < rec["rows"][1]["kl"]
        [recipe] = [f for f in manifest["files"] if f["kind"] == "recipe"]
        assert entry["recipe"] == Path(recipe["path"]).name == rec["recipe"]
        assert recipe["sha256"] == rec["sha256"] == sha256_file(out / recipe["path"])
        rc.check_file(out / entry["path"], out / recipe["path"])
    else:
        assert entry.get("recipe") is None and not [f for f in manifest["files"] if f["kind"] == "recipe"]
    from grpoctl.artifacts import Artifacts
    from grpoctl.push.hub import plan

    [(_pushed, card_bytes)] = plan(Artifacts.load(out), {"gguf": "alice/tiny-GGUF"}, "main")
    card = card_bytes.decode()
    assert "## Per-tensor recipe" in card and "--tensor-type-file" in card
    assert not list(out.rglob(".gguf-work-*"))
