"""Does a GGUF behave like the model it came from? Measured, not assumed.

For each GGUF, llama.cpp (``llama_cpp.Llama`` with all logits) and the reference, the base with the
adapter applied by PEFT's own LoRA layers in transformers (float32), read the same fixed probe
texts, teacher-forced on exactly the same token ids: prose, math, code, and chat conversations rendered
by the model's own template with the training system prompt. Per file: top-1 next-token agreement and
mean KL(reference || GGUF) over all positions, one greedy chat answer from each side, whether the ids
llama-server sends for the rendered chat are transformers' ids with one BOS, whether every end-of-turn token is an
end-of-generation token, and whether the chat template in the file, rendered by llama.cpp's own engine
(llama-server), gives the prompt the HF tokenizer's gives on the hard conversations of the Ollama check.
The noise floor (the same reference in bf16 vs float32 on the same probes) is measured in the same run, and
each file's floors give way to it (``following_noise``): how often a model's argmax flips under rounding is
the model's own property (near ties, a trained head, a big vocabulary), not its file type's.
The reference never uses grpoctl's merge code, so it can disagree with a file grpoctl merged wrong.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl.errors import ConversionError, DataError, InputNotFoundError, UsageError
from grpoctl.export import reference_cache

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step, then give the final answer."
ENV_FLOORS = "GRPOCTL_PARITY_FLOORS"
MAX_PROBE_TOKENS = 192
GREEDY_TOKENS = 40


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


# --- probes --------------------------------------------------------------------------------------

PROSE = [
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
    "had done before him. From the top he could see the harbour lights flicker on one by one, and the fishing "
    "boats returning with the tide.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, "
    "using sunlight, produce glucose and release oxygen as a by-product of the reaction.",
]
MATH = [
    "Question: A baker makes 24 muffins and sells 3 boxes of 6 muffins each. How many muffins are left?\n"
    "Answer: The baker sells 3 * 6 = 18 muffins. 24 - 18 = 6 muffins are left.\n#### 6",
    "Question: Tom has 15 apples. He gives 4 to Anna and buys 7 more. How many apples does he have?\n"
    "Answer: 15 - 4 = 11. 11 + 7 = 18.\n#### 18",
]
CODE = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "import json\n\nwith open('config.json') as f:\n    config = json.load(f)\nfor key, value in config.items():\n"
    "    print(f'{key} = {value}')\n",
]
CHATS = [
    ("What is 12 + 7?", "12 + 7 = 19. The answer is 19."),
    ("A train travels 60 km per hour for 3 hours. How far does it go?",
     "Distance is speed times time: 60 * 3 = 180. It travels 180 km."),
    ("Write one sentence about the sea.", "The sea stretches to the horizon, calm and silver under the morning sun."),
]
GREEDY_QUESTION = "What is 9 + 5? Answer briefly."


@dataclass
class Probe:
    kind: str
    ids: list[int]


def _conversation(system_prompt: str, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # some templates reject a system turn: fold it into the first user message
        folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
        return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=add_generation_prompt)


def build_probes(tokenizer: Any, system_prompt: str) -> list[Probe]:
    """The fixed probe set as token ids, exactly as transformers tokenises them (BOS as the tokenizer adds it)."""
    probes: list[Probe] = []
    for kind, texts in (("prose", PROSE), ("math", MATH), ("code", CODE)):
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_PROBE_TOKENS]
            probes.append(Probe(kind, ids))
    if getattr(tokenizer, "chat_template", None):
        for user, assistant in CHATS:
            text = _render(tokenizer, _conversation(system_prompt, user, assistant), False)
            # the rendered template already holds every special token it wants (BOS included)
            probes.append(Probe("chat", tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROBE_TOKENS]))
    return probes


# --- reference (transformers) --------------------------------------------------------------------

ENV_REFERENCE = "GRPOCTL_PARITY_REFERENCE"  # memory | stream | auto (default)
ENV_DEVICE = "GRPOCTL_PARITY_DEVICE"  # e.g. cpu or cuda:1; default: the first GPU when there is one


def reference_device() -> str:
    import torch

    return os.environ.get(ENV_DEVICE) or ("cuda:0" if torch.cuda.is_available() else "cpu")


def _checkpoint(model_dir: Path) -> dict[str, Path]:
    """Every weight name of a safetensors checkpoint and the file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise DataError(f"{model_dir} holds no safetensors weights (model.safetensors or its index)")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


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


