"""One GGUF file against the reference: llama.cpp's figures on the probes, scored and held to the file's floor.

The result is the file's ``artifacts.ParityResult``, the record parity.json and artifacts.json keep.
"""

from __future__ import annotations

from pathlib import Path

from grpoctl.artifacts import ParityFloor, ParityResult
from grpoctl.export.parity.llamacpp import gguf_logprobs, greedy_gguf, open_gguf, tokenizer_checks
from grpoctl.export.parity.probes import GREEDY_TOKENS
from grpoctl.export.parity.reference import ParityReference
from grpoctl.export.parity.scoring import MIN_CONFIDENCE, Floor, compare, following_noise, kl_quantile


def measure(path: Path, type_name: str, ref: ParityReference, floor: Floor) -> ParityResult:
    """Parity of one GGUF file against the reference; ``passed`` applies the floor and the tokenizer checks."""
    n_ctx = max(256, max(len(p.ids) for p in ref.probes) + GREEDY_TOKENS + 8, len(ref.prompt_ids) + GREEDY_TOKENS + 8)
    llm = open_gguf(path, n_ctx)
    try:
        logprobs = gguf_logprobs(llm, ref.probes, path.name)
        top1, kl, n = compare(ref.ref32, logprobs)
        kl_p99 = kl_quantile(ref.ref32, logprobs)
        checks = tokenizer_checks(llm, path, ref.tokenizer, ref.system_prompt, ref.eot_ids)
        answer = greedy_gguf(llm, ref.prompt_ids)
    finally:
        llm.close()
    checks.pop("prompt_ids", None)
    floor, basis = following_noise(floor, ref.noise, kl)
    top1_gated = ref.confidence >= MIN_CONFIDENCE or floor.kl is None
    meets = (top1 >= floor.top1 or not top1_gated) and (floor.kl is None or kl <= floor.kl)
    return ParityResult(type=type_name, top1=round(top1, 5), kl=round(kl, 6), kl_p99=round(kl_p99, 6), positions=n,
                        floor=ParityFloor(top1=round(floor.top1, 5) if top1_gated else None,
                                          kl=None if floor.kl is None else round(floor.kl, 6), basis=basis),
                        passed=bool(meets and checks["ok"]), tokenizer=checks, answer=answer)
