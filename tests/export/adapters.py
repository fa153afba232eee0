"""Trained-looking PEFT adapters for export tests: made by PEFT on a fixture, then moved off their initial values.

``VARIANTS`` names every adapter shape the merge supports, each with the fixture base it is made on; the
merge, lora and GGUF tests all run over it, so a variant added here is checked on every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (fixture base: tiny llama, its tied-embeddings twin, qwen2 (q/k/v biases) or qwen3; LoraConfig arguments)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("llama", {}),
    "rslora": ("llama", {"use_rslora": True}),
    # overlapping alpha keys: PEFT takes the first that matches, so layer 1's down_proj gets 64, not 8
    "rank_alpha_pattern": ("qwen3", {"rank_pattern": {"q_proj": 4, "layers.1.self_attn.(k|v)_proj": 2},
                                     "alpha_pattern": {"down_proj": 64, "layers.1.mlp.down_proj": 8}}),
    "dora": ("llama", {"use_dora": True}),
    "modules_to_save_lm_head": ("llama", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    "modules_to_save_embed": ("llama", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}),
    # LoRA on the embedding and the head: PEFT also saves both base layers whole beside the pairs
    "lora_embedding": ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]}),
    "dora_embedding": ("llama", {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True}),
    "lora_bias": ("qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True}),
    # a base whose lm_head is its input embedding: saving one side whole unties them (as PEFT's merge does)
    "tied_modules_to_save_lm_head": ("llama-tied", {"target_modules": ["q_proj", "v_proj"],
                                                    "modules_to_save": ["lm_head"]}),
    "tied_modules_to_save_embed": ("llama-tied", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}),
    # ensure_weight_tying: one trained tensor for both sides, still tied after the merge
    "tied_ensure_weight_tying": ("llama-tied", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"],
                                                "ensure_weight_tying": True}),
}


def make_adapter(base: Path, out: Path, *, r: int = 8, alpha: int = 16, seed: int = 0, zero_b: str | None = "none",
                 save_tokenizer: bool = False, std: float = 0.05, saved_std: float = 0.01,
                 **lora_kwargs: Any) -> Path:
    """Save a PEFT LoRA for ``base`` to ``out``. ``zero_b``: ``none`` (every B random), ``all`` (fresh, as
    PEFT initialises it) or a substring naming the modules whose B stays zero. ``std``: spread of the trained
    LoRA values; ``saved_std``: of the change to modules saved whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_kwargs.pop("target_modules", TARGETS),
                        lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)

    def stays_zero(name: str) -> bool:
        return zero_b == "all" or (zero_b not in (None, "none") and zero_b in name)

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            # PEFT starts lora_B (and an embedding's lora_embedding_A) at zero: training moves them
            if ("lora_B" in name or "lora_embedding_A" in name) and not stays_zero(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * saved_std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    peft_model.save_pretrained(out)
    if save_tokenizer:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return Path(out)


def peft_merged_state(base: Path, adapter: Path) -> dict[str, Any]:
    """The reference: PEFT's own ``merge_and_unload`` on the bf16 base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_merged_folder(base: Path, adapter: Path, out: Path) -> Path:
    """The route users take by hand: PEFT ``merge_and_unload`` + ``save_pretrained``, the base's tokenizer files
    copied beside (copied, not re-saved, so llama.cpp's converter reads the very same tokenizer)."""
    import shutil
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied embeddings: the variants are chosen on purpose
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for f in Path(base).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")):
            shutil.copy2(f, Path(out) / f.name)
    return Path(out)
