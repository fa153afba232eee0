"""How close a GGUF is, and how close it must be: the metrics on log-probabilities and the floors.

Top-1 next-token agreement and KL(reference || file) over every probe position, and each file type's floor.
The floors are starting points that give way to the rounding noise the same run measures
(:func:`following_noise`): how often a model's argmax flips under rounding is the model's own property (near
ties, a trained head, a big vocabulary), not its file type's. A floor the user gives is kept as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from grpoctl.errors import UsageError

ENV_FLOORS = "GRPOCTL_PARITY_FLOORS"


@dataclass(frozen=True)
class Floor:
    top1: float  # minimum top-1 agreement (fraction)
    kl: float | None = None  # maximum mean KL divergence
    # True: a starting point that gives way to the noise this run measures (``following_noise``); False: exactly
    # as given (a floor the user set)
    follows_noise: bool = False


def _default(top1: float, kl: float) -> Floor:
    return Floor(top1, kl, follows_noise=True)


# Starting points measured on SmolLM2-135M-Instruct (issue figures): f16 100%, q8_0 97.1% / KL 0.004,
# q5_k_m 89.8% / 0.071, q4_k_m 88.9% / 0.059; bf16 vs f32 97.4% / 0.001. Each one is lowered where the model
# being exported shows more rounding noise than SmolLM2 (``following_noise``).
DEFAULT_FLOORS: dict[str, Floor] = {
    # bf16 keeps 8 mantissa bits, so rounding the merged weights alone flips near-tie argmaxes (the reference in
    # bf16 agrees with itself in float32 on 97.4% of positions); its KL floor is what catches a wrong file
    "f32": _default(0.995, 0.005), "f16": _default(0.995, 0.005), "bf16": _default(0.97, 0.005),
    "q8_0": _default(0.95, 0.02), "q6_k": _default(0.90, 0.08),
    "q5_k_m": _default(0.85, 0.15), "q5_k_s": _default(0.85, 0.15), "q5_0": _default(0.85, 0.15),
    "q5_1": _default(0.85, 0.15), "q4_k_m": _default(0.85, 0.15), "q4_k_s": _default(0.80, 0.20),
    "q4_0": _default(0.80, 0.20), "q4_1": _default(0.80, 0.20), "iq4_nl": _default(0.80, 0.20),
    "iq4_xs": _default(0.80, 0.20),
}

FALLBACK_FLOOR = _default(0.60, 0.50)  # 3-bit and below: only catches a broken file


# Top-1 agreement only means something where the model has a clear favourite. A model whose mean top-1
# probability on the probes is below this (random weights, a broken base) flips its argmax on rounding
# noise alone, so for it only the KL floor is gated; the report says so.
MIN_CONFIDENCE = 0.2


# How far a file's argmax flips may exceed what rounding noise of the file's own KL causes in this model, and
# how far its KL may exceed what bf16 rounding alone costs this model, before the default floors give way.
NOISE_FLIP_MARGIN = 2.0

NOISE_KL_MARGIN = 3.0


def following_noise(floor: Floor, noise: dict[str, float], kl: float) -> tuple[Floor, str]:
    """The floor a file of mean KL ``kl`` is held to, and where it comes from (``default``, ``noise`` or ``given``).

    A model's argmax flips where its top two tokens nearly tie; how many positions do depends on the model
    (vocabulary size, a trained head, how flat its distributions are), not on the file type. The run measures
    it: the reference rounded to bf16 flips ``1 - noise top-1`` of the probe positions at a mean KL of
    ``noise kl``. A perturbation's logit error grows with the square root of its KL, and so does the share of
    near ties it crosses, so a faithful file of mean KL ``kl`` is expected to flip
    ``(1 - noise top-1) * sqrt(max(kl, noise kl) / noise kl)`` of them: the top-1 floor is the default, or
    ``NOISE_FLIP_MARGIN`` times that many flips below 100% where that is lower. The KL floor is the default,
    or ``NOISE_KL_MARGIN`` times the bf16 noise where that is higher. A floor the user gave is kept as given.
    A wrong file still fails: its KL is far above its type's floor, or its argmax flips far more often than its
    KL explains (a head whose near-tie rows are swapped).
    """
    if not floor.follows_noise:
        return floor, "given"
    flips, noise_kl = 1.0 - noise["top1"], noise["kl"]
    scale = math.sqrt(max(kl, noise_kl) / noise_kl) if noise_kl > 0 else 1.0
    top1 = max(0.0, 1.0 - NOISE_FLIP_MARGIN * flips * scale)
    kl_floor = None if floor.kl is None else max(floor.kl, NOISE_KL_MARGIN * noise_kl)
    moved = top1 < floor.top1 or (kl_floor is not None and kl_floor > floor.kl)
    return Floor(min(floor.top1, top1), kl_floor, follows_noise=True), "noise" if moved else "default"


def parse_floors(text: str | None) -> dict[str, Floor]:
    """``"q4_k_m=0.9:0.1,q8_0=0.97"`` (top-1 fraction, optional max KL) merged over the defaults."""
    floors = dict(DEFAULT_FLOORS)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        try:
            name, value = item.split("=", 1)
            top1, _, kl = value.partition(":")
            floors[name.strip().lower()] = Floor(float(top1), float(kl) if kl else None)  # exactly as given
        except ValueError:
            raise UsageError(f"bad parity floor {item!r}; expected TYPE=TOP1[:KL], e.g. q4_k_m=0.85:0.15") from None
    return floors


def compare(ref: list[Any], test: list[Any]) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(ref || test), positions) pooled over every probe position."""
    agree = total = 0
    kl_sum = 0.0
    for r, t in zip(ref, test, strict=True):
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        kl_sum += float(position_kl(r, t).sum())
        total += r.shape[0]
    return agree / total, kl_sum / total, total


def position_kl(ref: Any, test: Any) -> Any:
    """KL(ref || test) at every position of one probe (log-probabilities in, one value per position out)."""
    return (ref.exp() * (ref - test)).sum(-1).clamp_min(0)


def kl_quantile(ref: list[Any], test: list[Any], q: float = 0.99) -> float:
    """The ``q`` quantile of the per-position KL over every probe: the tail that a mean hides."""
    import torch

    return float(torch.quantile(torch.cat([position_kl(r, t) for r, t in zip(ref, test, strict=True)]), q))
