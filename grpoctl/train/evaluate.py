"""``grpoctl eval``: the seed's with/without-LoRA comparison on sampled prompts, as numbers and JSON.

One model is loaded; the base side is the same weights with the adapter switched off
(``PeftModel.disable_adapter``), so both sides see the same prompts, sampling settings and seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpoctl.argtypes import check_fields
from grpoctl.config import ColumnOptions
from grpoctl.errors import InputNotFoundError, UsageError
from grpoctl.fsutil import staged_file
from grpoctl.options import option
from grpoctl.rundir import EVAL_FILE, RunDir

# Without a GPU a completion costs one forward pass per token; the run's own budget (often ~900 tokens:
# what max_seq_length leaves after the prompt) would make 2 x 20 samples take most of an hour.
CPU_MAX_NEW_TOKENS = 256


@dataclasses.dataclass
class EvalOptions(ColumnOptions):
    """What ``grpoctl eval`` takes besides the run (each field is the flag of the same name); the column flags
    override the run's column mapping, e.g. for another ``dataset``."""

    samples: int = option(20, short="-n", help="Prompts to sample.")
    max_new_tokens: int | None = option(help="Completion length (default: the run's max_completion_length, at most "
                                        f"{CPU_MAX_NEW_TOKENS} without a GPU).")
    seed: int = option(3407, help="Sampling and selection seed.")
    dataset: str | None = option(short="-d", help="Evaluate on this dataset instead of the run's own.")

    def __post_init__(self) -> None:
        check_fields(self)


def _load(run: RunDir) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise InputNotFoundError(f"{run.adapter_dir} holds no adapter; finish or resume the training first")
    base = run.base_model
    if not Path(base.path).is_dir():
        raise InputNotFoundError(f"base model folder {base.path} recorded in run.json is gone; "
                                 "restore it or retrain")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    tokenizer.padding_side = "left"  # decoder-only batch generation continues from the right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    if cuda:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def completion_budget(run: RunDir, requested: int | None, cuda: bool) -> tuple[int, str | None]:
    """``--max-new-tokens``, else the run's completion budget (capped at ``CPU_MAX_NEW_TOKENS`` without a GPU);
    the second value says why when it is not what the run trained with."""
    if requested is not None:
        if requested < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        return requested, None
    trained = int(run.section("trainer").get("max_completion_length") or CPU_MAX_NEW_TOKENS)
    if cuda or trained <= CPU_MAX_NEW_TOKENS:
        return trained, None
    return CPU_MAX_NEW_TOKENS, (f"the run's completion budget of {trained} tokens, capped at {CPU_MAX_NEW_TOKENS} "
                                f"without a GPU; --max-new-tokens {trained} uses all of it")


def _generate(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], sampling: dict[str, float],
              max_new_tokens: int, seed: int, batch_size: int, label: str) -> tuple[list[str], list[list[int]]]:
    import torch
    from tqdm.auto import tqdm

    from grpoctl.train.callbacks import TokenProgress

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: list[str] = []
    out_ids: list[list[int]] = []
    torch.manual_seed(seed)
    gen_kwargs: dict[str, Any] = {"do_sample": True, "max_new_tokens": max_new_tokens,
                                  "pad_token_id": tokenizer.pad_token_id}
    gen_kwargs.update({k: v for k, v in sampling.items() if k in ("temperature", "top_p", "min_p") and v is not None})
    if sampling.get("top_k"):
        gen_kwargs["top_k"] = int(sampling["top_k"])
    batches = range(0, len(texts), batch_size)
    # one bar per pass over every token position it may generate, so its ETA covers the whole pass
    with tqdm(total=len(batches) * max_new_tokens, desc=label, unit="tok", dynamic_ncols=True) as bar:
        streamer = TokenProgress(bar, max_new_tokens)
        for i in batches:
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                ids = model.generate(**enc, **gen_kwargs, streamer=streamer)
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            out_ids.extend([[t for t in row if t != tokenizer.pad_token_id] for row in new.tolist()])
    return out, out_ids


def _score(generated: tuple[list[str], list[list[int]]], prompts: list, columns: dict[str, list], funcs: list,
           language: str, end_marker: str) -> dict[str, Any]:
    from grpoctl.train.rewards import answer_part, detect_language, extract_number, parse_number

    completions, completion_ids = generated
    answers = columns["answer"]
    msgs = [[{"role": "assistant", "content": c}] for c in completions]
    # the same keywords TRL passes during training, so plugins score eval samples too
    rewards = {f.__name__: sum(f(prompts=prompts, completions=msgs, completion_ids=completion_ids, **columns))
               / len(msgs) for f in funcs}
    langs = [detect_language(c) for c in completions]
    correct = 0
    for c, a in zip(completions, answers, strict=True):
        part = answer_part(c, end_marker)
        guess = extract_number(part if part is not None else c)
        truth = parse_number(a)
        correct += guess is not None and truth is not None and guess == truth
    n = len(completions)
    return {
        "target_language_share": sum(lang == language for lang in langs) / n,
        "languages": {lang: langs.count(lang) for lang in sorted(set(langs))},
        "accuracy": correct / n,
        "rewards": rewards,
        "total_reward": sum(rewards.values()),
        "mean_completion_chars": sum(len(c) for c in completions) / n,
    }


