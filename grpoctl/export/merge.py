"""Streaming 16-bit merge: base safetensors + LoRA -> merged safetensors, one tensor at a time.

For every base tensor, in shard order: read it, merge it (``MergePlan.merged`` in ``lora.py``, the one
per-tensor merge, equal to PEFT's ``merge_and_unload``), cast to the output dtype, write it, drop it. Output
shards mirror the base's shards and get Hugging Face's names and index, so peak memory is a few
tensors plus the adapter, whatever the model size. A tensor the base lacks (an lm_head the adapter unties
from the embedding) goes into the shard of the tensor it starts from. Config (with the plan's changes),
generation config, tokenizer and chat template are carried over so the folder loads in transformers and
vLLM as is.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.errors import DiskFullError, UsageError, VerificationError
from grpoctl.export.lora import LoraAdapter
from grpoctl.export.tensors import (
    DTYPES,
    FLOAT16,
    SAFE_INDEX,
    ModelWeights,
    TensorInfo,
    shard_names,
    write_safetensors,
)
from grpoctl.models import TOKENIZER_FILES, built_from, has_tokenizer

TEMPLATE_DIR = "additional_chat_templates"
CARRIED_FILES = ("generation_config.json", "LICENSE", "LICENSE.txt", "NOTICE")


@dataclass
class MergeResult:
    out_dir: Path
    dtype: str  # safetensors code of the merged float tensors
    files: list[Path] = field(default_factory=list)
    tensors: int = 0
    merged: int = 0  # tensors the adapter changed
    chat_template: bool = False


def output_dtype(weights: ModelWeights, requested: str = "auto") -> str:
    """``bf16``/``fp16`` as asked; ``auto`` keeps the base's 16-bit dtype (bf16 for a float32 base)."""
    if requested != "auto":
        if requested not in FLOAT16:
            raise UsageError(f"--dtype {requested} is not one of auto, bf16, fp16")
        return FLOAT16[requested]
    floats = [i.dtype for i in weights.tensors.values() if i.is_float]
    main = max(set(floats), key=floats.count) if floats else "BF16"
    return main if main in ("BF16", "F16") else "BF16"


def estimate_bytes(weights: ModelWeights, dtype: str) -> int:
    per = DTYPES[dtype][1]
    return sum(i.nbytes // DTYPES[i.dtype][1] * per if i.is_float else i.nbytes for i in weights.tensors.values())


def check_not_quantized(config: dict[str, Any], base_dir: Path) -> None:
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", "quantized")
        raise UsageError(f"base {base_dir} is a {method} checkpoint; merging into quantized weights loses the "
                         "adapter's precision. Point --base at the 16-bit model (then add --merged 4bit to "
                         "quantize the merged result once)")


def merge_16bit(base_dir: Path, adapter: LoraAdapter, out_dir: Path, *, dtype: str = "auto",
                tokenizer_dir: Path | None = None, allow_pickle: bool = False, progress: bool = True,
                weights: ModelWeights | None = None) -> MergeResult:
    """Merge ``adapter`` into the model at ``base_dir`` and write a loadable model folder to ``out_dir``.

    ``out_dir`` is written in place; callers stage it (``grpoctl.fsutil.staged_dir``) so an interrupted
    merge never looks finished. ``tokenizer_dir`` (the run's adapter folder, when it carries the
    tokenizer used in training) wins over the base's tokenizer files.
    """
    import torch

    threads = torch.get_num_threads()
    # The merge is elementwise and memory-bound: intra-op threads add little, and on a busy machine
    # their barriers stall every op (measured 17x slower with 2 threads on a loaded 2-core host). One
    # compute thread, with the writes and unchanged-tensor copies overlapped beside it, is the fast path.
    torch.set_num_threads(1)
    try:
        return _merge_16bit(base_dir, adapter, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir,
                            allow_pickle=allow_pickle, progress=progress, weights=weights)
    finally:
        torch.set_num_threads(threads)


def _merge_16bit(base_dir: Path, adapter: LoraAdapter, out_dir: Path, *, dtype: str, tokenizer_dir: Path | None,
                 allow_pickle: bool, progress: bool, weights: ModelWeights | None) -> MergeResult:
    from tqdm import tqdm

    weights = weights or ModelWeights(base_dir, allow_pickle=allow_pickle)
    config = weights.config()
    check_not_quantized(config, Path(base_dir))
    code = output_dtype(weights, dtype)
    plan = adapter.plan({k: i.shape for k, i in weights.tensors.items()}, config)
    added: dict[str, list[str]] = {}  # shard of the source tensor -> tensors the base lacks, written there
    for key, source in plan.added.items():
        added.setdefault(weights.tensors[source].shard, []).append(key)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = MergeResult(out_dir=out_dir, dtype=code)
    names = list(shard_names(len(weights.shards)))
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(weights.tensors) + len(plan.added), desc="merging", unit="tensor", disable=not progress,
               leave=False)

    def produce(spec: TensorInfo):
        result.tensors += 1
        if not plan.touches(spec.key):
            raw = weights.raw(spec.key)
            if raw is not None and weights.tensors[spec.key].dtype == spec.dtype:
                return raw  # unchanged bytes: copied in the kernel, never loaded
            return weights.get(spec.key)
        t = plan.merged(spec.key, weights.get(plan.sources[spec.key]))
        result.merged += 1
        if spec.dtype == "F16":
            import torch

            # fp16 tops out at 65504, so W + delta can overflow where bf16 cannot. A float32 sum is
            # NaN/Inf exactly when an element is (finite fp16 values cannot sum past 3e38).
            if not bool(torch.isfinite(t.to(torch.float16).sum(dtype=torch.float32))):
                raise VerificationError(f"merged weight {spec.key} overflows float16; export with --dtype bf16")
        return t

    try:
        for name, (shard, infos) in zip(names, weights.shards.items(), strict=True):
            specs = [TensorInfo(i.key, name, code if i.is_float else i.dtype, i.shape) for i in infos]
            for key in added.get(shard, []):
                src = weights.tensors[plan.sources[key]]
                specs.append(TensorInfo(key, name, code if src.is_float else src.dtype, src.shape))
            total += write_safetensors(out_dir / name, specs, produce, on_tensor=bar.update)
            weight_map.update({s.key: name for s in specs})
            result.files.append(out_dir / name)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while writing {out_dir} ({err.strerror}); free space "
                                "and run the export again (nothing was kept)") from None
        raise
    finally:
        bar.close()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        result.files.append(out_dir / SAFE_INDEX)

    config = {**config, **plan.config_changes}
    torch_name = DTYPES[code][0]
    config["dtype"] = torch_name
    if "torch_dtype" in config:
        config["torch_dtype"] = torch_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    result.files.append(out_dir / "config.json")
    for extra in CARRIED_FILES:
        if (Path(base_dir) / extra).is_file():
            shutil.copy2(Path(base_dir) / extra, out_dir / extra)
            result.files.append(out_dir / extra)
    result.files += copy_tokenizer(out_dir, tokenizer_dir, Path(base_dir))
    result.chat_template = read_chat_template(out_dir) is not None
    return result