# --- llama.cpp side ------------------------------------------------------------------------------

def open_gguf(path: Path, n_ctx: int):
    """Load a GGUF in llama.cpp; a file llama.cpp cannot load is a failed conversion."""
    import llama_cpp

    try:
        # mmap: the file's pages are the page cache's, not the process's memory
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                               n_threads=_threads(), use_mmap=True)
    except Exception as e:
        raise ConversionError(f"llama.cpp cannot load {path.name}: {e}") from None


def _threads() -> int:
    from grpoctl.export.quantize import default_threads

    return default_threads()


def gguf_logprobs(llm: Any, probes: list[Probe], label: str = "llama.cpp") -> list[Any]:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    out = []
    for p in tqdm(probes, desc=f"parity: {label}", unit="probe", leave=False):
        llm.reset()
        llm.eval(p.ids)
        scores = torch.from_numpy(np.array(llm.scores[: len(p.ids)], dtype=np.float32))
        out.append(torch.log_softmax(scores, dim=-1))
    return out


def tokenizer_checks(llm: Any, path: Path, tokenizer: Any, system_prompt: str, eot_ids: list[int]) -> dict[str, Any]:
    """BOS once, same ids as HF for the rendered chat, end-of-turn tokens are EOG, and the chat template in
    ``path`` renders in llama.cpp's own engine what the trained tokenizer renders in transformers
    (:func:`template_check`)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.token_bos()
    checks: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        return {"template": "none", "ok": True}
    conv = _conversation(system_prompt, GREEDY_QUESTION)
    text = _render(tokenizer, conv, True)
    hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ll_ids = served_ids(llm, text)
    leading_bos = 0
    while leading_bos < len(ll_ids) and ll_ids[leading_bos] == bos:
        leading_bos += 1
    # the template decides whether a BOS belongs in front; what the server sends must hold it once
    expected = int(tokenizer.bos_token_id is not None and hf_ids[:1] == [tokenizer.bos_token_id])
    checks["bos_count"] = leading_bos if bos >= 0 else 0
    checks["bos_once"] = checks["bos_count"] == expected
    checks["chat_ids_match"] = ll_ids == hf_ids
    checks["chat_tokens"] = len(hf_ids)
    checks["eog"] = {tokenizer.convert_ids_to_tokens(t): bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in eot_ids}
    if llm.metadata.get("tokenizer.chat_template") is None:
        checks["template_matches"] = False
        checks["template"] = "missing from the GGUF"
    else:
        checks["template"] = template_check(path, tokenizer, system_prompt,
                                            bool(llama_cpp.llama_vocab_get_add_bos(vocab)))
        checks["template_matches"] = checks["template"]["passed"]  # None: not checked, and the report says why
    checks["ok"] = bool(checks["bos_once"] and checks["chat_ids_match"] and all(checks["eog"].values())
                        and checks["template_matches"] is not False)
    checks["prompt_ids"] = hf_ids
    return checks


def served_ids(llm: Any, text: str) -> list[int]:
    """The token ids llama-server sends the model for a chat prompt rendered to ``text``.

    llama.cpp's chat layer (``common/chat.cpp``, after rendering the template) cuts a leading BOS text off the
    prompt when the model's vocabulary adds a BOS itself, and the server tokenizes the prompt with special tokens
    added (``tokenize_input_prompts(..., add_special=true, parse_special=true)``): one BOS either way, whether
    the template writes it (Gemma, Llama 3) or not. (llama-cpp-python's server renders with the BOS text and
    tokenizes without adding one, which gives the same ids.)
    """
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.token_bos()
    if bos >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab):
        bos_text = llm.detokenize([bos], special=True).decode("utf-8", errors="replace")
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def template_check(path: Path, tokenizer: Any, system_prompt: str, add_bos: bool) -> dict[str, Any]:
    """The GGUF's chat template as llama.cpp serves it against the trained tokenizer's in transformers.

    Rendered by llama-server's ``POST /apply-template`` (llama.cpp's chat layer and C++ Jinja engine, what
    llama-server and Ollama's native chat run) and by ``apply_chat_template``, on the hard conversations of
    the Ollama template check (``gorender.conversations``: whitespace around message text, reasoning then
    whitespace after the end marker, system prompts, think on and off) that end with a user turn; dates
    are rendered on the day of the check (llama-server reads the real clock). Where llama.cpp departs from
    transformers, the trained tokenizer's template is rendered by llama.cpp too: the same departure there is
    llama.cpp's chat layer (``engine_departures``, reported), a different one is the file's template
    (``departures``, which fails the check). ``passed`` is None, with ``skipped`` saying why, when
    llama.cpp's tools are not built.
    """
    from grpoctl.errors import DependencyError
    from grpoctl.llamacpp_tools import apply_template, llama_server, tool

    try:
        tool("llama-server", build=False)
    except (DependencyError, InputNotFoundError) as err:
        return {"passed": None, "skipped": f"chat template not rendered by llama.cpp's engine: {err}"}
    convs = _template_conversations(tokenizer, system_prompt)
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""  # llama.cpp strips it, adds the token
    expected = {c.name: _hf_prompt(tokenizer, c, bos) for c in convs}

    def kwargs(c: Any) -> dict[str, bool]:
        return {} if c.think is None else {"enable_thinking": c.think}

    result: dict[str, Any] = {"engine": "llama-server POST /apply-template (llama.cpp's chat layer, C++ Jinja)",
                              "reference": "transformers apply_chat_template, the trained tokenizer",
                              "conversations": [c.name for c in convs]}
    try:
        with llama_server(path) as url:
            got = {c.name: apply_template(url, c.messages, kwargs(c)) for c in convs}
        differ = [c for c in convs if not _same(expected[c.name], got[c.name])]
        engine: dict[str, tuple[str, str]] = {}
        if differ:  # the file's template, or llama.cpp's chat layer on any copy of the trained template?
            with tempfile.TemporaryDirectory(prefix="grpoctl-template-") as tmp:
                trained = Path(tmp) / "chat_template.jinja"
                trained.write_text(_template_text(tokenizer))
                with llama_server(path, trained) as url:
                    engine = {c.name: apply_template(url, c.messages, kwargs(c)) for c in differ}
    except DependencyError as err:  # the tools are there, so the file is what llama-server could not load
        return {**result, "passed": False, "error": str(err), "departures": [], "engine_departures": []}

    def case(c: Any) -> dict[str, str]:
        (hf, hf_err), (ll, ll_err) = expected[c.name], got[c.name]
        return {"name": c.name, "shape": c.shape, "expected": hf or f"<error: {hf_err}>",
                "got": ll or f"<error: {ll_err}>"}

    result["departures"] = [case(c) for c in differ if engine[c.name] != got[c.name]]
    result["engine_departures"] = [case(c) for c in differ if engine[c.name] == got[c.name]]
    result["passed"] = not result["departures"]
    return result


def _template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    return template if isinstance(template, str) else tokenizer.get_chat_template()


def _template_conversations(tokenizer: Any, system_prompt: str) -> list[Any]:
    from grpoctl.chatprobes import THINK_OPEN_TAGS, conversations

    template = _template_text(tokenizer)
    markers = next(((o, "</" + o[1:]) for o in THINK_OPEN_TAGS if "</" + o[1:] in template), ("<think>", "</think>"))
    # llama-server renders on its own clock and continues a final assistant turn its own way (reasoning parsed
    # out of it), so the probes are the conversations that ask for a reply
    return [c for c in conversations(system_prompt, markers) if c.ends_with_user and c.day is None]


def _hf_prompt(tokenizer: Any, conv: Any, bos: str) -> tuple[str, str]:
    try:
        text = tokenizer.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=True,
                                             **({} if conv.think is None else {"enable_thinking": conv.think}))
    except Exception as err:  # the template's raise_exception, a missing key ...: llama.cpp must refuse too
        return "", str(err) or "error"
    return (text[len(bos):] if bos and text.startswith(bos) else text), ""


def _same(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Both render the same prompt, or both refuse the conversation."""
    return bool(a[1]) == bool(b[1]) and (bool(a[1]) or a[0] == b[0])


