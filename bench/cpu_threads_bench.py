"""CPU threading under contention: what one GRPO step's work costs with torch's default threads, with
OpenMP told to sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``), and with one thread.

The work is a demo step on the embedded SmolLM2-135M with the demo's LoRA (r 32, seven projections):
generate 32 tokens for 4 completions of a ~60-token prompt, then one forward + backward over them. Each
setting runs in a fresh process (OpenMP reads its environment once, when torch loads), the settings take
turns round after round, and the load average is printed beside each so a shared machine's noise shows.
Ratios are against the default setting measured in the same rounds.

    python bench/cpu_threads_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1-thread": {"OMP_NUM_THREADS": "1"},
}

WORK = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from grpoctl.config import SEVEN_PROJECTIONS
from grpoctl.models import embedded_model_dir
path = embedded_model_dir()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=SEVEN_PROJECTIONS))
msgs = [{"role": "system", "content": "You are given a problem. Think about the problem and provide your working out."},
        {"role": "user", "content": "A baker fills 3 trays with 12 muffins each and sells 20. How many are left?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
batch = ids.repeat(4, 1)
torch.manual_seed(0)
t0 = time.perf_counter()
with torch.no_grad():
    out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=32, min_new_tokens=32,
                         do_sample=True, pad_token_id=tok.eos_token_id)
t1 = time.perf_counter()
loss = model(out, labels=out).loss
loss.backward()
t2 = time.perf_counter()
print(json.dumps({"generate_s": t1 - t0, "update_s": t2 - t1, "threads": torch.get_num_threads()}))
"""


def run_once(name: str, repo: Path) -> dict:
    env = {**os.environ, **SETTINGS[name]}
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        if key not in SETTINGS[name]:
            env.pop(key, None)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", WORK, str(repo)], env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "step_s": result["generate_s"] + result["update_s"], "load1": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cpus} CPUs available to this process")
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name in SETTINGS:
            m = run_once(name, repo)
            runs[name].append(m)
            print(f"round {r + 1} {name:<9} threads {m['threads']}  generate {m['generate_s']:6.1f} s  "
                  f"update {m['update_s']:6.1f} s  step {m['step_s']:6.1f} s  (load average {m['load1']:.1f})",
                  flush=True)
    ref = statistics.median(m["step_s"] for m in runs["default"])
    print(f"\nmedian step, ratio to the default ({ref:.1f} s):")
    for name, ms in runs.items():
        med = statistics.median(m["step_s"] for m in ms)
        print(f"  {name:<9} {med:6.1f} s  {med / ref:5.2f}x")


if __name__ == "__main__":
    main()
