"""One GRPO config on one process and on two GPUs under DDP, ZeRO-2, ZeRO-3 and FSDP, then the two-process
adapter exported to GGUF with the parity check.

    python bench/gpu_multi.py OUTDIR [--shape qwen3-1.7b] [--steps 20] [--runs one,ddp,zero2,zero3,fsdp]
                              [--tokenizer DIR] [--deadline-s 560]

Builds a random Qwen3 of ``--shape`` (real config, full 151,936-row vocabulary) in a child process, then
runs ``grpoctl train`` once per strategy, each in its own process: ``one`` is plain ``grpoctl train`` with
every GPU visible (one process; grpoctl keeps it on one GPU), the others ``--num-processes 2 --strategy S``.
Per run: steps/s (grpoctl's own timing around ``trainer.train()``), completions/s (steps/s x completions per
step, which doubles with two processes), peak memory per GPU as nvidia-smi sees it (one process per GPU, so
per process), rank 0's ``torch.cuda.max_memory_allocated``, final mean reward, and whether the adapter has
the full shapes and a trained (non-zero) B. Ratios are against ``one``. Then the first two-process run that
finished (fsdp, zero3, zero2, ddp in that order) is exported with ``--gguf f16,q8_0`` and the parity gate.
Runs that would not finish before ``--deadline-s`` are skipped and say so.

CPU rehearsal (gloo; the sharding strategies need GPUs):
    python bench/gpu_multi.py /tmp/gm --shape tiny --steps 2 --runs one,ddp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpulib import (  # noqa: E402
    GpuSampler,
    build_qwen3_in_child,
    default_tokenizer,
    log_tail,
    run_logged,
    versions,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS, PER_DEVICE = 8, 16  # two prompts x 8 completions in each process per step


def common_flags(steps: int, completion: int) -> list[str]:
    return ["--backend", "trl", "--max-steps", str(steps),
            "--set", f"trainer.num_generations={GENERATIONS}",
            "--set", f"trainer.per_device_train_batch_size={PER_DEVICE}",
            "--set", f"trainer.max_completion_length={completion}", "--set", "trainer.learning_rate=1e-4",
            "--set", "trainer.save_steps=1000", "--set", "data.max_samples=400"]


def adapter_check(adapter: Path) -> dict:
    """Shapes and training of the written adapter: every tensor 2-D with rank 32, B not all zero."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        b_max = max(float(f.get_tensor(k).abs().max()) for k in f.keys() if "lora_B" in k)
    rank_ok = all(len(s) == 2 and (s[0] == 32 if "lora_A" in k else s[1] == 32) for k, s in shapes.items())
    return {"tensors": len(shapes), "rank32_2d": rank_ok, "lora_b_abs_max": b_max}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--runs", default="one,ddp,zero2,zero3,fsdp")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--deadline-s", type=float, default=560.0)
    ap.add_argument("--run-timeout-s", type=float, default=170.0)
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args()
    t0 = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env_info = versions()
    print(json.dumps(env_info), flush=True)
    gpu = bool(env_info["gpus"])
    model = build_qwen3_in_child(out / "models" / args.shape, args.shape, args.tokenizer or default_tokenizer(),
                                 "cuda" if gpu else "cpu")
    print(f"model {args.shape} built at {time.monotonic() - t0:.0f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    py = [sys.executable, "-m", "grpoctl", "train", "-m", str(model)]
    flags = common_flags(args.steps, args.completion)
    rows: list[dict] = []
    for name in args.runs.split(","):
        left = args.deadline_s - (time.monotonic() - t0)
        if left < 60:
            rows.append({"name": name, "rc": "skipped", "why": f"{left:.0f} s left before the deadline"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        cmd = [*py, "-o", str(out / name), *flags]
        if name != "one":
            cmd += ["--num-processes", "2", "--strategy", name]
        with GpuSampler() as sampler:
            row = run_logged(name, cmd, out, min(args.run_timeout_s, left - 30), env=env)
        row["gpu"] = sampler.summary()
        summary = out / name / "summary.json"
        if row["rc"] == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            ran = json.loads((out / name / "run.json").read_text())["config"]["distributed"]
            completions = PER_DEVICE * s["world_size"]
            row.update(steps=s["steps"], steps_per_s=s["steps_per_s"],
                       completions_per_s=round(s["steps_per_s"] * completions, 3),
                       rank0_max_allocated_mib=s["peak_gpu_memory_mb"], mean_reward_last=s["mean_reward_last"],
                       world_size=s["world_size"], recorded=ran, adapter=adapter_check(out / name / "adapter"))
            log = (out / f"{name}.log").read_text(errors="replace")
            row["notes"] = [ln for ln in log.splitlines() if ln.startswith("grpoctl: ") and "GPUs" in ln]
        else:
            row["log_tail"] = log_tail(out, name)
        rows.append(row)
        print(json.dumps(row), flush=True)

    export = None
    done = [r["name"] for r in rows if r.get("steps_per_s") and r["name"] != "one"]
    pick = None if args.no_export else next((n for n in ("fsdp", "zero3", "zero2", "ddp") if n in done), None)
    left = args.deadline_s - (time.monotonic() - t0)
    if pick and left > 45:
        xcmd = [sys.executable, "-m", "grpoctl", "export", str(out / pick), "--gguf", "f16,q8_0", "-o",
                str(out / f"export-{pick}")]
        export = run_logged(f"export-{pick}", xcmd, out, left - 10, env=env)
        export["log_tail"] = log_tail(out, f"export-{pick}", 3500)
        print(export["log_tail"], flush=True)
    elif pick:
        export = {"name": f"export-{pick}", "rc": "skipped", "why": f"{left:.0f} s left"}

    ref = next((r for r in rows if r["name"] == "one" and r.get("steps_per_s")), None)
    print(f"\n{'run':<7}{'procs':>6}{'steps/s':>9}{'x one':>7}{'compl/s':>9}{'x one':>7}"
          f"{'peak MiB per GPU (nvidia-smi)':>32}{'rank0 alloc':>12}{'reward last':>12}  adapter")
    for r in rows:
        if not r.get("steps_per_s"):
            print(f"{r['name']:<7}FAILED rc={r['rc']} {r.get('why', '')}")
            continue
        def x(k: str, r: dict = r) -> str:
            return f"{r[k] / ref[k]:.2f}" if ref else "-"

        peaks = ", ".join(f"{i}:{m}" for i, m in sorted(r["gpu"]["peak_mib"].items())) or "-"
        a = r["adapter"]
        print(f"{r['name']:<7}{r['world_size']:>6}{r['steps_per_s']:>9.3f}{x('steps_per_s'):>7}"
              f"{r['completions_per_s']:>9.2f}{x('completions_per_s'):>7}{peaks:>32}"
              f"{r['rank0_max_allocated_mib']!s:>12}{r['mean_reward_last']:>12.3f}  "
              f"{a['tensors']} tensors, rank 32: {a['rank32_2d']}, |B|max {a['lora_b_abs_max']:.3g}")
    if export:
        print(f"export of the {pick} run: rc={export['rc']}")
    write_json(out / "gpu_multi.json", {"env": env_info, "shape": args.shape, "steps": args.steps,
                                        "completion_tokens": args.completion, "generations": GENERATIONS,
                                        "per_device_batch": PER_DEVICE, "runs": rows, "export": export,
                                        "wall_s": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
