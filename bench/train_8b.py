"""The tutorial's size on a GPU: grpoctl's unsloth backend vs the same recipe written by hand, and grpoctl's
trl backend, on a random model with the real Qwen3-8B config (151,936-token vocabulary).

    python bench/train_8b.py OUTDIR [--steps 6] [--completion 128] [--tokenizer DIR] [--deadline-s 570]
                             [--rounds 1,2,3]

Needs two GPUs: runs go in pairs, one per GPU at the same time, and the pairs swap GPUs and order:
    round 1  GPU0 grpoctl unsloth   GPU1 by hand
    round 2  GPU0 by hand           GPU1 grpoctl unsloth
    round 3  GPU0 grpoctl trl       GPU1 grpoctl unsloth without gradient checkpointing
Every run starts cold: its own empty HOME, TMPDIR and working directory, so Unsloth's generated modules
(./unsloth_compiled_cache), TorchInductor's cache ($TMPDIR/torchinductor_$USER), Triton's kernels and
Unsloth's compile bundle (under $HOME) are built from nothing, as on a user's first run; what each run left
there is listed. Unsloth runs: 4-bit base, LoRA r32 on the seven projections, gradient checkpointing
"unsloth", 4 x ``--completion``-token completions per step, HF generation (no vLLM). Timing comes from
``steptimer.tick``, a zero reward both sides carry: steady s/step is the median spacing of steps 2..N, the
first step is the trainer's wall time minus (N-1) steady steps. Peak memory: torch's max allocated in the
training process, and nvidia-smi's per GPU. Before the rounds, two processes of the unsloth backend (DDP)
train a tiny Qwen3 for 2 steps, and the strategies unsloth does not support are refused.

CPU rehearsal of the same script (no unsloth: its runs become trl, the hand script uses transformers + PEFT):
    python bench/train_8b.py /tmp/t8 --cpu --shape tiny --steps 3 --completion 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    stop,
    versions,
    write_json,
)
from steptimer import step_times  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROUNDS = [("grpoctl_unsloth", "by_hand"), ("by_hand", "grpoctl_unsloth"), ("grpoctl_trl", "grpoctl_unsloth_nogc")]


def grpoctl_cmd(kind: str, model: Path, out: Path, steps: int, completion: int) -> list[str]:
    cmd = [sys.executable, "-m", "grpoctl", "train", "-m", str(model), "-o", str(out), "--max-steps", str(steps),
           "--set", f"trainer.max_completion_length={completion}", "--set", "trainer.save_steps=1000",
           "--set", "data.max_samples=200", "--set", "model.fast_inference=false",
           "--set", 'rewards.functions=["format_exact","format_approx","answer","numbers","language",'
                    '"steptimer:tick"]']
    if kind == "grpoctl_trl":
        return cmd + ["--backend", "trl"]
    gc = "false" if kind.endswith("nogc") else "true"
    return cmd + ["--backend", "unsloth", "--set", "model.load_in_4bit=true",
                  "--set", f"lora.gradient_checkpointing={gc}"]


def cold_env(run_dir: Path, gpu: int, ticks: Path) -> dict[str, str]:
    home, tmp = run_dir / "home", run_dir / "tmp"
    for d in (home, tmp, run_dir / "cwd"):
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                                                            "UNSLOTH_COMPILE_LOCATION")}
    env.update(HOME=str(home), TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES=str(gpu), BENCH_TICKS=str(ticks),
               PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    return env


def du_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.exists() else 0.0


def caches(run_dir: Path) -> dict[str, float]:
    """MiB each compile cache holds after the run (it started empty)."""
    found = {}
    for label, path in (("cwd/unsloth_compiled_cache", run_dir / "cwd" / "unsloth_compiled_cache"),
                        ("home", run_dir / "home"), ("tmp", run_dir / "tmp")):
        found[label] = du_mib(path)
    for sub in sorted((run_dir / "tmp").glob("*")) + sorted((run_dir / "home").glob(".*/*")):
        found[str(sub.relative_to(run_dir))] = du_mib(sub)
    return found


def collect(kind: str, row: dict, run_dir: Path, steps: int) -> dict:
    out = run_dir / "run"
    if kind.startswith("grpoctl"):
        summary = out / "summary.json"
        if not summary.is_file():
            return row
        s = json.loads(summary.read_text())
        wall, peak = s["wall_time_s"], s["peak_gpu_memory_mb"]
        lengths = [json.loads(x).get("completion_length") for x in (out / "metrics.jsonl").read_text().splitlines()]
        lengths = [x for x in lengths if x is not None]
        mean_len = sum(lengths) / len(lengths) if lengths else None
        row["backend"] = json.loads((out / "run.json").read_text())["backend"]
    else:
        summary = out / "summary.json"
        if not summary.is_file():
            return row
        s = json.loads(summary.read_text())
        wall, peak, mean_len = s["train_wall_s"], s["peak_gpu_memory_mb"], s["mean_completion_length"]
    t = step_times(str(run_dir / "ticks.txt"), wall, steps)
    row.update(t, train_wall_s=wall, peak_allocated_mib=peak, mean_completion_tokens=mean_len)
    if t["steady_s_per_step"] and mean_len:
        row["generated_tokens_per_s"] = round(4 * mean_len / t["steady_s_per_step"], 1)
    row["caches_mib"] = caches(run_dir)
    return row


def launch(kind: str, model: Path, work: Path, gpu: int, steps: int, completion: int, label: str, cpu: bool):
    run_dir = work / label
    shutil.rmtree(run_dir, ignore_errors=True)
    env = cold_env(run_dir, gpu, run_dir / "ticks.txt")
    if kind == "by_hand":
        cmd = [sys.executable, str(HERE / "train_8b_by_hand.py"), "--model", str(model), "--out",
               str(run_dir / "run"), "--steps", str(steps), "--completion", str(completion)]
        cmd += ["--engine", "peft"] if cpu else []
    else:
        cmd = grpoctl_cmd("grpoctl_trl" if cpu else kind, model, run_dir / "run", steps, completion)
    log = open(work / f"{label}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir / "cwd",
                            start_new_session=True)
    return {"kind": kind, "label": label, "gpu": gpu, "proc": proc, "log": log, "start": start, "dir": run_dir,
            "command": " ".join(cmd)}


def unsloth_on_two_gpus(work: Path, tokenizer: Path, timeout: float) -> list[dict]:
    """DDP with the unsloth backend (supported) and the sharding strategies (refused before launch)."""
    tiny = build_qwen3_in_child(work / "models" / "tiny", "tiny", tokenizer, "cuda")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = [sys.executable, "-m", "grpoctl", "train", "-m", str(tiny), "--backend", "unsloth", "--num-processes", "2",
            "--max-steps", "2", "--set", "trainer.max_completion_length=32", "--set", "model.fast_inference=false",
            "--set", "data.max_samples=50"]
    rows = [run_logged("unsloth_ddp", [*base, "-o", str(work / "unsloth_ddp"), "--strategy", "ddp"], work, timeout,
                       env=env)]
    summary = work / "unsloth_ddp" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rows[0].update(world_size=s["world_size"], steps=s["steps"], backend=json.loads(
            (work / "unsloth_ddp" / "run.json").read_text())["backend"])
    else:
        rows[0]["log_tail"] = log_tail(work, "unsloth_ddp")
    for strategy in ("fsdp", "zero3"):
        row = run_logged(f"unsloth_{strategy}", [*base, "-o", str(work / f"unsloth_{strategy}"), "--strategy",
                                                   strategy], work, 120, env=env)
        row["message"] = log_tail(work, f"unsloth_{strategy}", 400).strip().splitlines()[-1:]
        rows.append(row)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--deadline-s", type=float, default=570.0)
    ap.add_argument("--round-timeout-s", type=float, default=200.0)
    ap.add_argument("--cpu", action="store_true", help="rehearse on a CPU (see above)")
    ap.add_argument("--rounds", default="1,2,3", help="which rounds to run (the two-GPU check goes with round 1)")
    args = ap.parse_args()
    t0 = time.monotonic()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    info = versions()
    print(json.dumps(info), flush=True)
    tokenizer = args.tokenizer or default_tokenizer()
    # the 8B build (GPU0) and the two-process unsloth check overlap; the check is not timed
    device = "cpu" if args.cpu else "cuda"
    build = subprocess.Popen([sys.executable, "-c",
                              f"import sys; sys.path.insert(0, {str(HERE)!r}); from gpulib import build_qwen3; "
                              f"from pathlib import Path; build_qwen3(Path({str(work / 'models' / args.shape)!r}), "
                              f"{args.shape!r}, {str(tokenizer)!r}, {device!r})"],
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    rounds = [int(n) for n in args.rounds.split(",")]
    multi = [] if args.cpu or 1 not in rounds else unsloth_on_two_gpus(work, tokenizer, 150)
    if build.wait() != 0:
        raise SystemExit("building the model failed")
    model = work / "models" / args.shape
    print(f"model {args.shape} ready at {time.monotonic() - t0:.0f} s", flush=True)

    rows: list[dict] = []
    for n, pair in enumerate(ROUNDS, 1):
        if n not in rounds:
            continue
        left = args.deadline_s - (time.monotonic() - t0)
        if left < 120:
            rows += [{"kind": k, "label": f"r{n}_{k}", "rc": "skipped", "why": f"{left:.0f} s left"} for k in pair]
            continue
        with GpuSampler() as sampler:
            running = [launch(k, model, work, gpu, args.steps, args.completion, f"r{n}_{k}", args.cpu)
                       for gpu, k in enumerate(pair)]
            for r in running:
                try:
                    rc = r["proc"].wait(timeout=max(1.0, min(args.round_timeout_s, left - 20)
                                                    - (time.perf_counter() - r["start"])))
                except subprocess.TimeoutExpired:
                    stop(r["proc"])
                    rc = "timeout"
                r["rc"], r["process_wall_s"] = rc, round(time.perf_counter() - r["start"], 1)
                r["log"].close()
        for r in running:
            row = {"round": n, "kind": r["kind"], "label": r["label"], "gpu": r["gpu"], "rc": r["rc"],
                   "process_wall_s": r["process_wall_s"], "command": r["command"],
                   "gpu_peak_mib": sampler.summary()["peak_mib"].get(r["gpu"])}
            row = collect(r["kind"], row, r["dir"], args.steps)
            if "steady_s_per_step" not in row:
                row["log_tail"] = log_tail(work, r["label"])
            rows.append(row)
            print(json.dumps(row), flush=True)

    def mean(kind: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["kind"] == kind and r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    print(f"\n{'run':<28}{'first step s':>13}{'steady s/step':>14}{'gen tok/s':>10}{'peak alloc MiB':>15}"
          f"{'nvidia-smi MiB':>15}{'process s':>10}")
    for r in rows:
        if r.get("steady_s_per_step") is None:
            print(f"{r['label']:<28}FAILED rc={r.get('rc')} {r.get('why', '')}")
            continue
        print(f"{r['label']:<28}{r['first_step_s']:>13.1f}{r['steady_s_per_step']:>14.2f}"
              f"{r.get('generated_tokens_per_s', 0):>10.1f}{r['peak_allocated_mib']!s:>15}{r['gpu_peak_mib']!s:>15}"
              f"{r['process_wall_s']:>10.1f}")
    ratios = {}
    for kind in ("grpoctl_unsloth", "grpoctl_trl", "grpoctl_unsloth_nogc"):
        ratios[kind] = {}
        for key in ("first_step_s", "steady_s_per_step", "generated_tokens_per_s", "peak_allocated_mib",
                    "process_wall_s"):
            a, b = mean(kind, key), mean("by_hand", key)
            ratios[kind][key] = round(a / b, 3) if a and b else None
    print("\nratios against the hand-written script (mean over its runs; cold vs cold):")
    for kind, r in ratios.items():
        print(f"  {kind:<22} " + "  ".join(f"{k} {v}x" for k, v in r.items()))
    write_json(work / "train_8b.json", {"env": info, "shape": args.shape, "steps": args.steps,
                                        "completion_tokens": args.completion, "unsloth_two_gpus": multi,
                                        "runs": rows, "ratios_vs_by_hand": ratios,
                                        "wall_s": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
