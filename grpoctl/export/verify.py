"""Prove that a LoRA adapter fits its base and really trained, before anything is merged.

The common notebook check ``(t == 0).sum() / t.numel() != t.numel()`` compares a fraction with a count
and can never fail. Here every module is measured: is its ``lora_B`` all zero (PEFT initialises B to
zero, so an untrained adapter is exactly that), how large is B, and how large is the update
``scale * B @ A`` it adds to the base weight. An adapter whose every update is zero is rejected as
never trained; one with some zero modules passes with a warning, or fails under ``--strict``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.artifacts import VerifySection, VerifySummary
from grpoctl.errors import VerificationError
from grpoctl.export.lora import LoraAdapter, natural_order
from grpoctl.export.tensors import ModelWeights, corrupt
from grpoctl.jsonfiles import adapter_config, to_json
from grpoctl.models import built_from
from grpoctl.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_sha256

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class ModuleStats:
    module: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    rank: int
    scale: float
    b_zero: bool  # lora_B is exactly zero: the module never moved from its initialisation
    max_abs_b: float
    delta_norm: float  # Frobenius norm of scale * B @ A, the update added to the base weight
    dora: bool = False


@dataclass
class VerifyReport:
    adapter: str
    base: str
    adapter_sha256: str
    status: str = "ok"  # ok | warn
    strict: bool = False
    modules: list[ModuleStats] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts about the merge worth knowing, not problems

    @property
    def zero_modules(self) -> list[str]:
        return [m.module for m in self.modules if m.delta_norm == 0.0]

    @property
    def zero_b(self) -> int:
        return sum(m.b_zero for m in self.modules)

    def summary(self) -> VerifySummary:
        norms = [m.delta_norm for m in self.modules]
        return VerifySummary(modules=len(self.modules), zero_b=self.zero_b, zero_delta=len(self.zero_modules),
                             max_abs_b=max((m.max_abs_b for m in self.modules), default=0.0),
                             delta_norm_min=min(norms, default=0.0), delta_norm_max=max(norms, default=0.0))

    def section(self) -> VerifySection:
        """What ``artifacts.json`` records of this report (every module stays in ``verify.json``)."""
        return VerifySection(status=self.status, strict=self.strict, adapter=self.adapter, base=self.base,
                             adapter_sha256=self.adapter_sha256, summary=self.summary(), warnings=self.warnings,
                             notes=self.notes, saved_modules=self.saved_modules)

    def to_dict(self) -> dict[str, Any]:
        return {**to_json(self.section()), "modules": [asdict(m) for m in self.modules]}

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """Per module kind (q_proj, down_proj, ...): how many, how many untouched, and update sizes."""
        groups: dict[str, list[ModuleStats]] = defaultdict(list)
        for m in self.modules:
            groups[m.module.rsplit(".", 1)[-1]].append(m)
        head = f"{'module':<14}{'count':>6}{'zero B':>8}{'max |B|':>10}{'min |BA|':>11}{'max |BA|':>11}"
        lines = [f"adapter {self.adapter} on base {self.base}", head, "-" * len(head)]
        for kind, ms in groups.items():
            norms = [m.delta_norm for m in ms]
            lines.append(f"{kind:<14}{len(ms):>6}{sum(m.b_zero for m in ms):>8}"
                         f"{max(m.max_abs_b for m in ms):>10.4g}{min(norms):>11.4g}{max(norms):>11.4g}")
        s = self.summary()
        lines.append(f"{s.modules} modules, {s.zero_b} with all-zero lora_B"
                     + (f", saved whole: {', '.join(self.saved_modules)}" if self.saved_modules else ""))
        lines += [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.warnings]
        lines.append(f"verify: {self.status.upper()}")
        return "\n".join(lines)


def _targets_match(name: str, targets: Any) -> bool:
    """PEFT's rule: a string is a full regex match, a list matches the name or a dotted suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets or [])


def base_aliases(weights: ModelWeights, base_id: str | None) -> set[str]:
    """Every name under which the base may appear in an adapter_config (id, path, folder name, hub id)."""
    names = {str(weights.dir), str(weights.dir.resolve()), weights.dir.name}
    if base_id:
        names |= {base_id, Path(base_id).name}
    src = built_from(weights.dir)  # the embedded base records its Hub id and origin
    names |= {v for k, v in src.items() if k in ("source", "hub_id") and v}
    if src.get("hub_id"):
        names.add(src["hub_id"].split("/")[-1])
    cfg = weights.dir / "config.json"
    if cfg.is_file():
        name_or_path = json.loads(cfg.read_text()).get("_name_or_path")
        if name_or_path:
            names |= {name_or_path, Path(name_or_path).name}
    return {n for n in names if n}


def _pair_stats(adapter: LoraAdapter, f, module) -> ModuleStats:
    """Size of one module's update; shapes were checked when the adapter was fitted to the base."""
    import torch

    a = f.get_tensor(module.a_key).float()
    b = f.get_tensor(module.b_key).float()
    label_a, label_b = module.labels
    for label, t in ((label_a, a), (label_b, b)):
        if not bool(torch.isfinite(t).all()):
            raise VerificationError(f"adapter {adapter.path} has NaN/Inf in {module.name}.{label}; training "
                                    "diverged (lower the learning rate, or export an earlier checkpoint)")
    if a.shape[0] != module.r:
        raise VerificationError(f"{module.name} has rank {a.shape[0]} but adapter_config says r={module.r}")
    for key in (module.magnitude_key, module.bias_key):
        if key is not None and not bool(torch.isfinite(f.get_tensor(key).float()).all()):
            raise VerificationError(f"adapter {adapter.path} has NaN/Inf in {key}")
    # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products instead of the full out x in update
    gram = float(torch.trace((b.T @ b) @ (a @ a.T)))
    norm = abs(module.scale) * math.sqrt(max(gram, 0.0))
    return ModuleStats(module=module.name, rank=int(a.shape[0]), scale=module.scale, b_zero=not bool(b.any()),
                       max_abs_b=float(b.abs().max()) if b.numel() else 0.0, delta_norm=norm,
                       dora=module.magnitude_key is not None)


