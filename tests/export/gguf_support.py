"""Helpers for the GGUF tests: a trained-looking PEFT adapter, GGUF tensor/metadata readers."""

from __future__ import annotations

from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, out: Path, r: int = 4, alpha: int = 8, std: float = 0.05, seed: int = 1) -> Path:
    """A PEFT LoRA on every projection with non-zero B (as after training), saved like `grpoctl train` does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=std)
    peft.save_pretrained(out)
    return out


def read_gguf(path: Path):
    """(metadata dict of scalars/strings, {tensor name: (type name, raw bytes)}) via the installed gguf reader."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        meta[key] = field.contents()
    tensors = {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in reader.tensors}
    return meta, tensors