def evaluate(run: RunDir | Path, samples: int = 20, max_new_tokens: int | None = None, seed: int = 3407,
             dataset: str | None = None, batch_size: int = 8, columns: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sample ``samples`` prompts, generate with and without the LoRA, score both, write ``RUN/eval.json``.

    ``columns`` overrides the run's column mapping (``prompt_field``, ``solution_field``, ``answer_field``,
    ``extract_hash_answer``), e.g. for another ``dataset``; ``log`` receives progress lines.
    """
    import torch

    from grpoctl.train.data import load_source, map_rows
    from grpoctl.train.rewards import RewardContext, build_rewards

    say = log or (lambda _line: None)
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    dcfg = dataclasses.replace(run.data_config(), **(columns or {}))
    max_new_tokens, budget_note = completion_budget(run, max_new_tokens, torch.cuda.is_available())
    ds = map_rows(load_source(dataset or dcfg.dataset, dcfg.subset, dcfg.split), dcfg)
    ds = ds.shuffle(seed=seed).select(range(min(samples, len(ds))))
    prompts, answers = list(ds["prompt"]), list(ds["answer"])
    columns = {k: list(ds[k]) for k in ds.column_names if k != "prompt"}
    markers = run.reasoning_markers or (dcfg.reasoning_start, dcfg.reasoning_end)
    language = run.section("rewards").get("language", "id")
    ctx = RewardContext(markers[0], markers[1], run.prefilled_start, language)
    funcs, _ = build_rewards(run.section("rewards").get("functions", []), {}, ctx)

    say(f"grpoctl: eval: {len(prompts)} prompts, max_new_tokens {max_new_tokens}"
        f"{f' ({budget_note})' if budget_note else ''}; two passes: with the LoRA, then without it")
    model, tokenizer = _load(run)
    sampling = run.sampling
    with_lora = _generate(model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size,
                          "eval 1/2 with LoRA")
    with model.disable_adapter():
        without_lora = _generate(model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size,
                                 "eval 2/2 without LoRA")

    result = {
        "samples": len(prompts),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_note": budget_note,
        "sampling": sampling,
        "language": language,
        "with_lora": _score(with_lora, prompts, columns, funcs, language, markers[1]),
        "without_lora": _score(without_lora, prompts, columns, funcs, language, markers[1]),
        "examples": [{"question": p[-1]["content"], "answer": a, "with_lora": w, "without_lora": b}
                     for p, a, w, b in list(zip(prompts, answers, with_lora[0], without_lora[0], strict=True))[:5]],
    }
    with staged_file(run.root / EVAL_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """Terminal table: one row per measure, base vs LoRA and the difference."""
    w, b = result["with_lora"], result["without_lora"]
    rows = [(f"answers in '{result['language']}'", b["target_language_share"], w["target_language_share"], "%"),
            ("answer accuracy", b["accuracy"], w["accuracy"], "%")]
    rows += [(f"reward {name}", b["rewards"][name], w["rewards"][name], "") for name in w["rewards"]]
    rows.append(("total reward", b["total_reward"], w["total_reward"], ""))
    lines = [f"{result['samples']} samples, max_new_tokens {result['max_new_tokens']}, seed {result['seed']}",
             f"{'measure':<28}{'without LoRA':>14}{'with LoRA':>12}{'change':>10}"]
    for name, before, after, unit in rows:
        if unit == "%":
            lines.append(f"{name:<28}{before:>13.0%} {after:>11.0%} {after - before:>+9.0%}")
        else:
            lines.append(f"{name:<28}{before:>14.3f}{after:>12.3f}{after - before:>+10.3f}")
    return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def format_examples(result: dict[str, Any], limit: int = 300) -> str:
    """The sample answers eval.json keeps, with and without the LoRA, each cut to ``limit`` characters."""
    examples = result.get("examples") or []
    if not examples:
        return ""
    lines = [f"{len(examples)} sample answers (eval.json has them whole)"]
    for i, ex in enumerate(examples, 1):
        lines.append(f"[{i}] question:     {_clip(str(ex.get('question', '')), limit)}")
        lines.append(f"    expected:     {ex.get('answer', '')}")
        for key, label in (("with_lora", "with LoRA:   "), ("without_lora", "without LoRA:")):
            body = _clip(str(ex.get(key, "")), limit).splitlines() or [""]
            lines.append(f"    {label} {body[0]}")
            lines += [f"    {'':<13} {line}" for line in body[1:]]
    return "\n".join(lines)
