"""A PEFT LoRA adapter read tensor by tensor, and the per-module merge ``W + scale * B @ A``.

Shared by the streaming safetensors merge and the fused GGUF conversion: both ask for one base
weight at a time and get the merged weight back, so no merged copy of the model is ever held whole.
``LoraAdapter.merged(base_key, weight)`` is the one call that covers every case (plain LoRA, rsLoRA and
rank/alpha patterns, DoRA, modules_to_save); ``delta``/``merge_weight`` cover plain LoRA modules only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import InputNotFoundError, UsageError
from grpoctl.fsutil import sha256_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PREFIX = "base_model.model."


def adapter_sha256(adapter_dir: Path) -> str:
    """An adapter's identity: the sha256 of its ``adapter_model.safetensors``. Export records it in
    ``artifacts.json`` (``provenance.adapter.sha256``); serve and push compare the run's adapter with it."""
    return sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS, progress=True)


@dataclass
class LoraModule:
    """One adapted module: base weight name, tensor keys in the adapter file, rank and scale."""

    base_key: str  # e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    r: int
    scale: float
    magnitude_key: str | None = None  # DoRA: per-output-row magnitude vector


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by base weight name
    other_keys: list[str] = field(default_factory=list)  # tensors that are not lora_A/lora_B
    saved_modules: dict[str, str] = field(default_factory=dict)  # modules_to_save: base key -> adapter key
    unsupported: list[str] = field(default_factory=list)  # tensors no merge here knows how to apply

    @classmethod
    def open(cls, path: Path) -> LoraAdapter:
        path = Path(path)
        cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not cfg_file.is_file():
            raise InputNotFoundError(f"{path} holds no adapter ({ADAPTER_CONFIG} missing); expected a PEFT LoRA "
                                     "folder such as RUN/adapter written by `grpoctl train`")
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise UsageError(f"{path} has only a pickle adapter_model.bin; re-save it as safetensors "
                                 "(or pass --allow-pickle)")
            raise InputNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        config = json.loads(cfg_file.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise UsageError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
        adapter = cls(path=path, config=config)
        adapter._index()
        return adapter

    @property
    def weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.r))

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    def keys(self) -> list[str]:
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return list(f.keys())

    def _scale_for(self, module: str) -> tuple[int, float]:
        """Rank and scaling of ``module``, honouring rank_pattern/alpha_pattern and rsLoRA."""
        r, alpha = self.r, self.alpha
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.search(rf"(^|\.){pattern}$", module):
                r = int(value)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = float(value)
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return r, scale

    def _index(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        magnitudes: dict[str, str] = {}
        for key in self.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                self.other_keys.append(key)
                if key.endswith(".lora_magnitude_vector") or key.endswith(".lora_magnitude_vector.weight"):
                    module = key.split(".lora_magnitude_vector")[0]
                    magnitudes[module[len(_PREFIX):] if module.startswith(_PREFIX) else module] = key
                elif "lora_" in key or ".modules_to_save." in key or ".original_module." in key:
                    # lora_embedding_A/B, lora_B.bias, trainable-token deltas: not a plain low-rank pair
                    self.unsupported.append(key)
                else:
                    # modules_to_save are stored whole under the base module's own name
                    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
                    self.saved_modules[name] = key
                continue
            pairs.setdefault(m["module"], {})[m["ab"]] = key
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise UsageError(f"adapter {self.path} is incomplete: {module} has no {missing}")
            name = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            r, scale = self._scale_for(name)
            base_key = f"{name}.weight"
            self.modules[base_key] = LoraModule(base_key=base_key, a_key=ab["A"], b_key=ab["B"], r=r, scale=scale,
                                                magnitude_key=magnitudes.pop(name, None))
        if magnitudes:
            self.unsupported.extend(magnitudes.values())

    def load_pair(self, module: LoraModule):
        """``(A, B)`` of one module as float32 tensors, read lazily from the adapter file."""
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return f.get_tensor(module.a_key).float(), f.get_tensor(module.b_key).float()

    def load_tensor(self, key: str):
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return f.get_tensor(key)

    def delta(self, base_key: str):
        """``scale * B @ A`` for the module whose base weight is ``base_key``, or None if not adapted.

        A DoRA module is not a plain sum (its rows are rescaled by the magnitude vector); use ``merged``.
        """
        module = self.modules.get(base_key)
        if module is None:
            return None
        if module.magnitude_key is not None:
            raise UsageError(f"{base_key} is a DoRA module; its merge is not W + delta (use LoraAdapter.merged)")
        a, b = self.load_pair(module)
        d = (b @ a) * module.scale
        return d.T if self.fan_in_fan_out else d


    def touches(self, base_key: str) -> bool:
        return base_key in self.modules or base_key in self.saved_modules

    def merged(self, base_key: str, weight):
        """The merged weight for ``base_key`` in ``weight``'s dtype: the LoRA sum, the DoRA-rescaled sum,
        the module saved whole (``modules_to_save``), or ``weight`` itself when the adapter leaves it alone."""
        if base_key in self.saved_modules:
            saved = self.load_tensor(self.saved_modules[base_key])
            if tuple(saved.shape) != tuple(weight.shape):
                raise UsageError(f"adapter does not fit the base: saved module {base_key} is {tuple(saved.shape)}, "
                                 f"base weight is {tuple(weight.shape)}")
            return saved.to(weight.dtype)
        module = self.modules.get(base_key)
        if module is None:
            return weight
        a, b = self.load_pair(module)
        if module.magnitude_key is None:
            import torch

            if self.fan_in_fan_out:
                a, b = b.T, a.T  # W is stored transposed: W + s * (B @ A).T = W + s * A.T @ B.T
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise UsageError(f"adapter does not fit the base: delta {(b.shape[0], a.shape[1])} vs weight "
                                 f"{tuple(weight.shape)} for {base_key}")
            # one fused float32 pass (W + s * B @ A), rounded once to the base dtype
            return torch.addmm(weight.float(), b, a, alpha=module.scale).to(weight.dtype)
        delta = (b @ a) * module.scale
        if self.fan_in_fan_out:
            raise UsageError("DoRA with fan_in_fan_out (GPT-2 style Conv1D) is not supported; merge it with PEFT")
        if tuple(delta.shape) != tuple(weight.shape):
            raise UsageError(f"adapter does not fit the base: delta {tuple(delta.shape)} vs weight "
                             f"{tuple(weight.shape)} for {base_key}")
        # DoRA (Liu et al. 2024): every output row of W + delta is rescaled to the learnt magnitude
        summed = weight.float() + delta
        magnitude = self.load_tensor(module.magnitude_key).float().reshape(-1, 1)
        norm = torch_linalg_row_norm(summed)
        return (summed * (magnitude / norm)).to(weight.dtype)


def torch_linalg_row_norm(weight):
    import torch

    return torch.linalg.norm(weight, dim=1, keepdim=True)


def merge_weight(weight, delta):
    """Merged weight in the base tensor's dtype; the sum is formed in float32 so bf16 rounds once."""
    if delta is None:
        return weight
    if tuple(delta.shape) != tuple(weight.shape):
        raise UsageError(f"adapter does not fit the base: delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}")
    return (weight.float() + delta).to(weight.dtype)
