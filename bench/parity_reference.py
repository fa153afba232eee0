"""The parity reference held in memory vs streamed layer by layer from the safetensors files: wall time, peak
memory and the largest difference between their log-probabilities, on a synthetic Qwen3 with an r32 adapter.

    python bench/parity_reference.py WORK [--shape qwen3-1.7b] [--keep]

Each mode runs ``prepare_reference`` (probes in float32, the greedy answer, the bf16 noise floor) in
its own process with ``$GRPOCTL_PARITY_REFERENCE`` set, on the CPU unless ``$GRPOCTL_PARITY_DEVICE`` says
otherwise; memory is the process's peak RSS and, within it, the anonymous part (file pages of the
safetensors mappings aside). The in-memory mode needs the float32 model's size in RAM (twice the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from export_8b import TreeMemory  # noqa: E402
from gpulib import default_tokenizer  # noqa: E402

RUN = """
import json, sys, time, torch
from pathlib import Path
from grpoctl.export.parity.reference import prepare_reference
base, adapter, out = Path({base!r}), Path({adapter!r}), Path({out!r})
t = time.monotonic()
ref = prepare_reference(base, adapter, base, None, [])
torch.save(ref.ref32, out)
print(json.dumps({{"wall_s": round(time.monotonic() - t, 1), "reference": ref.description,
                   "noise": ref.noise, "answer": ref.answer}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import export_8b as b; "
            f"b.build_adapter(b.build_base(Path({str(work / 'base')!r}), {args.shape!r}, "
            f"Path({str(default_tokenizer())!r})), Path({str(work / 'adapter')!r}))")
    subprocess.run([sys.executable, "-c", code], check=True)
    base, adapter = work / "base", work / "adapter"
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    print(f"model {args.shape}: {sum(p.stat().st_size for p in shards) / 2**30:.2f} GiB bf16 in {len(shards)} "
          f"shards, largest {largest:.0f} MiB; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = {}
    for mode in ("memory", "stream"):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "GRPOCTL_PARITY_REFERENCE": mode, "TOKENIZERS_PARALLELISM": "false"}
        body = textwrap.dedent(RUN.format(base=str(base), adapter=str(adapter), out=str(work / f"{mode}.pt")))
        proc = subprocess.Popen([sys.executable, "-c", body], env=env, stdout=subprocess.PIPE, text=True)
        with TreeMemory(proc.pid) as mem:
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: exit {proc.returncode}")
        rows[mode] = {**json.loads(out.strip().splitlines()[-1]), **mem.peaks()}
        r = rows[mode]
        print(f"  {mode:7} {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_mib']:6d} MiB (anon {r['peak_anon_mib']}, "
              f"file {r['peak_file_mib']})  noise floor top-1 {r['noise']['top1']:.4f} KL {r['noise']['kl']:.6f}",
              flush=True)
    import torch

    a, b = (torch.load(work / f"{m}.pt") for m in ("memory", "stream"))
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))
    m, s = rows["memory"], rows["stream"]
    print(f"\nstreamed / in memory: wall {s['wall_s'] / m['wall_s']:.2f}x, peak RSS "
          f"{s['peak_rss_mib'] / m['peak_rss_mib']:.2f}x (anon {s['peak_anon_mib'] / m['peak_anon_mib']:.2f}x); "
          f"streamed peak anon = "
          f"{s['peak_anon_mib'] / largest:.2f}x the largest shard; largest |logprob difference| {diff:.2e} "
          f"; same greedy answer: {m['answer'] == s['answer']}")
    (work / "parity_reference.json").write_text(json.dumps({"shape": args.shape, "largest_shard_mib": round(largest),
                                                            "runs": rows, "max_abs_diff": diff}, indent=2) + "\n")
    if not args.keep:
        for d in ("base", "adapter"):
            shutil.rmtree(work / d, ignore_errors=True)


if __name__ == "__main__":
    main()
