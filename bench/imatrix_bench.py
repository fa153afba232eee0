"""Importance-matrix quants: the gain on held-out probes, and the imatrix pass timed against the quantizations it
serves, on the embedded SmolLM2 demo run and a tiny-fixture run.

    python bench/imatrix_bench.py [--work /tmp/grpoctl-imatrix-bench] [--run RUN] [--types q4_k_m,q3_k_m,q4_0,iq4_xs]
                                  [--samples 64] [--no-tiny]

For each run (SmolLM2: ``--run``, else `grpoctl train --config examples/demo.toml` into the work folder once;
tiny: the test fixtures' random Qwen3 with a trained-looking adapter):

  1. the 16-bit GGUF intermediate (llama.cpp's converter, base + adapter merged per tensor)
  2. calibration text: the run's prompts + completions sampled from the trained model (what `--imatrix auto`
     uses), and for comparison the same prompts + the dataset's solutions
  3. llama-imatrix over each text: one forward pass (wall, peak RSS)
  4. every type: plain in-process (llama_model_quantize, what grpoctl does without a matrix), plain through
     llama-quantize (the bytes compared), and with each matrix through llama-quantize
  5. parity of every file against the trained model on the fixed probes, none of which is in either text

Every timed step runs in its own subprocess (wall time and peak RSS of it and its children, as in
gguf_bench.py). Prints the plain vs imatrix table per type, the tensor types of each file, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from gguf_bench import step

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.toml"


def demo_run(work: Path) -> Path:
    run = work / "demo-run"
    if not (run / "adapter" / "adapter_config.json").is_file():
        subprocess.run([sys.executable, "-m", "grpoctl", "train", "--config", str(DEMO), "--output-dir", str(run),
                        "--force"], check=True, cwd=ROOT)
    return run


def tiny_run(work: Path) -> Path:
    """The test fixtures' tiny Qwen3 (random weights, hidden 64) with a trained-looking adapter and a run.json."""
    run = work / "tiny-run"
    if (run / "run.json").is_file():
        return run
    from tests.export.adapters import make_adapter
    from tests.tinymodels import build_tiny_model

    base = build_tiny_model(work / "tiny-qwen3", "qwen3")
    make_adapter(base, run / "adapter", save_tokenizer=True)
    (run / "run.json").write_text(json.dumps({"base_model": {"id": str(base), "path": str(base)},
                                              "config": {"data": {"system_prompt": "You are a careful math tutor."}}}))
    return run


def _code(*parts: str) -> str:
    """Python source for a step: each part dedented on its own (they are indented differently here)."""
    return "".join(textwrap.dedent(p) for p in parts)


