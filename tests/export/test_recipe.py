"""The searched per-tensor quant recipe: ladders and groups, the trades measured as whole mixes under a byte
budget (a payment free alone but costly in the mix is refused), and the search on a tiny fixture with
llama.cpp's real llama-quantize: the file is no larger than the type's plain and importance-matrix quants,
follows its recipe tensor by tensor, a spliced mix is the file llama-quantize writes for it, and the recipe
file alone rebuilds it byte for byte through llama-quantize --tensor-type-file; a recipe that lies about the
file is caught."""

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


def test_a_step_is_up_or_down_by_the_ladder_even_where_the_bytes_are_the_same():
    """Q4_0 -> IQ4_NL is a step up of the same 4.5 bits per weight (Q3_K_M's 576-wide tensors): the search takes
    such a tensor from the every-group-higher quant and records its group as moved higher."""
    q40, q50 = _tensor("blk.0.attn_q.weight", "q4_0"), _tensor("blk.0.attn_k.weight", "q5_0")
    assert rc.step(q40, 1) == "iq4_nl" and q40.bytes("iq4_nl") == q40.bytes()
    assert rc.direction(q40, "iq4_nl") == 1 and rc.direction(q50, "iq4_nl") == -1 and rc.direction(q50, "q5_1") == 1
    group = rc.Group("blk.0.attn", [q40, q50])
    base = {q40.name: "q4_0", q50.name: "q5_0"}
    assert rc._chosen(group, base, {q40.name: "iq4_nl", q50.name: "q5_1"}) == "higher"
    assert rc._chosen(group, base, {q40.name: "q4_0", q50.name: "iq4_nl"}) == "lower"


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


def _move(name: str, direction: int, kl: float, se: float = 0.0) -> rc._Move:
    """A measured move of a one-tensor group (576 x 576, Q5_0): one step up adds UP bytes (Q5_1), one step down
    frees DOWN (IQ4_NL); ``kl``: the mean KL measured with it alone."""
    t = _tensor(f"{name}.weight", "q5_0")
    types = {t.name: rc.step(t, direction)}
    return rc._Move(group=rc.Group(name, [t]), direction=direction, types=types,
                    delta_bytes=t.bytes(types[t.name]) - t.bytes(), kl=kl, se=se)


UP, DOWN = 576 * 576 // 32 * 2, 576 * 576 // 32 * 4  # Q5_0 -> Q5_1: 2 bytes more per block; -> IQ4_NL 4 fewer


def test_candidates_order_upgrades_by_gain_per_byte_and_payments_by_cost_per_byte_split_into_parts():
    base = 0.10
    mlp = [_tensor(f"blk.0.ffn_{k}.weight", "q5_0") for k in ("up", "gate")]
    band = rc.Group("blk.0-3.ffn", mlp)
    lower = rc._Move(band, -1, band.types(-1), -2 * DOWN, kl=0.104, se=0.001)
    moves = [_move("a", 1, 0.06), _move("b", 1, 0.09), _move("n", 1, 0.099, se=0.005),
             _move("w", 1, 0.101), _move("c", -1, 0.101), lower]
    ups, payments = rc.candidates(moves, base)
    assert _move("a", 1, 0.06).delta_bytes == UP and _move("c", -1, 0.101).delta_bytes == -DOWN
    # a saves 0.04, b 0.01 for the same bytes; n's gain is within its standard error: tried last; w measured worse
    assert [m.group.name for m in ups] == ["a", "b", "n"]
    # c costs 0.001 for DOWN bytes; the MLP band 0.005 (one standard error above its 0.004) for 2 DOWN, in parts
    assert [p.part.name for p in payments] == ["c", "blk.0-3.ffn_up", "blk.0-3.ffn_gate"]
    assert payments[1].types == {"blk.0.ffn_up.weight": "iq4_nl"} and payments[1].delta_bytes < 0
    assert payments[1].alone == pytest.approx(0.002, rel=0.01)  # half the band's bytes, half its change


