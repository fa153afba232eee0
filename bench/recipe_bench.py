"""Searched per-tensor quant recipes: size, KL and top-1 of the plain, importance-matrix and searched files of a
type on the held-out probes, and the search timed against the plain quantizations, on the SmolLM2 demo run.

    python bench/recipe_bench.py [--work /tmp/grpoctl-recipe-bench] [--run RUN] [--types q4_k_m,q3_k_m]
                                 [--completions sampled|solutions] [--bands 8] [--positions 2048] [--reuse]

The run is `grpoctl train --config examples/demo.toml` into the work folder once (or ``--run``). Then, as
`grpoctl export --gguf TYPES --imatrix auto --quant-recipe search` does it:

  1. the 16-bit GGUF intermediate (llama.cpp's converter, base + adapter merged per tensor)
  2. the calibration text: 64 training prompts + completions sampled from the trained model (``--completions
     solutions``: the dataset's solutions, much faster on a CPU); no parity probe text in it
  3. llama-imatrix over it
  4. per type: the plain quant (in-process, what grpoctl does without a matrix), the importance-matrix quant
     (llama-quantize --imatrix), and the recipe search from it (grpoctl.export.recipe.search: one llama-quantize
     --tensor-type-file run and one llama.cpp pass over the calibration positions per group and direction)
  5. the three files of each type against the trained model on the parity probes (not timed)

``--reuse`` keeps steps 1-3 from an earlier run in the same work folder (they do not depend on the search; the
output says which were kept and leaves them untimed).

Every timed step runs in its own subprocess (wall time and peak RSS of it and its children, as in
gguf_bench.py). Prints the table per type, the target (searched mean KL / importance-matrix mean KL on the
probes, at no more bytes) and the ratios of the search's time to the plain quantizations'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from gguf_bench import step
from imatrix_bench import _code, demo_run

ROOT = Path(__file__).resolve().parents[1]


def bench(run_dir: Path, work: Path, types: list[str], completions: str, bands: int, positions: int,
          reuse: bool = False) -> dict:
    from grpoctl.rundir import RunDir

    run = RunDir(run_dir)
    base = Path(run.base_model.path)
    out = work / "smollm2"
    inter = out / "model-BF16.gguf"
    cal = out / "bench-calibration.txt"
    matrix = out / "bench-imatrix.gguf"
    kept = [p for p in (inter, cal, Path(str(cal) + ".json"), matrix, out / "view") if p.exists()] if reuse else []
    if reuse and len(kept) == 5:
        for p in out.iterdir():
            if p not in kept:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        kept = []
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    print(f"\n== smollm2: {run_dir} (base {run.base_model.id}); types {','.join(types)}; calibration completions "
          f"{completions}; {bands} bands, {positions} positions", flush=True)
    common = f"""
        import json
        from pathlib import Path
        from grpoctl.export import gguf as gg, imatrix as im, recipe as rc
        from grpoctl.rundir import RunDir
        run = RunDir(Path({str(run_dir)!r})); base = Path({str(base)!r}); out = Path({str(out)!r})
        adapter = run.adapter_dir
        """
    if kept:
        print(f"reused from an earlier run (not timed): {', '.join(p.name for p in kept)}", flush=True)
    if not kept:
        step("convert base + adapter -> 16-bit GGUF", _code(common, f"""
        from grpoctl.export.converter import find_converter
        view = gg.model_view(base, adapter, out / "view")
        gg.convert(find_converter(fetch=False), view, adapter, Path({str(inter)!r}), gg.source_16bit_type(view),
                   name="bench", metadata=gg.gguf_metadata("bench", base, adapter))
        """), results)
        step(f"calibration text ({completions})", _code(common, f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(out / "view")
        req = im.ImatrixRequest(run=run, completions={completions!r})
        info = im.build_calibration(req, base, adapter, tok, gg.end_of_turn_ids(out / "view"), Path({str(cal)!r}))
        info["tokens"] = len(tok(Path({str(cal)!r}).read_text(), add_special_tokens=False)["input_ids"])
        assert im.probe_hits(Path({str(cal)!r}).read_text()) == []
        Path({str(cal)!r} + ".json").write_text(json.dumps(info))
        """), results)
    tokens = json.loads(Path(str(cal) + ".json").read_text())["tokens"]
    from grpoctl.llamacpp_tools import find_tools

    find_tools(build=True)  # llama-imatrix and llama-quantize, built once (not timed)
    if not kept:
        step(f"llama-imatrix ({tokens} tokens)", _code(common, f"""
        im.compute_matrix(Path({str(inter)!r}), Path({str(cal)!r}), out / "bench-imatrix.gguf", {tokens})
        """), results)
    files: dict[str, dict[str, Path]] = {}
    records: dict[str, dict] = {}
    for t in types:
        plain, imx = out / f"plain-{t}.gguf", out / f"imatrix-{t}.gguf"
        step(f"quantize {t} plain, in-process", _code(common, f"""
            from grpoctl.export.quantize import quantize
            quantize(Path({str(inter)!r}), Path({str(plain)!r}), {t!r})
            """), results)
        step(f"quantize {t} with the matrix", _code(common, f"""
            im.quantize_with_matrix(Path({str(inter)!r}), Path({str(imx)!r}), {t!r}, out / "bench-imatrix.gguf")
            """), results)
        step(f"search {t} recipe", _code(common, f"""
            from grpoctl.jsonfiles import to_json
            inter, imx, plain = Path({str(inter)!r}), Path({str(imx)!r}), Path({str(plain)!r})
            calib = rc.CalibrationKL(inter, Path({str(cal)!r}).read_text(), {positions})
            found = rc.search(inter, imx, {t!r}, out / "bench-imatrix.gguf", calib, out / "search", "bench",
                              min(imx.stat().st_size, plain.stat().st_size), rc.RecipeRequest(bands={bands},
                              positions={positions}), say=lambda line: print(line, flush=True))
            Path(str(out / "search-{t}.json")).write_text(json.dumps(
                {{"record": to_json(found.record), "path": str(found.path), "positions": calib.positions}}))
            """), results)
        rec = json.loads((out / f"search-{t}.json").read_text())
        records[t] = rec
        files[t] = {"plain": plain, "imatrix": imx, "searched": Path(rec["path"])}

    print("parity of every file on the held-out probes (not timed) ...", flush=True)
    from grpoctl.export import gguf as gg
    from grpoctl.export.parity.measure import measure
    from grpoctl.export.parity.reference import prepare_reference
    from grpoctl.export.parity.scoring import FALLBACK_FLOOR
    from grpoctl.jsonfiles import to_json

    view = out / "view"
    ref = prepare_reference(base, run.adapter_dir, view, run.system_prompt, gg.end_of_turn_ids(view))
    # as the figures parity.json records
    figures = {t: {k: to_json(measure(p, t, ref, FALLBACK_FLOOR)) for k, p in f.items()} for t, f in files.items()}
    sizes = {t: {k: p.stat().st_size for k, p in f.items()} for t, f in files.items()}

    by = {r["step"]: r for r in results}
    print(f"\nsmollm2: plain vs imatrix vs searched on {ref.noise['positions']} held-out probe positions (noise floor "
          f"bf16 vs f32: top-1 {ref.noise['top1'] * 100:.1f}%, KL {ref.noise['kl']:.5f}); the search saw "
          f"{records[types[0]]['positions']} positions of the calibration text")
    print(f"{'type':8} {'file':9} {'bytes':>10} {'top-1':>7} {'mean KL':>9} {'p99 KL':>8}")
    for t in types:
        for k in ("plain", "imatrix", "searched"):
            f = figures[t][k]
            print(f"{t:8} {k:9} {sizes[t][k]:10d} {f['top1'] * 100:6.1f}% {f['kl']:9.5f} {f['kl_p99']:8.4f}")
        r = records[t]["record"]
        print(f"{'':8} search: {r['changed']} tensors changed, calibration KL {r['calibration_kl']:.5f} vs "
              f"{r['base_calibration_kl']:.5f} (predicted {r['predicted_kl']:.5f}); would ship: {r['shipped']} "
              f"({r['reason']})")
        print(f"{'':8} searched types: " + ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items()))
        print(f"{'':8} groups moved: " + ", ".join(f"{g['name']} {g['chosen']}" for g in r["groups"]
                                                   if g["chosen"] != "base"))
        for tr in r.get("trades", []):
            after = f" -> {tr['kl_after']:.5f}" if tr.get("kl_after") is not None else ""
            paid = f"; paid with {', '.join(tr['paid_with'])}" if tr["paid_with"] else ""
            refused = f"; refused {', '.join(tr['refused'])}" if tr["refused"] else ""
            print(f"{'':8} trade {tr['upgrade']} higher: {tr['kl_before']:.5f} -> {tr['kl_upgraded']:.5f}{after}"
                  f"{paid}{refused}; {'taken' if tr['taken'] else 'not taken'} ({tr['why']})")

    print("\nratios")
    for t in types:
        s, m = figures[t]["searched"], figures[t]["imatrix"]
        print(f"  {t}: searched / imatrix on the probes: mean KL {s['kl']:.5f} / {m['kl']:.5f} = "
              f"{s['kl'] / m['kl']:.2f}x (target <= 0.80x), p99 KL {s['kl_p99'] / m['kl_p99']:.2f}x, top-1 "
              f"{(s['top1'] - m['top1']) * 100:+.1f} points; bytes {sizes[t]['searched']} / {sizes[t]['imatrix']} = "
              f"{sizes[t]['searched'] / sizes[t]['imatrix']:.4f}x")
    for t in types:
        search = by[f"search {t} recipe"]
        plain = by[f"quantize {t} plain, in-process"]
        imx = by[f"quantize {t} with the matrix"]
        r = records[t]["record"]
        print(f"  {t}: the search ({r['variants']} files measured) / the plain quantization: "
              f"{search['wall_s']:.1f} s / {plain['wall_s']:.1f} s = {search['wall_s'] / plain['wall_s']:.1f}x; "
              f"/ the importance-matrix quantization: {search['wall_s'] / imx['wall_s']:.1f}x; peak RSS "
              f"{search['peak_rss_mib']} MiB vs {plain['peak_rss_mib']} MiB")
    return {"label": "smollm2", "steps": results, "types": types, "completions": completions, "bands": bands,
            "positions": positions, "reused": [p.name for p in kept], "sizes": sizes,
            "figures": {t: {k: {m: f[m] for m in ("top1", "kl", "kl_p99")} for k, f in v.items()}
                        for t, v in figures.items()},
            "search": {t: r["record"] for t, r in records.items()}, "noise": ref.noise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/grpoctl-recipe-bench"))
    ap.add_argument("--run", type=Path, help="a SmolLM2 run directory (default: train examples/demo.toml once)")
    ap.add_argument("--types", default="q4_k_m,q3_k_m")
    ap.add_argument("--completions", choices=("sampled", "solutions"), default="sampled")
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--positions", type=int, help="calibration positions (default: the export's)")
    ap.add_argument("--reuse", action="store_true", help="keep the 16-bit GGUF, calibration text and matrix of an "
                    "earlier run in --work")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the grpoctl command sets it (bench/cpu_threads.md)
    sys.path.insert(0, str(ROOT))
    from grpoctl.export.recipe import RecipeRequest
    from grpoctl.gguftypes import parse_types

    args.work.mkdir(parents=True, exist_ok=True)
    result = bench(args.run or demo_run(args.work), args.work, parse_types(args.types), args.completions,
                   args.bands, args.positions or RecipeRequest().positions, args.reuse)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