def bench_run(label: str, run_dir: Path, work: Path, types: list[str], samples: int) -> dict:
    from grpoctl.rundir import RunDir

    run = RunDir(run_dir)
    base = Path(run.base_model.path)
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results: list[dict] = []
    print(f"\n== {label}: {run_dir} (base {run.base_model.id}); types {','.join(types)}", flush=True)
    common = f"""
        import json
        from pathlib import Path
        from grpoctl.export import gguf as gg, imatrix as im
        from grpoctl.rundir import RunDir
        run = RunDir(Path({str(run_dir)!r})); base = Path({str(base)!r}); out = Path({str(out)!r})
        adapter = run.adapter_dir
        """
    inter = out / "model-BF16.gguf"
    step("convert base + adapter -> 16-bit GGUF", _code(common, f"""
        from grpoctl.export.converter import find_converter
        view = gg.model_view(base, adapter, out / "view")
        gg.convert(find_converter(fetch=False), view, adapter, Path({str(inter)!r}), gg.source_16bit_type(view),
                   name="bench", metadata=gg.gguf_metadata("bench", base, adapter))
        """), results)
    texts = {}
    for source in ("sampled", "solutions"):
        cal = out / f"calibration-{source}.txt"
        step(f"calibration text ({source})", _code(common, f"""
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(out / "view")
            req = im.ImatrixRequest(run=run, samples={samples}, completions={source!r})
            info = im.build_calibration(req, base, adapter, tok, gg.end_of_turn_ids(out / "view"), Path({str(cal)!r}))
            info["tokens"] = len(tok(Path({str(cal)!r}).read_text(), add_special_tokens=False)["input_ids"])
            assert im.probe_hits(Path({str(cal)!r}).read_text()) == []
            Path({str(cal)!r} + ".json").write_text(json.dumps(info))
            """), results)
        texts[source] = json.loads(Path(str(cal) + ".json").read_text())
        step(f"llama-imatrix ({source}, {texts[source]['tokens']} tokens)", _code(common, f"""
            im.compute_matrix(Path({str(inter)!r}), Path({str(cal)!r}), out / "imatrix-{source}.gguf",
                              {texts[source]['tokens']})
            """), results)
    files: dict[str, dict[str, Path]] = {}
    tensor_types: dict[str, dict] = {}
    identical: dict[str, bool] = {}
    for t in types:
        files[t] = {}
        plain, via_tool = out / f"plain-{t}.gguf", out / f"tool-{t}.gguf"
        step(f"quantize {t} plain, in-process", _code(common, f"""
            from grpoctl.export.quantize import quantize
            quantize(Path({str(inter)!r}), Path({str(plain)!r}), {t!r})
            """), results)
        step(f"quantize {t} plain, llama-quantize", _code(common, f"""
            import subprocess
            from grpoctl.gguftypes import TYPES
            from grpoctl.llamacpp_tools import tool
            subprocess.run([str(tool("llama-quantize")), {str(inter)!r}, {str(via_tool)!r}, TYPES[{t!r}].label],
                           check=True, capture_output=True)
            """), results)
        identical[t] = plain.read_bytes() == via_tool.read_bytes()
        via_tool.unlink()
        files[t]["plain"] = plain
        for source in ("sampled", "solutions"):
            dst = out / f"imatrix-{source}-{t}.gguf"
            step(f"quantize {t} with the {source} matrix", _code(common, f"""
                info = im.quantize_with_matrix(Path({str(inter)!r}), Path({str(dst)!r}), {t!r},
                                               out / "imatrix-{source}.gguf")
                Path({str(dst)!r} + ".json").write_text(json.dumps(info))
                """), results)
            files[t][source] = dst
            tensor_types[t] = json.loads(Path(str(dst) + ".json").read_text())["tensor_types"]

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

    by = {r["step"]: r for r in results}
    print(f"\n{label}: plain vs imatrix on {ref.noise['positions']} held-out probe positions "
          f"(noise floor bf16 vs f32: top-1 {ref.noise['top1'] * 100:.1f}%, KL {ref.noise['kl']:.5f})")
    print(f"{'type':8} {'matrix':9} {'top-1':>7} {'mean KL':>9} {'p99 KL':>8} {'mean KL gain':>13} {'p99 gain':>9}")
    for t in types:
        p = figures[t]["plain"]
        print(f"{t:8} {'none':9} {p['top1'] * 100:6.1f}% {p['kl']:9.5f} {p['kl_p99']:8.4f}")
        for source in ("sampled", "solutions"):
            f = figures[t][source]
            gain, gain99 = (p["kl"] - f["kl"]) / p["kl"], (p["kl_p99"] - f["kl_p99"]) / p["kl_p99"]
            print(f"{'':8} {source:9} {f['top1'] * 100:6.1f}% {f['kl']:9.5f} {f['kl_p99']:8.4f} "
                  f"{gain * 100:12.1f}% {gain99 * 100:8.1f}%")
    print("\ntensor types written (llama-quantize's log; all but q8_0/f32 read the matrix)")
    for t in types:
        print(f"  {t:8} " + ", ".join(f"{k} {v}" for k, v in sorted(tensor_types[t].items(), key=lambda kv: -kv[1])))

    print("\nratios")
    for source in ("sampled", "solutions"):
        pass_ = by[f"llama-imatrix ({source}, {texts[source]['tokens']} tokens)"]
        quants = [by[f"quantize {t} with the {source} matrix"] for t in types]
        served = sum(q["wall_s"] for q in quants)
        print(f"  imatrix pass ({source}, {texts[source]['tokens']} tokens) / the {len(types)} quantizations it "
              f"serves: {pass_['wall_s']:.1f} s / {served:.1f} s = {pass_['wall_s'] / served:.2f}x; peak RSS "
              f"{pass_['peak_rss_mib']} MiB vs {max(q['peak_rss_mib'] for q in quants)} MiB")
    sampling = by["calibration text (sampled)"]["wall_s"]
    served = sum(by[f"quantize {t} with the sampled matrix"]["wall_s"] for t in types)
    print(f"  sampling the completions / those quantizations: {sampling:.1f} s / {served:.1f} s = "
          f"{sampling / served:.2f}x")
    for t in types:
        a, b = by[f"quantize {t} plain, in-process"], by[f"quantize {t} plain, llama-quantize"]
        print(f"  {t}: llama-quantize / in-process, no matrix: {b['wall_s']:.1f} s / {a['wall_s']:.1f} s = "
              f"{b['wall_s'] / a['wall_s']:.2f}x; byte-identical: {identical[t]}")
    return {"label": label, "steps": results, "calibration": texts, "identical": identical,
            "tensor_types": tensor_types,
            "figures": {t: {k: {m: f[m] for m in ("top1", "kl", "kl_p99")} for k, f in v.items()}
                        for t, v in figures.items()},
            "noise": ref.noise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/grpoctl-imatrix-bench"))
    ap.add_argument("--run", type=Path, help="a SmolLM2 run directory (default: train examples/demo.toml once)")
    ap.add_argument("--types", default="q4_k_m,q3_k_m,q4_0,iq4_xs")
    ap.add_argument("--samples", type=int, default=64, help="training prompts in the calibration text")
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--no-smollm2", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from grpoctl.gguftypes import parse_types
    from grpoctl.llamacpp_tools import find_tools

    find_tools(build=True)
    types = parse_types(args.types)
    args.work.mkdir(parents=True, exist_ok=True)
    out = []
    if not args.no_tiny:
        out.append(bench_run("tiny", tiny_run(args.work), args.work, types, args.samples))
    if not args.no_smollm2:
        out.append(bench_run("smollm2", args.run or demo_run(args.work), args.work, types, args.samples))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