def _mix_kl(effects):
    """A fake measurement of a whole mix on 256 positions: the KL of the starting file (0.10) plus, for each
    changed tensor, its effect; an effect may depend on the rest of the mix (what the sum of single
    measurements misses)."""
    import numpy as np

    def measure(changes: dict[str, str]) -> rc.Figures:
        kl = 0.10 + sum(effects[n](changes) for n in changes)
        return rc.Figures(kl=kl, kl_p99=0.0, top1=1.0, kls=np.full(256, kl))
    return measure


def test_a_payment_free_alone_but_costly_in_the_mix_is_refused_and_a_cheaper_one_pays():
    """SmolLM2 at Q4_K_M (bench/recipe.md): two MLP bands lowered measured free one at a time and cost 1.54x
    together with the upgrades they paid for. Every trade is measured as the whole mix it makes."""
    import numpy as np

    up, free, cheap = _move("u", 1, 0.06), _move("f", -1, 0.10), _move("c", -1, 0.102)
    start = rc.Figures(kl=0.10, kl_p99=0.0, top1=1.0, kls=np.full(256, 0.10))
    effects = {"u.weight": lambda m: -0.04, "f.weight": lambda m: 0.05 if "u.weight" in m else 0.0,
               "c.weight": lambda m: 0.002}
    ups, payments = rc.candidates([up, free, cheap], 0.10)
    assert [p.part.name for p in payments] == ["f", "c"]  # alone, f looks free
    changes, now, trades, used = rc.trade(ups, payments, start, _mix_kl(effects), room=0, passes=10,
                                          say=lambda _line: None)
    assert set(changes) == {"u.weight", "c.weight"} and now.kl == pytest.approx(0.062)
    [t] = trades
    assert t.taken and t.paid_with == ["c"] and t.refused == ["f"] and used == 3
    assert t.kl_after == pytest.approx(0.062)
    # the sum of single measurements would have taken f: 0.06 predicted, 0.11 measured in the mix
    assert _mix_kl(effects)({"u.weight": "q5_1", "f.weight": "iq4_nl"}).kl == pytest.approx(0.11)


def test_no_trade_is_taken_when_every_payment_costs_more_than_the_upgrade_saves_or_the_gain_is_noise():
    import numpy as np

    start = rc.Figures(kl=0.10, kl_p99=0.0, top1=1.0, kls=np.full(256, 0.10))
    up, down = _move("u", 1, 0.06), _move("d", -1, 0.101)
    dear = {"u.weight": lambda m: -0.04, "d.weight": lambda m: 0.045}
    ups, payments = rc.candidates([up, down], 0.10)
    changes, now, trades, _ = rc.trade(ups, payments, start, _mix_kl(dear), room=0, passes=10,
                                       say=lambda _line: None)
    assert changes == {} and now is start and not trades[0].taken and trades[0].refused == ["d"]
    assert "over the budget" in trades[0].why
    # within the budget no payment is needed; an upgrade that gains nothing in the mix is not taken
    changes, _, trades, used = rc.trade(ups, payments, start, _mix_kl({"u.weight": lambda m: 0.0}), room=UP,
                                        passes=10, say=lambda _line: None)
    assert changes == {} and used == 1 and "no gain" in trades[0].why
    # the passes are bounded
    changes, _, _, used = rc.trade(ups, payments, start, _mix_kl(dear), room=0, passes=1, say=lambda _line: None)
    assert used == 1 and changes == {}