def verify_adapter(adapter: LoraAdapter, weights: ModelWeights, *, base_id: str | None = None,
                   strict: bool = False) -> VerifyReport:
    """Check ``adapter`` against the base in ``weights``; raise ``VerificationError`` on any failure.

    Returns the report (status ``ok`` or ``warn``) for printing and for ``verify.json``.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    report = VerifyReport(adapter=str(adapter.path), base=base_id or str(weights.dir),
                          adapter_sha256=adapter_sha256(adapter.path), strict=strict)
    if not adapter.modules:
        raise VerificationError(f"adapter {adapter.path} contains no lora_A/lora_B tensors")
    # what cannot be merged faithfully is refused here, by name, before any export work
    plan = adapter.plan({k: i.shape for k, i in weights.tensors.items()}, weights.config())

    named = adapter.base_model_name
    aliases = base_aliases(weights, base_id)
    if named and named not in aliases and Path(named).name not in aliases:
        report.warnings.append(f"adapter_config names base {named!r}, exporting onto {report.base!r}; "
                               "all shapes fit, so this is likely the same model under another name")

    base_modules = [k.removesuffix(".weight") for k, i in weights.tensors.items()
                    if k.endswith(".weight") and len(i.shape) == 2]
    targets = adapter.config.get("target_modules")
    restricted = adapter.config.get("layers_to_transform") or adapter.config.get("exclude_modules")
    if targets and targets != "all-linear":
        listed = [targets] if isinstance(targets, str) else list(targets)
        if isinstance(targets, list):
            absent = [t for t in listed if not any(_targets_match(m, [t]) for m in base_modules)]
            if absent:
                raise VerificationError(f"adapter_config targets {', '.join(absent)}, which the base "
                                        f"{report.base} does not have (adapter for another architecture?)")
        if not restricted:
            have = {k.removesuffix(".weight") for k in adapter.modules}
            expected = [m for m in base_modules if _targets_match(m, targets)]
            lacking = sorted(set(expected) - have, key=natural_order)
            if lacking:
                raise VerificationError(f"adapter {adapter.path} is incomplete: {lacking[0]} is a target module "
                                        f"but has no lora_A/lora_B ({len(lacking)} such modules)")

    try:
        with safe_open(adapter.weights_file, framework="pt") as f:
            for key in sorted(adapter.modules, key=natural_order):
                report.modules.append(_pair_stats(adapter, f, adapter.modules[key]))
            for key, akey in sorted(adapter.saved_modules.items()):
                if not bool(torch.isfinite(f.get_tensor(akey).float()).all()):
                    raise VerificationError(f"adapter {adapter.path} has NaN/Inf in saved module {key}")
                if plan.touches(key):  # a saved lm_head kept tied to a saved embedding is the same tensor
                    report.saved_modules.append(key)
            if plan.config_changes:
                report.notes.append("the adapter changes one side of the base's tied embeddings: the merged "
                                    "model unties them (tie_word_embeddings false, lm_head written), as PEFT's "
                                    "merge_and_unload does")
    except SafetensorError as err:
        raise corrupt(adapter.weights_file, err) from None

    zero = report.zero_modules
    if len(zero) == len(report.modules) and not report.saved_modules:
        raise VerificationError(
            f"adapter {adapter.path} was never trained: all {len(zero)} LoRA updates are zero (every lora_B "
            "is still at its zero initialisation); train it, or export a later checkpoint")
    if zero:
        shown = ", ".join(zero[:3]) + (", ..." if len(zero) > 3 else "")
        report.warnings.append(f"{len(zero)} of {len(report.modules)} modules have a zero update (untrained): "
                               f"{shown}")
    if report.warnings:
        report.status = "warn"
        if strict:
            raise VerificationError(f"verification failed under --strict: {report.warnings[0]}")
    return report


def open_adapter(path: Path, *, allow_pickle: bool = False, scratch: Path | None = None) -> LoraAdapter:
    """``LoraAdapter.open`` plus the pickle policy: ``adapter_model.bin`` is refused unless allowed, and
    then converted to safetensors in ``scratch`` (loaded with ``weights_only``, never executed)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        adapter_config(path)  # wrong-typed or non-object configs as one line, before anything reads them
    pickle_file = path / "adapter_model.bin"
    if not (path / ADAPTER_WEIGHTS).is_file() and pickle_file.is_file() and (path / ADAPTER_CONFIG).is_file():
        if not allow_pickle:
            raise VerificationError(f"{pickle_file} is a pickle checkpoint; loading it can run arbitrary code. "
                                    "Re-save the adapter as safetensors, or pass --allow-pickle if you trust it")
        if scratch is None:
            raise ValueError("scratch directory needed to convert a pickle adapter")
        import shutil

        import torch
        from safetensors.torch import save_file

        try:
            state = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for bad pickles
            raise corrupt(pickle_file, err) from None
        scratch.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, scratch / ADAPTER_WEIGHTS)
        shutil.copy2(path / ADAPTER_CONFIG, scratch / ADAPTER_CONFIG)
        path = scratch
    try:
        return LoraAdapter.open(path)
    except Exception as err:
        from safetensors import SafetensorError

        if isinstance(err, SafetensorError):
            raise corrupt(path / ADAPTER_WEIGHTS, err) from None
        raise