def read_chat_template(folder: Path) -> str | dict[str, str] | None:
    """The chat template(s) a tokenizer folder carries, wherever transformers may have put them."""
    out: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        out["default"] = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        out["default"] = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    elif (folder / "tokenizer_config.json").is_file():
        tpl = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(tpl, list):
            out.update({t["name"]: t["template"] for t in tpl})
        elif tpl:
            out["default"] = tpl
    if (folder / TEMPLATE_DIR).is_dir():
        out.update({p.stem: p.read_text() for p in sorted((folder / TEMPLATE_DIR).glob("*.jinja"))})
    out = {k: v for k, v in out.items() if v}
    if not out:
        return None
    return out["default"] if set(out) == {"default"} else out


def copy_tokenizer(out_dir: Path, tokenizer_dir: Path | None, base_dir: Path) -> list[Path]:
    """Copy the tokenizer (the run's if it saved one, else the base's) and make sure the chat template
    arrives: a tokenizer saved without its template gets the base's, and the result is checked."""
    source = tokenizer_dir if has_tokenizer(tokenizer_dir) else base_dir
    written: list[Path] = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
            written.append(out_dir / name)
    if (source / TEMPLATE_DIR).is_dir():
        shutil.copytree(source / TEMPLATE_DIR, out_dir / TEMPLATE_DIR, dirs_exist_ok=True)
        written += sorted((out_dir / TEMPLATE_DIR).rglob("*.jinja"))
    expected = read_chat_template(source)
    if expected is None and source != base_dir and (base := read_chat_template(base_dir)) is not None:
        # the training run saved a tokenizer without a template: keep the base model's
        expected = base
        if isinstance(base, str):
            (out_dir / "chat_template.jinja").write_text(base)
            written.append(out_dir / "chat_template.jinja")
        else:
            shutil.copytree(base_dir / TEMPLATE_DIR, out_dir / TEMPLATE_DIR, dirs_exist_ok=True)
    if read_chat_template(out_dir) != expected:
        raise VerificationError(f"the chat template of {source} did not survive the copy to {out_dir}")
    return written


def write_lora(adapter: LoraAdapter, out_dir: Path, tokenizer_dir: Path | None, base_dir: Path) -> list[Path]:
    """The adapter alone, cleaned for ``--enable-lora`` serving: only LoRA tensors (plus DoRA magnitudes, LoRA
    biases and saved modules, which belong to it) and a config with local paths and training-only fields dropped."""
    from grpoctl.export.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    keys = [k for m in adapter.modules.values() for k in (m.a_key, m.b_key, m.magnitude_key, m.bias_key) if k]
    keys += list(adapter.saved_modules.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    from safetensors import safe_open

    with safe_open(adapter.weights_file, framework="pt") as f:
        for k in keys:
            sl = f.get_slice(k)
            infos.append(TensorInfo(k, ADAPTER_WEIGHTS, sl.get_dtype(), tuple(sl.get_shape())))
    write_safetensors(out_dir / ADAPTER_WEIGHTS, infos, lambda s: adapter.load_tensor(s.key))
    config = dict(adapter.config)
    config["inference_mode"] = True
    base = config.get("base_model_name_or_path")
    if base and Path(base).is_absolute():
        # a path on the training machine means nothing to a server; keep the model's own name
        config["base_model_name_or_path"] = _model_name(base_dir) or Path(base).name
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [out_dir / ADAPTER_WEIGHTS, out_dir / ADAPTER_CONFIG, *copy_tokenizer(out_dir, tokenizer_dir, base_dir)]


def _model_name(base_dir: Path) -> str | None:
    return built_from(base_dir).get("hub_id")
