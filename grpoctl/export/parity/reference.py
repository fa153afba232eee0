"""The parity reference: the trained model as PEFT defines it, in transformers, in float32.

The base with PEFT's own LoRA layers holding the adapter file's weights, unmerged; never grpoctl's merge
code, so it can disagree with a file grpoctl merged wrong. Held in memory, or, when it does not fit,
streamed layer by layer from the safetensors files (accelerate's offload hooks). Its log-probabilities on
the probes, its greedy answer and the bf16 noise floor are computed once per export (:func:`prepare_reference`)
and kept for the next export of the same inputs (``grpoctl.export.reference_cache``). The importance
matrix's calibration completions are sampled from the same model (:func:`load_reference`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.errors import DataError, UsageError
from grpoctl.export import reference_cache
from grpoctl.export.parity.probes import (
    DEFAULT_SYSTEM_PROMPT,
    GREEDY_QUESTION,
    GREEDY_TOKENS,
    Probe,
    build_probes,
    conversation,
    render,
)
from grpoctl.export.parity.scoring import compare

ENV_REFERENCE = "GRPOCTL_PARITY_REFERENCE"  # memory | stream | auto (default)

ENV_DEVICE = "GRPOCTL_PARITY_DEVICE"  # e.g. cpu or cuda:1; default: the first GPU when there is one


def reference_device() -> str:
    import torch

    return os.environ.get(ENV_DEVICE) or ("cuda:0" if torch.cuda.is_available() else "cpu")


def _checkpoint(model_dir: Path) -> dict[str, Path]:
    """Every weight name of a safetensors checkpoint and the file that holds it (read as the merge reads it)."""
    from grpoctl.export.tensors import ModelWeights

    if not any(Path(model_dir).glob("*.safetensors")):  # pickle checkpoints are read by the merge only
        raise DataError(f"{model_dir} holds no safetensors weights (model.safetensors or its index)")
    return {k: model_dir / info.shard for k, info in ModelWeights(model_dir).tensors.items()}


def _float32_bytes(model_dir: Path, adapter_dir: Path | None) -> int:
    """What the reference needs in float32: twice a 16-bit checkpoint (the adapter's size in weights too)."""
    files = set(_checkpoint(model_dir).values())
    size = sum(f.stat().st_size for f in files)
    if adapter_dir is not None:
        size += sum(f.stat().st_size for f in Path(adapter_dir).glob("*.safetensors"))
    return 2 * size


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def streams(model_dir: Path, adapter_dir: Path | None, device: str) -> bool:
    """Whether the reference streams its weights layer by layer: when the float32 model (plus room for the
    probes' activations) does not fit the device's free memory, or ``$GRPOCTL_PARITY_REFERENCE`` says so."""
    choice = os.environ.get(ENV_REFERENCE, "auto")
    if choice not in ("auto", "memory", "stream"):
        raise UsageError(f"${ENV_REFERENCE} must be memory, stream or auto, not {choice!r}")
    if choice != "auto":
        return choice == "stream"
    return _float32_bytes(model_dir, adapter_dir) * 1.2 + 2 * 2**30 > _available_bytes(device)


def load_reference(model_dir: Path, adapter_dir: Path | None, device: str = "cpu", stream: bool = False):
    """The trained model as PEFT defines it, in float32 on ``device``: the base in transformers with PEFT's LoRA
    layers around it holding the adapter file's weights, applied unmerged, LoRA beside each base layer, as in
    training (what ``PeftModel.from_pretrained`` builds, by the same PEFT functions).

    Nothing of grpoctl's merge is used here (nor its merged/ folder), so a GGUF that grpoctl merged wrong
    (a module left out, a wrong scale, the base's lm_head) disagrees with this reference. With ``stream`` the
    base stays on disk: accelerate's offload hooks load each decoder layer's weights from the safetensors files
    when it runs and drop them after, so memory holds one layer (plus the embedding and the head) at a time.
    The arithmetic is the same either way: 16-bit weights widened to float32 are exact.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if stream:
        model = _streamed_base(Path(model_dir))
    else:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               device_map={"": device}, output_loading_info=True)
        except RuntimeError as e:  # transformers refuses mismatched shapes
            info = {"mismatched_keys": [str(e).splitlines()[0]]}
        # a reference with re-initialised weights would make every comparison meaningless
        bad = list(info.get("mismatched_keys") or []) + [k for k in info.get("missing_keys") or []
                                                        if "lm_head" not in k]
        if bad:
            _mismatch(model_dir, bad)
    if adapter_dir is not None:
        model = _peft(model, Path(adapter_dir))
    model = model.to(torch.float32)  # the adapter too (PEFT keeps what the file holds)
    if stream:
        _dispatch(model, Path(model_dir), device)
    model.eval()
    return model


def _mismatch(model_dir: Path, bad: list[str]) -> None:
    raise DataError(f"transformers cannot load {model_dir} as saved ({len(bad)} weights missing or of the "
                    f"wrong shape, first: {bad[0]}); the model folder's config does not match its weights")


def _streamed_base(model_dir: Path):
    """The base's structure without weights (meta device), its shapes checked against the checkpoint."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    files = _checkpoint(model_dir)
    bad = []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = _checkpoint_key(name, files, config)
        if key is None:
            bad.append(name)
            continue
        with safe_open(str(files[key]), framework="pt") as f:
            if tuple(f.get_slice(key).get_shape()) != tuple(p.shape):
                bad.append(name)
    if bad:
        _mismatch(model_dir, bad)
    # PEFT puts each adapter layer where its base layer's weight is, and a weight on the meta device would take
    # the adapter there too: every base weight becomes a float32 zero broadcast to its shape (no memory) until
    # accelerate's hooks replace it with the real weight while its layer runs
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                          requires_grad=False)
    return model


