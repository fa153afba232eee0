"""Parity through a running vLLM server: its prompt log-probabilities on export's probes, against PEFT.

The reference is export's (:func:`grpoctl.export.parity.reference.prepare_reference`): the base in transformers
with the adapter applied by PEFT, unmerged, in float32 - an implementation independent of the served one. vLLM returns,
for every prompt position, the log-probabilities of its ``k`` most likely tokens (``prompt_logprobs``; the prompt
is sent as token ids, so no tokenizer stands between the two). From them:

- top-1: how often vLLM's most likely next token is the reference's;
- KL over the top-k: KL(reference || vLLM) over vLLM's top-k tokens with every other token pooled into one
  outcome. Pooling outcomes never raises a KL, so this is a lower bound of the full KL; a server that drops the
  adapter or mangles the weights still moves the top tokens' mass and shows.

The gate follows the same run's noise: the reference in bf16 against itself in float32 (a full KL, so at least
its own pooled value); vLLM serves in 16-bit, so a faithful server stays within a few times that noise.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.errors import ServeError
from grpoctl.exportlayout import LORA_DIR, tokenizer_dirs
from grpoctl.models import has_tokenizer
from grpoctl.serve.llamacpp import _urlopen

TOP_K = 20  # vLLM's default --max-logprobs
# vLLM in bf16 vs the float32 reference is itself a bf16 rounding of the same model, by other kernels: a
# faithful server measures within a small multiple of the reference's own bf16-vs-float32 KL.
NOISE_MULTIPLE = 4.0
# the KL gate's lower end, for a reference whose bf16 rounding moves nothing measurable (tiny or float-exact models)
MIN_KL_FLOOR = 1e-4


@dataclass
class ServedParity:
    mode: str
    model: str
    top1: float
    kl_topk: float
    positions: int
    kl_floor: float
    passed: bool
    top_k: int = TOP_K

    def row(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (f"{'vLLM ' + self.mode + ' (' + self.model + ')':44} {self.top1 * 100:6.1f}% {self.kl_topk:9.5f} "
                f"{'<=' + format(self.kl_floor, '.2g'):>14}  {verdict}")


def prompt_logprobs(base_url: str, model: str, ids: list[int], k: int = TOP_K, timeout: float = 300.0
                    ) -> list[dict[int, float] | None]:
    """vLLM's ``prompt_logprobs`` for the token ids ``ids``: per position, token id -> log-probability."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _urlopen(req, timeout=timeout) as r:
            resp = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ServeError(f"prompt_logprobs request to {base_url} failed: HTTP {e.code}: "
                         f"{e.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServeError(f"prompt_logprobs request to {base_url} failed: {getattr(e, 'reason', e)}") from None
    rows = ((resp.get("choices") or [{}])[0]).get("prompt_logprobs")
    if not isinstance(rows, list) or len(rows) != len(ids):
        raise ServeError(f"the server at {base_url} returned no prompt_logprobs for {len(ids)} tokens "
                         "(a vLLM OpenAI server answers them)")
    out: list[dict[int, float] | None] = []
    for row in rows:
        out.append(None if row is None else {int(t): float(v["logprob"] if isinstance(v, dict) else v)
                                             for t, v in row.items()})
    return out


def pooled_kl(ref_row: Any, served: dict[int, float]) -> float:
    """KL(ref || served) over the served top-k tokens plus one outcome for every other token."""
    kl = 0.0
    p_in = q_in = 0.0
    for tok, q_log in served.items():
        p_log = float(ref_row[tok])
        p = math.exp(p_log)
        p_in += p
        q_in += math.exp(q_log)
        kl += p * (p_log - q_log)
    p_rest, q_rest = max(0.0, 1.0 - p_in), max(1e-12, 1.0 - q_in)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(0.0, kl)


def compare_served(ref32: list[Any], served: list[list[dict[int, float] | None]]) -> tuple[float, float, int]:
    """(top-1 agreement, mean pooled KL, positions). Row ``i`` of a reference predicts token ``i + 1``, which is
    where vLLM reports it; the last reference row has no prompt position and is left out."""
    agree = n = 0
    kl = 0.0
    for ref, rows in zip(ref32, served, strict=True):
        for i in range(ref.shape[0] - 1):
            row = rows[i + 1]
            if not row:
                continue
            top = max(row, key=row.get)
            agree += int(top == int(ref[i].argmax()))
            kl += pooled_kl(ref[i], row)
            n += 1
    if n == 0:
        raise ServeError("vLLM returned no prompt log-probabilities to compare")
    return agree / n, kl / n, n


def measure_served(base_url: str, model: str, mode: str, ref: Any) -> ServedParity:
    """``ref``: export's :class:`grpoctl.export.parity.reference.ParityReference` for the same base, adapter and
    tokenizer."""
    served = [prompt_logprobs(base_url, model, p.ids) for p in ref.probes]
    top1, kl, n = compare_served(ref.ref32, served)
    floor = max(NOISE_MULTIPLE * float(ref.noise["kl"]), MIN_KL_FLOOR)
    return ServedParity(mode=mode, model=model, top1=round(top1, 5), kl_topk=round(kl, 6), positions=n,
                        kl_floor=round(floor, 6), passed=kl <= floor)


def reference_for(target: Any) -> Any:
    """Export's PEFT reference for the model ``target`` (a :class:`grpoctl.serve.vllm.VllmTarget`) serves."""
    from grpoctl.export.parity.reference import prepare_reference

    art = target.artifacts
    base = art.provenance.base_model
    if base is None or not base.path:
        raise ServeError(f"{target.export_dir} records no local base model; parity needs the base the adapter "
                         "was trained on")
    lora = target.export_dir / LORA_DIR
    adapter = lora if (lora / "adapter_config.json").is_file() else (
        Path(art.provenance.adapter.path) if art.provenance.adapter is not None else None)
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        raise ServeError(f"{target.export_dir}: the adapter this export was made from is not on disk; parity "
                         "needs it for the reference")
    tokenizer = next((d for d in tokenizer_dirs(target.export_dir, adapter, Path(base.path)) if has_tokenizer(d)),
                     Path(base.path))
    eot = _eot_ids(tokenizer)
    ref = prepare_reference(Path(base.path), adapter, tokenizer, target.system_prompt, eot)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the reference's model is gone; vLLM sizes its cache from what is free
    return ref


def _eot_ids(tokenizer_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def write_served(path: Path, results: list[ServedParity], ref: Any) -> Path:
    from dataclasses import asdict

    from grpoctl.fsutil import staged_file

    data = {"reference": ref.description, "noise_floor": {"kl": ref.noise["kl"], "top1": ref.noise["top1"]},
            "probes": len(ref.probes), "served": [asdict(r) for r in results]}
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
