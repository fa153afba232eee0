"""Where a searched recipe's probe KL comes from: its upgrades alone and its downgrades alone, each made by
llama-quantize with the importance matrix, against the importance-matrix quant and the searched file.

    python bench/recipe_split.py --work /tmp/recipe-bench --run RUN [--type q4_k_m]

Reads what ``bench/recipe_bench.py`` left in ``WORK/smollm2`` (the 16-bit GGUF, matrix, calibration text, the
importance-matrix quant and the searched file with its recipe). A diagnosis after the fact: the probes steer
nothing here, they only show which half of the trade did not transfer. Prints one row per file (bytes, mean KL
and top-1 on the held-out probes, mean KL on the search's calibration positions) and the JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/grpoctl-recipe-bench"))
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--type", default="q4_k_m")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(ROOT))
    from grpoctl.export import gguf as gg
    from grpoctl.export import recipe as rc
    from grpoctl.export.parity.measure import measure
    from grpoctl.export.parity.reference import prepare_reference
    from grpoctl.export.parity.scoring import FALLBACK_FLOOR
    from grpoctl.gguftypes import TYPES
    from grpoctl.rundir import RunDir

    t = args.type
    d = args.work / "smollm2"
    w = d / "split"
    w.mkdir(exist_ok=True)
    tensors, _ = rc.read_tensors(d / f"imatrix-{t}.gguf")
    base = {x.name: x.type for x in tensors if rc._quantized(x.type)}
    final = {p.strip("^$").replace("\\", ""): y
             for p, y in rc.read_recipe(d / "search" / f"bench-{TYPES[t].label}{rc.RECIPE_SUFFIX}")}
    up = {n: final[n] if rc._bpw(final[n]) > rc._bpw(base[n]) else base[n] for n in base}
    down = {n: final[n] if rc._bpw(final[n]) < rc._bpw(base[n]) else base[n] for n in base}
    files = {"imatrix": d / f"imatrix-{t}.gguf", "searched": d / "search" / f"searched-{t}.gguf"}
    for name, types in (("upgrades only", up), ("downgrades only", down)):
        out = w / f"{name.replace(' ', '-')}-{t}.gguf"
        rc.quantize_recipe(d / "model-BF16.gguf", out, t, d / "bench-imatrix.gguf",
                           rc.write_recipe(w / f"{name.replace(' ', '-')}{rc.RECIPE_SUFFIX}", types))
        files[name] = out
    run = RunDir(args.run)
    view = d / "view"
    ref = prepare_reference(Path(run.base_model.path), run.adapter_dir, view, run.system_prompt,
                            gg.end_of_turn_ids(view))
    calib = rc.CalibrationKL(d / "model-BF16.gguf", (d / "bench-calibration.txt").read_text(),
                             rc.RecipeRequest().positions)
    res = {}
    for k, p in files.items():
        f = measure(p, t, ref, FALLBACK_FLOOR)
        res[k] = {"bytes": p.stat().st_size, "probe_kl": f.kl, "probe_top1": f.top1,
                  "calibration_kl": round(calib.measure(p).kl, 6)}
    m = res["imatrix"]
    print(f"{t}: {ref.noise['positions']} probe positions, {calib.positions} calibration positions")
    print(f"{'file':16} {'bytes':>10} {'probe KL':>9} {'x imatrix':>9} {'top-1':>7} {'calib KL':>9}")
    for k, r in res.items():
        print(f"{k:16} {r['bytes']:10d} {r['probe_kl']:9.5f} {r['probe_kl'] / m['probe_kl']:8.2f}x "
              f"{r['probe_top1'] * 100:6.1f}% {r['calibration_kl']:9.5f}")
    print(json.dumps({"type": t, "files": res}))


if __name__ == "__main__":
    main()