def _placeholder(p: Any) -> bool:
    return p.dim() > 0 and p.numel() > 1 and all(st == 0 for st in p.stride())


def _checkpoint_key(name: str, files: dict[str, Path], config: Any) -> str | None:
    """The checkpoint weight behind a parameter of the (PEFT-wrapped) model; PEFT keeps the base layer under
    ``base_layer`` / ``original_module``. A tied head reads the input embedding."""
    key = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer", ".original_module"):
        key = key.replace(wrapper, "")
    if key in files:
        return key
    if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return next((k for k in files if k.endswith("embed_tokens.weight")), None)
    return None


def _dispatch(model: Any, model_dir: Path, device: str) -> None:
    """accelerate's offload hooks on every block (decoder layer, PEFT layer, embedding, head): the base's weights
    come from the safetensors files each time the block runs, the adapter's from memory."""
    from accelerate import dispatch_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older PEFT
        from peft.utils.other import ModulesToSaveWrapper as AuxiliaryTrainingWrapper

    files = _checkpoint(model_dir)
    config = getattr(model, "config", None)
    index, resident = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if _placeholder(p) or p.device.type == "meta":
            key = _checkpoint_key(name, files, config)
            if key is None:
                raise DataError(f"the parity reference has no weight for {name} in {model_dir}")
            index[name] = {"safetensors_file": str(files[key]), "weight_name": key}
        else:  # the adapter's own weights, and base layers PEFT saved whole (modules_to_save)
            resident[name] = p.detach().to("cpu")
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[str] = []

    def visit(module: Any, prefix: str) -> None:
        whole = (type(module).__name__ in no_split or isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
                 or next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None)
        if whole:
            if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                blocks.append(prefix)  # buffers too (rotary frequencies): they go to the execution device
            return
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    # each block loads all of its weights as it starts (not each sub-layer its own): DoRA reads its base layer's
    # weight and runs its LoRA layers outside their forward; and DoRA hands those layers to its magnitude module
    # as arguments, which accelerate must not try to move
    whole = sorted({type(model.get_submodule(b)).__name__ for b in blocks})
    dispatch_model(model, device_map=dict.fromkeys(blocks, "disk"), main_device=device, state_dict=resident,
                   offload_index=index, force_hooks=True, preload_module_classes=whole,
                   skip_keys=["lora_A", "lora_B", "base_layer", "embed_fn"])