def test_the_bytes_never_pass_the_budget_and_a_payments_surplus_pays_for_the_next_upgrade():
    import numpy as np

    start = rc.Figures(kl=0.10, kl_p99=0.0, top1=1.0, kls=np.full(256, 0.10))
    moves = [_move("a", 1, 0.07), _move("b", 1, 0.08), _move("c", 1, 0.09),
             _move("d", -1, 0.1001)]
    effects = {"a.weight": lambda m: -0.03, "b.weight": lambda m: -0.02, "c.weight": lambda m: -0.01,
               "d.weight": lambda m: 0.001}
    ups, payments = rc.candidates(moves, 0.10)
    changes, now, trades, used = rc.trade(ups, payments, start, _mix_kl(effects), room=UP // 2, passes=20,
                                          say=lambda _line: None)
    # a needs UP / 2 more bytes: d frees DOWN = 2 UP; b fits in what is left; c finds no bytes and no payment
    assert [t.taken for t in trades] == [True, True, False] and set(changes) == {"a.weight", "b.weight",
                                                                               "d.weight"}
    assert trades[1].paid_with == [] and trades[2].why.endswith("over the budget with every payment tried")
    assert sum(m.delta_bytes for m in moves if m.group.name + ".weight" in changes) <= UP // 2
    assert now.kl == pytest.approx(0.051)


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
    singles = sum((g.higher_kl is not None) + (g.lower_kl is not None) for g in record.groups)
    assert all(g.higher_bytes > 0 > g.lower_bytes for g in record.groups if g.lower_bytes is not None
               and g.higher_bytes is not None)
    # the KL figures are measured, not copied: the searched file is measured again from scratch
    again = tiny_search["calib"].measure(found.path)
    assert again.kl == pytest.approx(record.calibration_kl, abs=1e-6)
    delta, se = rc.paired(tiny_search["calib"].measure(tiny_search["imatrix"]), again)
    assert record.shipped == (delta + rc.MARGIN_SE * se < 0), record.reason
    # every mix a trade measured is counted, and what each trade kept is in the file
    assert record.variants == singles + sum(1 + len(t.paid_with) + len(t.refused) for t in record.trades)
    assert record.changed == 0 or any(t.taken for t in record.trades)


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


def test_a_spliced_mix_is_the_file_llama_quantize_writes_for_its_recipe(tiny_search, tmp_path):
    """The search measures a group moved, and a trade's mix (groups higher, parts of others lower), by splicing
    tensors from a quant with every group higher and one with every group lower into the importance-matrix
    quant; that is only sound if the result is what llama-quantize writes for that recipe. Checked byte for
    byte for a group moved each way, and for a mix taken from both donors."""
    bf16, matrix, imx = tiny_search["bf16"], tiny_search["matrix"], tiny_search["imatrix"]
    tensors, _ = rc.read_tensors(imx)
    base = {t.name: t.type for t in tensors if rc._quantized(t.type)}
    found = rc.groups(tensors, bands=2)
    donors = {}
    for direction in (1, -1):
        every = dict(base)
        for g in found:
            every.update(g.types(direction) or {})
        donors[direction] = tmp_path / f"every-{direction}.gguf"
        rc.quantize_recipe(bf16, donors[direction], "q4_k_m", matrix,
                           rc.write_recipe(tmp_path / f"every-{direction}.txt", every))
    attn = next(g for g in found if g.name.endswith(".attn"))
    up_part = next(p for g in found if g.name.endswith(".ffn") for p in rc.parts(g) if p.name.endswith("ffn_up"))
    lowered = rc.Group("part", up_part.tensors).types(-1)
    mixes = {"higher": {n: (t, donors[1]) for n, t in attn.types(1).items()},
             "lower": {n: (t, donors[-1]) for n, t in attn.types(-1).items()},
             "mix": {**{n: (t, donors[1]) for n, t in attn.types(1).items()},
                     **{n: (t, donors[-1]) for n, t in lowered.items()}}}
    for what, mix in mixes.items():
        spliced, direct = tmp_path / f"spliced-{what}.gguf", tmp_path / f"direct-{what}.gguf"
        rc.splice(imx, {n: d for n, (_, d) in mix.items()}, spliced)
        rc.quantize_recipe(bf16, direct, "q4_k_m", matrix, rc.write_recipe(
            tmp_path / f"one-{what}.txt", {**base, **{n: t for n, (t, _) in mix.items()}}))
        assert sha256_file(spliced) == sha256_file(direct), what
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