def greedy_gguf(llm: Any, prompt_ids: list[int]) -> str:
    llm.reset()
    out = llm.create_completion(prompt=prompt_ids, max_tokens=GREEDY_TOKENS, temperature=0.0, top_k=1)
    return out["choices"][0]["text"].strip()


# --- report --------------------------------------------------------------------------------------

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


def reference_plan(model_dir: Path, adapter_dir: Path | None) -> tuple[str, bool]:
    """Where the reference runs and whether it streams its weights: (device, stream)."""
    device = reference_device()
    return device, streams(Path(model_dir), adapter_dir, device)


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
    prompt_ids = tokenizer(_render(tokenizer, _conversation(system_prompt, GREEDY_QUESTION), True)
                           if getattr(tokenizer, "chat_template", None) else GREEDY_QUESTION,
                           add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    device, stream = plan or reference_plan(model_dir, adapter_dir)
    key = reference_cache.reference_key(model_dir, adapter_dir, tokenizer_dir, [p.ids for p in probes], prompt_ids,
                                        eot_ids, system_prompt, {"device": device, "stream": stream,
                                                                 "greedy_tokens": GREEDY_TOKENS})
    done = reference_cache.load(key)
    reused = done is not None
    if done is None:
        result: list[Any] = []
        done = _compute_reference(model_dir, adapter_dir, tokenizer, probes, prompt_ids, eot_ids, device, stream,
                                  None if work is None else lambda *a: result.append(work.compute(*a)))
        reference_cache.store(key, done)
        if work is not None:
            reference_cache.store_work(key, work, result[0])
            work.use(result[0], tokenizer, False)
    else:
        if work is not None:
            kept = reference_cache.load_work(key, work)
            if kept is None:
                model = load_reference(model_dir, adapter_dir, device, stream)
                kept = (work.compute(model, tokenizer, eot_ids, device),)
                del model
                reference_cache.store_work(key, work, kept[0])
                work.use(kept[0], tokenizer, False)
            else:
                work.use(kept[0], tokenizer, True)
        done.description += " (kept from an earlier export of the same base, adapter and probes)"
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


def measure(path: Path, type_name: str, ref: ParityReference, floor: Floor) -> dict[str, Any]:
    """Parity of one GGUF file against the reference; ``passed`` applies the floor."""
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
    return {"type": type_name, "top1": round(top1, 5), "kl": round(kl, 6), "kl_p99": round(kl_p99, 6), "positions": n,
            "floor": {"top1": round(floor.top1, 5) if top1_gated else None,
                      "kl": None if floor.kl is None else round(floor.kl, 6), "basis": basis},
            "passed": bool(meets and checks["ok"]),
            "tokenizer": checks, "answer": answer}


def report(ref: ParityReference, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for p in ref.probes:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {
        "reference": ref.description,
        "probes": {"texts": len(ref.probes), "positions": ref.noise["positions"], "kinds": kinds,
                   "system_prompt": ref.system_prompt,
                   **({"system_prompt_cut": f"the first {len(ref.system_prompt)} of {ref.system_prompt_chars} "
                                            "characters"} if ref.system_prompt_chars else {})},
        "noise_floor": {"what": "the reference in bf16 vs float32", "top1": round(ref.noise["top1"], 5),
                        "kl": round(ref.noise["kl"], 6)},
        "reference_confidence": round(ref.confidence, 4),
        "top1_gated": ref.confidence >= MIN_CONFIDENCE,
        "reference_answer": ref.answer,
        "files": files,
        "passed": all(f["passed"] for f in files.values()),
    }


def format_table(rep: dict[str, Any]) -> str:
    noise = rep["noise_floor"]
    lines = [f"{'file':44} {'top-1':>7} {'mean KL':>9} {'floor':>14} {'tokens':>6}  result",
             f"{'(noise floor: bf16 vs f32)':44} {noise['top1'] * 100:6.1f}% {noise['kl']:9.5f}"]
    for name, f in rep["files"].items():
        fl = f["floor"]
        floor = (f">={fl['top1'] * 100:.1f}%" if fl["top1"] is not None else "") + \
            (f" <={fl['kl']:.3g}" if fl["kl"] is not None else "") + ("*" if fl.get("basis") == "noise" else "")
        tok = "ok" if f["tokenizer"]["ok"] else "BAD"
        lines.append(f"{name:44} {f['top1'] * 100:6.1f}% {f['kl']:9.5f} {floor:>14} {tok:>6}  "
                     + ("pass" if f["passed"] else "FAIL"))
    if any(f["floor"].get("basis") == "noise" for f in rep["files"].values()):
        lines.append(f"* floor lowered to this model's own rounding noise: the flips bf16 rounding causes here, scaled "
                     f"to the file's KL, x{NOISE_FLIP_MARGIN:g}; KL up to x{NOISE_KL_MARGIN:g} the bf16 noise")
    if not rep["top1_gated"]:
        lines.append(f"top-1 not gated: the reference's mean top-1 probability is {rep['reference_confidence']:.3f} "
                     f"(< {MIN_CONFIDENCE}), too flat for argmax agreement to mean anything; KL is gated")
    lines.append(f"probes: {rep['probes']['texts']} texts, {rep['probes']['positions']} positions "
                 f"({', '.join(f'{k} {v}' for k, v in rep['probes']['kinds'].items())})")
    lines.append(f"greedy answer, transformers: {rep['reference_answer']!r}")
    for name, f in rep["files"].items():
        lines.append(f"greedy answer, {name}: {f['answer']!r}")
    for name, f in rep["files"].items():
        lines += [f"{name}: {line}" for line in template_lines(f["tokenizer"].get("template"))]
    return "\n".join(lines)


def template_lines(check: Any) -> list[str]:
    """What the chat template check found, for people: skipped (why), failed (which conversation), or the
    departures of llama.cpp's chat layer it passed."""
    if not isinstance(check, dict):
        return [f"chat template {check}"] if check == "missing from the GGUF" else []
    if check.get("skipped"):
        return [f"{check['skipped']}; not checked"]
    if check.get("error"):
        return [f"chat template not checked, llama-server failed: {check['error']}"]
    lines, gone, engine = [], check["departures"], check["engine_departures"]
    if gone:  # the first in full, the others by name (parity.json has every render)
        d = gone[0]
        lines.append(f"chat template departs from transformers on conversation {d['name']!r}: transformers renders "
                     f"{d['expected']!r}, llama.cpp renders {d['got']!r}")
        if gone[1:]:
            lines.append(f"chat template departs on {', '.join(repr(d['name']) for d in gone[1:])} too")
    if engine:
        lines.append(f"llama.cpp's chat layer renders {', '.join(repr(d['name']) for d in engine)} unlike "
                     "transformers for the trained template too: llama.cpp's difference, not the file's "
                     "(parity.json has both renders)")
    return lines


def unchecked_template_note(files: dict[str, Any]) -> str | None:
    """The summary's note for the GGUFs (``{name: ParityResult}``) whose chat template llama.cpp did not
    render because its tools are not built: the table's per-file line is easy to miss among passes."""
    skipped = [name for name, f in files.items()
               if isinstance(t := f.tokenizer.get("template"), dict) and t.get("skipped")]
    if not skipped:
        return None
    return (f"note: chat template of {', '.join(skipped)} NOT checked against llama.cpp's chat engine (its tools "
            "are not built): `grpoctl doctor --build-llama-tools` builds them once, then export again with --force")


def write_report(rep: dict[str, Any], path: Path) -> Path:
    from grpoctl.fsutil import staged_file

    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(rep, indent=2) + "\n")
    path.chmod(0o644)
    return path