def _peft(model: Any, adapter_dir: Path):
    """PEFT's LoRA layers around the base, holding the adapter file's weights (the adapter's, and base layers
    PEFT saved whole, such as an embedding that carries a LoRA); an adapter PEFT cannot load completely fails."""
    import torch
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = True
        weights = load_peft_weights(str(adapter_dir), device="cpu")
        model = get_peft_model(model, config)
        # a base weight the file holds whole is copied in: a streamed base's zero placeholder becomes real here
        for name, p in model.named_parameters():
            if name in weights and _placeholder(p):
                module, _, leaf = name.rpartition(".")
                model.get_submodule(module)._parameters[leaf] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype),
                                                                                   requires_grad=False)
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise DataError(f"PEFT cannot load the adapter {adapter_dir} onto the base for the parity reference "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [k for k in result.missing_keys if ".default" in k]
    if missing:  # PEFT would run part of the adapter only: that is not the trained model
        raise DataError(f"PEFT cannot load all of the adapter {adapter_dir} for the parity reference: "
                        f"{len(missing)} adapter weights missing, first: {missing[0]}")
    return model


def reference_logprobs(model: Any, probes: list[Probe], device: str) -> list[Any]:
    """Log-probabilities at every probe position, in the model's dtype; all probes in one batch (right-padded,
    masked), so a streamed model reads its weights once."""
    import torch

    width = max(len(p.ids) for p in probes)
    ids = torch.zeros((len(probes), width), dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    for i, p in enumerate(probes):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
        mask[i, : len(p.ids)] = 1
    with torch.no_grad():
        with _layer_bar(model, f"parity: transformers {str(next(model.parameters()).dtype).removeprefix('torch.')}"):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return [torch.log_softmax(logits[i, : len(p.ids)].float(), dim=-1).cpu() for i, p in enumerate(probes)]


@contextlib.contextmanager
def _layer_bar(model: Any, desc: str) -> Iterator[None]:
    """A bar over the decoder layers a pass has run: the probes go through in one batch, and a streamed model
    spends its time reading each layer's weights."""
    from tqdm.auto import tqdm

    kinds = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def advance(*_: Any) -> None:  # returns None: a forward hook's return value would replace the layer's output
        bar.update(1)

    handles = [m.register_forward_hook(advance) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        bar.close()


def greedy_reference(model: Any, tokenizer: Any, prompt_ids: list[int], eos_ids: list[int], device: str) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids], device=device), max_new_tokens=GREEDY_TOKENS,
                             do_sample=False, eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0])
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


@dataclass
class ParityReference:
    """Everything computed once on the transformers side and reused for every GGUF."""

    probes: list[Probe]
    ref32: list[Any]
    noise: dict[str, float]
    confidence: float  # mean top-1 probability of the reference over all probe positions
    answer: str
    prompt_ids: list[int]
    tokenizer: Any
    system_prompt: str
    eot_ids: list[int]
    description: str = "base model in transformers, float32"
    system_prompt_chars: int | None = None  # the full prompt's length, when the probes carry only its start
    reused: bool = False  # kept from an earlier export of the same base, adapter and probes


def reference_plan(model_dir: Path, adapter_dir: Path | None, device: str | None = None,
                   mode: str | None = None) -> tuple[str, bool]:
    """Where the reference runs and whether it streams its weights: (device, stream). ``device`` and ``mode``
    ("memory" | "stream") are ``grpoctl export``'s ``--parity-device``/``--parity-reference``; None: their
    environment variables, else the first GPU and what fits its free memory."""
    device = device or reference_device()
    stream = mode == "stream" if mode else streams(Path(model_dir), adapter_dir, device)
    return device, stream


