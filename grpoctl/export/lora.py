"""A PEFT LoRA adapter read tensor by tensor, and the one per-tensor merge every export uses.

``LoraAdapter.open(path)`` indexes the adapter file. ``adapter.plan(shapes, config)`` fits it to a base
(tensor shapes from the safetensors headers, the base's config.json) and refuses, by name and before any
work, what cannot be merged faithfully. ``plan.merged(key, weight)`` is the merged value of one tensor.
The streaming 16-bit merge (``merge.py``) and the fused GGUF conversion (``convert_worker.py``) both call
it, so there is one merge, and no merged copy of the model is ever held whole.

Every case computes what PEFT's ``merge_and_unload`` computes for that tensor, rounding included
(``peft/tuners/lora/layer.py`` and ``variants.py``), so the outputs equal PEFT's merged model:

- LoRA on a linear layer: ``W + s * B @ A``, the update in float32, rounded once to W's dtype;
  ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``rank_pattern``/``alpha_pattern`` matched as
  PEFT matches them; ``fan_in_fan_out`` (GPT-2 Conv1D) transposes the update.
- LoRA on an embedding (``lora_embedding_A/B``): ``W + s * (B @ A).T``; PEFT rounds the update to W's
  dtype before adding it, and so does this.
- DoRA: ``W + update`` rescaled to the learnt magnitude, per output row (linear) or per embedding
  dimension (embedding), with the norm taken before rescaling, as PEFT's merge does.
- ``lora_bias``: ``b + s * lora_B.bias``.
- ``modules_to_save`` and the base layers PEFT saves beside an embedding LoRA (``base_layer.weight``):
  the adapter's tensor replaces the base's.
- Tied embeddings (the base has no ``lm_head.weight`` and reuses the input embedding): when the adapter
  saves one side whole, PEFT's merge unties them (``tie_word_embeddings`` false, both written), and so does
  this; a LoRA update on a tied side cannot be merged faithfully (PEFT adds it to the shared weight, so the
  other side changes too) and is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import InputNotFoundError, UsageError, VerificationError
from grpoctl.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

HEAD_KEY = "lm_head.weight"
# input embeddings by the names transformers models give them (PEFT's EMBEDDING_LAYER_NAMES and friends)
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "tok_embeddings.weight")
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                  r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?|base_layer\.weight|base_layer\.bias)$")
# LoraConfig switches whose layers are not W + update, or which need more than the adapter file: refused
REFUSED_CONFIG = {
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# init_lora_weights methods that train against a modified base (the base minus the initial update) until
# the adapter is re-saved with path_initial_model_for_weight_conversion, which resets this field to true
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclass
class LoraModule:
    """One adapted module: base weight name, tensor keys in the adapter file, rank and scale."""

    base_key: str  # e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    r: int
    scale: float
    magnitude_key: str | None = None  # DoRA: the learnt magnitude vector
    bias_key: str | None = None  # lora_bias: lora_B's bias, added to the base layer's bias
    embedding: bool = False  # lora_embedding_A/B: A is (r, vocab), B is (dim, r), the update is (B @ A).T

    @property
    def name(self) -> str:
        return self.base_key.removesuffix(".weight")

    @property
    def labels(self) -> tuple[str, str]:
        return ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A", "lora_B")


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by base weight name
    saved_modules: dict[str, str] = field(default_factory=dict)  # base key -> adapter key of a tensor saved whole
    refused: list[str] = field(default_factory=list)  # why this adapter cannot be merged, one reason per item

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
        adapter._check_config()
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

    def transposed(self, module: LoraModule) -> bool:
        """Whether ``B @ A`` is the transpose of the base weight's layout (embeddings, Conv1D layers)."""
        return module.embedding or self.fan_in_fan_out

    def keys(self) -> list[str]:
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return list(f.keys())

    def _check_config(self) -> None:
        cfg = self.config
        self.refused += [f"{what} is not a plain LoRA update" for key, what in REFUSED_CONFIG.items() if cfg.get(key)]
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            self.refused.append(f"init_lora_weights={init!r} trains against a modified base (the base minus the "
                                "initial update); re-save the adapter with PEFT's save_pretrained(..., "
                                "path_initial_model_for_weight_conversion=...) so that it applies to the original base")
        elif isinstance(init, str) and init.lower() == "mica":
            self.refused.append("init_lora_weights='mica' is a LoRA variant whose merge grpoctl does not implement")
        if cfg.get("use_dora") and cfg.get("fan_in_fan_out"):
            self.refused.append("DoRA on fan_in_fan_out (GPT-2 style Conv1D) layers is not merged here")
        if cfg.get("use_dora") and cfg.get("lora_bias"):
            self.refused.append("DoRA together with lora_bias is not merged here")

    def _scale_for(self, module: str) -> tuple[int, float]:
        """Rank and scaling of ``module`` as PEFT sets them: the first rank_pattern/alpha_pattern key that
        matches the end of the module name (``peft.utils.other.get_pattern_key``), then rsLoRA or not."""
        r, alpha = self.r, self.alpha
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                r = int(value)
                break
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return r, scale

    def _index(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self.keys():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _KEY.match(name)
            if m is not None and m["part"].startswith("base_layer."):
                # PEFT saves the base layer of an adapted embedding (its vocabulary may have been resized):
                # loading the adapter puts it in place of the base's tensor
                self.saved_modules[f"{m['module']}.{m['part'].split('.')[1]}"] = key
            elif m is not None:
                parts.setdefault(m["module"], {})[m["part"].removesuffix(".weight")] = key
            elif "trainable_tokens" in name:
                self.refused.append(f"{key}: trainable tokens (trainable_token_indices) are not a plain LoRA update")
            elif "lora_" in name or ".modules_to_save." in name or ".original_module." in name:
                self.refused.append(f"{key} is a tensor of a LoRA variant grpoctl does not merge")
            else:
                # modules_to_save (and PEFT's bias="all"/"lora_only" biases) are stored whole under the base name
                self.saved_modules[name] = key
        for module, found in sorted(parts.items()):
            embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if a_name not in found or b_name not in found:
                missing = b_name if a_name in found else a_name
                raise UsageError(f"adapter {self.path} is incomplete: {module} has no {missing}")
            if embedding and ("lora_A" in found or "lora_B" in found or "lora_B.bias" in found):
                raise UsageError(f"adapter {self.path} mixes embedding and linear LoRA tensors for {module}")
            r, scale = self._scale_for(module)
            self.modules[f"{module}.weight"] = LoraModule(
                base_key=f"{module}.weight", a_key=found[a_name], b_key=found[b_name], r=r, scale=scale,
                magnitude_key=found.get("lora_magnitude_vector"), bias_key=found.get("lora_B.bias"),
                embedding=embedding)

    def load_pair(self, module: LoraModule):
        """``(A, B)`` of one module as float32 tensors, read lazily from the adapter file."""
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return f.get_tensor(module.a_key).float(), f.get_tensor(module.b_key).float()

    def load_tensor(self, key: str):
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return f.get_tensor(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor in the adapter file, from its header."""
        from safetensors import safe_open

        with safe_open(self.weights_file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def plan(self, shapes: Mapping[str, Sequence[int]], config: Mapping[str, Any] | None = None) -> MergePlan:
        """Fit this adapter to a base whose tensors have ``shapes`` and whose config.json is ``config``.

        Raises ``VerificationError`` naming what cannot be merged faithfully; nothing is computed yet.
        """
        if self.refused:
            more = f" (and {len(self.refused) - 1} more)" if len(self.refused) > 1 else ""
            raise VerificationError(f"adapter {self.path} cannot be merged: {self.refused[0]}{more}; merging "
                                    "it would not give the trained model")
        config = dict(config or {})
        shapes = {k: tuple(v) for k, v in shapes.items()}
        sources = {k: k for k in [*self.modules, *self.saved_modules]}
        sources.update({f"{m.name}.bias": f"{m.name}.bias" for m in self.modules.values() if m.bias_key})
        changes = self._plan_tied(shapes, config, sources)
        self._check_fit(shapes, sources)
        return MergePlan(adapter=self, sources=sources, config_changes=changes)

    def _plan_tied(self, shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
                   sources: dict[str, str]) -> dict[str, Any]:
        """What a base that ties lm_head to its input embedding needs: nothing, untying, or a refusal."""
        embeds = [k for k in shapes if k.endswith(EMBEDDING_SUFFIXES)]
        head_absent = HEAD_KEY not in shapes
        tied = head_absent or config.get("tie_word_embeddings") is True
        if not tied or not (HEAD_KEY in sources or any(k in sources for k in embeds)):
            return {}
        if len(embeds) != 1:
            raise VerificationError(f"the adapter changes lm_head or the input embedding, and the base ties them, "
                                    f"but grpoctl cannot tell which tensor is the input embedding ({len(embeds)} "
                                    "candidates); merge it with PEFT's merge_and_unload instead")
        embed = embeds[0]
        for key in (embed, HEAD_KEY):
            if key in self.modules:
                other = HEAD_KEY if key == embed else embed
                raise VerificationError(
                    f"adapter trains {key.removesuffix('.weight')} with LoRA, but the base ties it to "
                    f"{other.removesuffix('.weight')} (tie_word_embeddings): merging adds the update to the shared "
                    "weight, so the other side would change too and the merged model would differ from the trained "
                    "one (PEFT's merge_and_unload does exactly that). Train with the embeddings untied, or save the "
                    "layer whole with modules_to_save")
        saved = [k for k in (embed, HEAD_KEY) if k in self.saved_modules]
        if len(saved) == 2 and self.config.get("ensure_weight_tying"):
            # PEFT trained one tensor for both sides and keeps them tied after the merge
            import torch

            embed_t, head_t = (self.load_tensor(self.saved_modules[k]) for k in (embed, HEAD_KEY))
            if not torch.equal(embed_t, head_t):
                raise VerificationError("adapter was trained with ensure_weight_tying, but its saved embedding and "
                                        "lm_head differ; it cannot be merged into tied embeddings faithfully")
            if head_absent:
                sources.pop(HEAD_KEY)
            return {}
        # one side (or both, separately) saved whole: the sides differ now, as in PEFT's merged model
        if head_absent:
            sources[HEAD_KEY] = embed
        return {"tie_word_embeddings": False}

    def _check_fit(self, shapes: dict[str, tuple[int, ...]], sources: dict[str, str]) -> None:
        have = self.shapes()
        for key in sorted(sources, key=natural_order):
            source = sources[key]
            module = self.modules.get(key)
            bias_of = self.modules.get(key.removesuffix(".bias") + ".weight") if key.endswith(".bias") else None
            if bias_of is not None and bias_of.bias_key is None:
                bias_of = None
            if source not in shapes:
                what = (f"{bias_of.name} has a lora_B bias (lora_bias), but the base layer has no bias"
                        if bias_of is not None and f"{bias_of.name}.weight" in shapes
                        else f"{key.removesuffix('.weight')} is not a module of the base model")
                raise VerificationError(f"adapter does not fit the base: {what} (check --base)")
            base = shapes[source]
            saved = self.saved_modules.get(key)
            if saved is not None and have[saved] != base:
                hint = " (a resized vocabulary? resize the base's embeddings the same way)" \
                    if key == HEAD_KEY or key.endswith(EMBEDDING_SUFFIXES) else " (check --base)"
                raise VerificationError(f"adapter does not fit the base: the adapter's {key} is {have[saved]}, "
                                        f"the base's is {base}{hint}")
            if module is not None:
                a, b = have[module.a_key], have[module.b_key]
                rows, cols = (base[1], base[0]) if len(base) == 2 and self.transposed(module) else (base + (0, 0))[:2]
                if len(a) != 2 or len(b) != 2 or len(base) != 2 or a[0] != b[1] or b[0] != rows or a[1] != cols:
                    la, lb = module.labels
                    raise VerificationError(
                        f"adapter does not fit the base: {module.name} has {la} {a} and {lb} {b}, base weight is "
                        f"{base} (was the adapter trained on another model? check --base)")
                if module.magnitude_key is not None and math.prod(have[module.magnitude_key]) != rows:
                    raise VerificationError(f"adapter does not fit the base: {module.name}'s DoRA magnitude has "
                                            f"{math.prod(have[module.magnitude_key])} values, expected {rows}")
            if bias_of is not None and have[bias_of.bias_key] != base:
                raise VerificationError(f"adapter does not fit the base: {key}'s lora_B bias is "
                                        f"{have[bias_of.bias_key]}, the base's bias is {base}")


@dataclass
class MergePlan:
    """An adapter fitted to one base: which tensors change, and the per-tensor merge."""

    adapter: LoraAdapter
    sources: dict[str, str]  # every output tensor the adapter changes or adds -> base tensor it starts from
    config_changes: dict[str, Any]  # config.json keys the merged model needs (tie_word_embeddings)

    @property
    def added(self) -> dict[str, str]:
        """Output tensors the base does not have (an untied lm_head) -> the base tensor they start from."""
        return {k: s for k, s in self.sources.items() if k != s}

    def touches(self, key: str) -> bool:
        return key in self.sources

    def merged(self, key: str, weight):
        """The merged value of output tensor ``key`` in ``weight``'s dtype; ``weight`` is the base's value of
        ``sources[key]`` (``key`` itself, except for an untied lm_head, which starts from the embedding)."""
        if key not in self.sources:
            return weight
        adapter = self.adapter
        saved = adapter.saved_modules.get(key)
        if saved is not None:
            weight = _fit(adapter.load_tensor(saved), weight, key).to(weight.dtype)
        module = adapter.modules.get(key)
        if module is not None:
            return _apply_lora(adapter, module, weight)
        owner = adapter.modules.get(key.removesuffix(".bias") + ".weight") if key.endswith(".bias") else None
        if owner is not None and owner.bias_key is not None:
            # PEFT: bias += lora_B.bias * scaling, in float32, rounded once
            extra = adapter.load_tensor(owner.bias_key).float() * owner.scale
            return _fit(extra, weight, key).add_(weight).to(weight.dtype)
        return weight


def _fit(tensor, weight, key: str):
    if tuple(tensor.shape) != tuple(weight.shape):
        raise UsageError(f"adapter does not fit the base: {key} is {tuple(tensor.shape)} in the adapter, "
                         f"{tuple(weight.shape)} in the base")
    return tensor


def _apply_lora(adapter: LoraAdapter, module: LoraModule, weight):
    """``weight`` with ``module``'s update merged, exactly as PEFT's Linear/Embedding.merge computes it."""
    import torch

    a, b = adapter.load_pair(module)
    delta = (b @ a).mul_(module.scale)  # float32, as PEFT's get_delta_weight on CPU
    if adapter.transposed(module):
        delta = delta.T
    _fit(delta, weight, module.base_key)
    if module.magnitude_key is None:
        if module.embedding:
            # PEFT's Embedding.merge rounds the update to the weight's dtype before adding it
            return weight + delta.to(weight.dtype)
        return delta.add_(weight).to(weight.dtype)  # W + update in float32, rounded once
    # DoRA (Liu et al. 2024): W + update rescaled to the learnt magnitude, the norm taken per output row of
    # a linear layer, per embedding dimension of an embedding
    magnitude = adapter.load_tensor(module.magnitude_key).float()
    if module.embedding:
        # the operands laid out as PEFT's DoraEmbeddingLayer has them: the norm's float32 sum runs in the
        # same order, so it rounds the same
        factor = (magnitude / torch.linalg.norm(weight.T + delta.T, dim=1)).view(1, -1)
        return (factor * (weight + delta)).to(weight.dtype)
    summed = delta.add_(weight)
    factor = (magnitude / torch.linalg.norm(summed, dim=1)).view(-1, 1)
    return (factor * summed).to(weight.dtype)


def natural_order(name: str) -> tuple:
    """Sort key that puts layers.2 before layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
