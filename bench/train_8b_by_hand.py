"""The tutorial's GRPO recipe written directly against Unsloth and TRL, as a user would without grpoctl.

    python bench/train_8b_by_hand.py --model DIR --out DIR [--steps 6] [--completion 128] [--gc unsloth|false]

Same numbers as grpoctl's defaults (which follow the tutorial): 4-bit base, LoRA r 32 / alpha 64 on the
seven projections, seed 3407, lr 5e-6, weight decay 0.01, warmup 0.1, linear schedule, 8-bit AdamW,
4 generations of one prompt per step, temperature 1.0, min_p 0.1, KL weight 0.04, prompts above the 0.9
length quantile dropped; the completion length is fixed by ``--completion`` for timing. The data is the
shipped arithmetic set with grpoctl's system prompt; the rewards are this script's own (format, answer,
number, language) plus ``steptimer.tick``. Writes OUT/summary.json: trainer wall time, steps, peak GPU
memory, mean completion length. ``--engine peft`` swaps Unsloth for transformers + PEFT (CPU rehearsal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "grpoctl" / "data" / "arith_gsm.jsonl"
SYSTEM = ("You are given a problem.\nThink about the problem and provide your working out.\n"
          "You must think in Indonesian.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
START, END = "<think>", "</think>"


def rewards() -> list:
    import langid

    shape = re.compile(rf"^\s*{re.escape(START)}.+?{re.escape(END)}\s*(.+)$", re.DOTALL)

    def text(c):
        return c[0]["content"]

    def exact_format(completions, **kw):
        return [3.0 if shape.match(text(c)) else 0.0 for c in completions]

    def rough_format(completions, **kw):
        return [sum(0.5 if text(c).count(m) == 1 else -0.5 for m in (START, END)) for c in completions]

    def right_answer(completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer, strict=True):
            m = shape.match(text(c))
            out.append(5.0 if m and m.group(1).strip() == a else (-2.0 if m else 0.0))
        return out

    def right_number(completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer, strict=True):
            nums = re.findall(r"-?\d+(?:\.\d+)?", text(c).split(END)[-1])
            out.append(3.5 if nums and nums[0] == a else -1.0)
        return out

    def indonesian(completions, **kw):
        return [1.0 if langid.classify(text(c))[0] == "id" else -1.0 for c in completions]

    sys.path.insert(0, str(HERE))
    from steptimer import tick

    return [exact_format, rough_format, right_answer, right_number, indonesian, tick]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--gc", default="unsloth", choices=["unsloth", "false"])
    ap.add_argument("--engine", default="unsloth", choices=["unsloth", "peft"])
    args = ap.parse_args()
    started = time.time()
    if args.engine == "unsloth":
        from unsloth import FastLanguageModel  # before trl/transformers, so its patches apply

    import numpy as np
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    max_seq_length, rank = 1024, 32
    if args.engine == "unsloth":
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=args.model, max_seq_length=max_seq_length, load_in_4bit=True, fast_inference=False,
            max_lora_rank=rank, gpu_memory_utilization=0.7)
        model = FastLanguageModel.get_peft_model(
            model, r=rank, target_modules=TARGETS, lora_alpha=rank * 2,
            use_gradient_checkpointing="unsloth" if args.gc == "unsloth" else False, random_state=3407)
        optim = "adamw_8bit"
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        torch.manual_seed(3407)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                               LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=TARGETS, task_type="CAUSAL_LM"))
        optim = "adamw_torch"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": r["question"]}],
                               "answer": r["answer"].split("####")[-1].strip()} for r in rows][:200])
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True))
               for p in data["prompt"]]
    cutoff = int(np.quantile(lengths, 0.9))
    data = data.select(np.where(np.array(lengths) <= cutoff)[0])

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in names else {"warmup_steps": 0.1}
    on_gpu = torch.cuda.is_available()
    config = GRPOConfig(
        temperature=1.0, min_p=0.1, top_p=1.0, learning_rate=5e-6, weight_decay=0.01, lr_scheduler_type="linear",
        optim=optim, logging_steps=1,
        per_device_train_batch_size=4,  # TRL counts completions: one prompt x 4 generations
        gradient_accumulation_steps=1, num_generations=4, max_completion_length=args.completion,
        max_steps=args.steps, save_steps=1000, report_to="none", output_dir=str(args.out / "outputs"),
        beta=0.04, seed=3407, bf16=on_gpu, use_cpu=not on_gpu, **warmup)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=rewards(), args=config,
                          train_dataset=data)
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    summary = {"steps": trainer.state.global_step, "train_wall_s": round(wall, 2),
               "setup_s": round(t0 - started, 1),
               "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None,
               "mean_completion_length": sum(lengths) / len(lengths) if lengths else None,
               "prompts_kept": len(data), "length_cutoff": cutoff}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