def prepare_reference(model_dir: Path, adapter_dir: Path | None, tokenizer_dir: Path, system_prompt: str | None,
                      eot_ids: list[int], plan: tuple[str, bool] | None = None,
                      work: reference_cache.ModelWork | None = None) -> ParityReference:
    """The reference's log-probabilities on the probes, its greedy answer and the bf16 noise floor: computed, or
    kept from an earlier export of the same base, adapter and probes (``grpoctl.export.reference_cache``).
    ``work`` (task parity's answers) runs on the float32 reference before it is rounded for the noise floor, so
    the model is loaded once, or its result is kept with the reference; when only the reference is kept, the
    model is loaded for the work alone."""
    from transformers import AutoTokenizer

    from grpoctl.chatprobes import probe_system_prompt

    system_prompt, system_chars = probe_system_prompt(system_prompt or DEFAULT_SYSTEM_PROMPT)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    probes = build_probes(tokenizer, system_prompt)
    prompt_ids = tokenizer(render(tokenizer, conversation(system_prompt, GREEDY_QUESTION), True)
                           if getattr(tokenizer, "chat_template", None) else GREEDY_QUESTION,
                           add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    device, stream = plan or reference_plan(model_dir, adapter_dir)
    key = reference_cache.reference_key(model_dir, adapter_dir, tokenizer_dir, [p.ids for p in probes], prompt_ids,
                                        eot_ids, system_prompt, {"device": device, "stream": stream,
                                                                 "greedy_tokens": GREEDY_TOKENS})
    done = reference_cache.load(key)
    reused = done is not None
    fresh: list[Any] = []  # the work's result when computed on the model loaded now
    if done is None:
        done = _compute_reference(model_dir, adapter_dir, tokenizer, probes, prompt_ids, eot_ids, device, stream,
                                  None if work is None else lambda *a: fresh.append(work.compute(*a)))
        reference_cache.store(key, done)
    else:
        done.description += " (kept from an earlier export of the same base, adapter and probes)"
    if work is not None:
        kept = None if fresh else reference_cache.load_work(key, work)
        if kept is None:
            if not fresh:  # the reference was kept, the work's result was not: the model is loaded for it alone
                model = load_reference(model_dir, adapter_dir, device, stream)
                fresh.append(work.compute(model, tokenizer, eot_ids, device))
                del model
            reference_cache.store_work(key, work, fresh[0])
        work.use(fresh[0] if kept is None else kept[0], tokenizer, kept is not None)
    return ParityReference(probes=probes, ref32=done.ref32, noise=done.noise, confidence=done.confidence,
                           answer=done.answer, prompt_ids=prompt_ids, tokenizer=tokenizer, system_prompt=system_prompt,
                           eot_ids=eot_ids, description=done.description, reused=reused,
                           system_prompt_chars=system_chars)


def _compute_reference(model_dir: Path, adapter_dir: Path | None, tokenizer: Any, probes: list[Probe],
                       prompt_ids: list[int], eot_ids: list[int], device: str, stream: bool,
                       with_model: Any = None) -> reference_cache.ReferenceResults:
    import torch

    model = load_reference(model_dir, adapter_dir, device, stream)
    ref32 = reference_logprobs(model, probes, device)
    answer = greedy_reference(model, tokenizer, prompt_ids, eot_ids, device)
    if with_model is not None:
        with_model(model, tokenizer, eot_ids, device)
    # last, as it rounds the adapter: the same reference in bf16, for the noise floor. Module.to itself:
    # accelerate guards a dispatched model's own .to against moves, and its weights are not here to move
    ref16 = reference_logprobs(torch.nn.Module.to(model, torch.bfloat16), probes, device)
    del model
    top1, kl, n = compare(ref32, ref16)
    confidence = float(sum(r.exp().max(-1).values.sum() for r in ref32)) / n
    where = f"float32 on {device}" + (", weights streamed layer by layer from the safetensors files" if stream else "")
    what = f"base model in transformers, {where}"
    if adapter_dir is not None:
        import peft

        what = f"base + adapter applied by PEFT (peft {peft.__version__}, unmerged) in transformers, {where}"
    return reference_cache.ReferenceResults(ref32=ref32, noise={"top1": top1, "kl": kl, "positions": n},
                                            confidence=confidence, answer=answer, description=what)
