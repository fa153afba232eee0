"""Subprocess entry point that runs llama.cpp's converter with grpoctl's hooks installed.

Started by :func:`grpoctl.export.gguf.convert` as ``python -m grpoctl.export.convert_worker SPEC.json``
with the converter's ``gguf-py`` first on PYTHONPATH (see ``Converter.python_path``), so ``import gguf``
here is the vendored one. It does what ``convert_hf_to_gguf.py``'s ``main()`` does for a text model,
plus three hooks:

- fused LoRA merge: every tensor the adapter changes is wrapped in a lazy tensor whose value is
  ``MergePlan.merged`` (``grpoctl.export.lora``, the same per-tensor merge as the 16-bit export: LoRA,
  DoRA, saved modules, an lm_head untied from the embedding), computed one or two tensors ahead of the
  writer on a second thread; for an f16 file the bf16 projections and embeddings are narrowed to f16
  directly (same bytes, no float32 copy);
- pre-tokenizer fallback: an unrecognised BPE hash is resolved by the tokenizer's split rules
  (:mod:`grpoctl.export.pretokenizer`) or an explicit override, never by guessing;
- end-of-turn tokens: the template's end-of-turn token is written as EOT when it is not the EOS.

The result (or a typed error) goes to the JSON file named in the spec; the exit code is non-zero on error.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

PREFETCH = 2
# Converter classes whose handling of the tensors below is layout only (renames, q/k permutes, stacking)
# and writes them as F16 in an F16 file: for these a bf16 weight may go to f16 directly. The converter
# itself would widen it to a float32 copy first and narrow that with numpy; both round the same value
# once (bf16 -> float32 is exact), so the bytes are identical, but the float32 copy of a 49152 x 2048
# embedding (400 MB) is what sets the converter's peak memory, and converting it twice costs time.
DIRECT_F16_CLASSES = ("LlamaModel", "Qwen2Model", "Qwen3Model")
DIRECT_F16_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                       "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _fused_plan(model_dir: Path, adapter_dir: str):
    """The adapter fitted to the base being converted (refusals become a typed failure, before any work)."""
    from grpoctl.errors import GrpoctlError
    from grpoctl.export.lora import LoraAdapter
    from grpoctl.export.tensors import ModelWeights

    try:
        weights = ModelWeights(model_dir)
        return LoraAdapter.open(Path(adapter_dir)).plan({k: i.shape for k, i in weights.tensors.items()},
                                                        weights.config())
    except GrpoctlError as e:
        raise _Fail("adapter", str(e)) from None


def _install_fused_merge(model_base: Any, lazy_cls: Any, plan: Any, direct_f16: bool) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from grpoctl.errors import GrpoctlError

    state: dict[str, Any] = {"merged": 0, "missing": []}
    original = model_base.index_tensors
    # The merge of the next adapted tensors (B @ A, the float32 sum, the rounding to the base dtype, and for
    # an f16 file the narrowing to f16) runs on a second thread while the writer converts and writes the
    # current one (torch and numpy release the GIL); at most PREFETCH merged tensors are held at once.
    pool = ThreadPoolExecutor(max_workers=1)
    order: list[str] = []
    pending: dict[str, Any] = {}
    base_loaders: dict[str, Any] = {}

    narrowed: set[str] = set()  # merged tensors written as f16 from bf16: narrowed here, off the writer's thread

    def merge(key: str):
        try:
            t = plan.merged(key, lazy_cls.to_eager(base_loaders[key]()))
        except GrpoctlError as e:
            raise _Fail("adapter", str(e)) from None
        # the same rounding the writer would do next (bf16 -> f16 once), done here while it writes the last one
        return t.to(torch.float16) if key in narrowed and t.dtype == torch.bfloat16 else t

    def merged(key: str):
        i = order.index(key) if key in order else len(order)
        for nxt in order[i:i + PREFETCH]:
            if nxt not in pending:
                pending[nxt] = pool.submit(merge, nxt)
        future = pending.pop(key, None)
        result = future.result() if future is not None else merge(key)
        if key in order:
            order.remove(key)
        return result

    def merged_loader(gen, key):
        base_loaders[key] = gen

        def load():
            base = gen()
            if isinstance(base, lazy_cls):
                # a lazy node: the merge runs when the writer asks for this tensor's bytes, not before
                meta = base._meta.to(torch.float16) if key in narrowed else base._meta
                return lazy_cls(meta=meta, args=(), func=lambda: merged(key))
            return merged(key)
        return load

    def f16_loader(gen):
        def load():
            t = gen()
            return t.to(torch.float16) if t.dtype == torch.bfloat16 else t  # lazy stays lazy
        return load

    def converter_name(cls, key: str) -> str:
        try:
            item = cls.filter_tensors((key, None))
            return item[0] if item else key
        except Exception:  # a class whose filter needs the tensor: its names are the HF names anyway
            return key

    def index_tensors(self, remote_hf_model_id=None):
        tensors = original(self, remote_hf_model_id)
        base = dict(tensors)  # an added tensor starts from its source's base value, never a merged one
        keys: dict[str, str] = {}  # converter's tensor name -> the merge's (HF) name
        for key, source in plan.sources.items():
            name, source_name = converter_name(type(self), key), converter_name(type(self), source)
            if source_name not in base:
                state["missing"].append(key)
                continue
            tensors[name] = merged_loader(base[source_name], key)
            keys[name] = key
            state["merged"] += 1
        if state["missing"]:
            raise _Fail("adapter", f"the adapter targets {len(state['missing'])} weights the base model does not "
                        f"have (first: {state['missing'][0]}); is it the adapter of a different base model?")
        if direct_f16 and type(self).__name__ in DIRECT_F16_CLASSES:
            for name in tensors:
                if name.endswith(DIRECT_F16_SUFFIXES):
                    tensors[name] = f16_loader(tensors[name])
                    state["direct_f16"] = state.get("direct_f16", 0) + 1
                    if name in keys:
                        narrowed.add(keys[name])
        # the writer streams tensors in this (insertion) order; prefetch follows it
        order[:] = [keys[name] for name in tensors if name in keys]
        return tensors

    model_base.index_tensors = index_tensors
    return state


def _install_pretokenizer_fallback(text_model: Any, model_dir: Path, state: dict[str, Any]) -> None:
    from grpoctl.export import pretokenizer

    original = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        forced = pretokenizer.override()
        if forced:
            state["pre_tokenizer"] = {"type": forced, "how": f"override {pretokenizer.ENV_OVERRIDE}"}
            return forced
        conv_logger = logging.getLogger("hf-to-gguf")
        level = conv_logger.level
        conv_logger.setLevel(logging.ERROR)  # its "not recognized" banner is resolved below, not the user's problem
        try:
            res = original(self, tokenizer)
            state["pre_tokenizer"] = {"type": res, "how": "llama.cpp hash"}
            return res
        except NotImplementedError:
            found = pretokenizer.identify(model_dir / "tokenizer.json")
            if found is None:
                seen = pretokenizer.describe(model_dir / "tokenizer.json")
                raise _Fail("pretokenizer", "llama.cpp does not recognise this tokenizer's pre-tokenizer and its "
                            f"split rules match none grpoctl knows ({seen}); if you know the llama.cpp type with the "
                            "same regex, pass --pre-tokenizer TYPE (or set "
                            f"{pretokenizer.ENV_OVERRIDE}=TYPE), e.g. qwen2, llama-bpe, gpt-2") from None
            state["pre_tokenizer"] = {"type": found, "how": "split rules of tokenizer.json"}
            return found
        finally:
            conv_logger.setLevel(level)

    text_model.get_vocab_base_pre = get_vocab_base_pre


def _install_eot(model_class: Any, eot_ids: list[int], state: dict[str, Any]) -> None:
    original = model_class.set_vocab

    def set_vocab(self):
        from gguf import Keys  # the converter's gguf-py, as the converter itself imports it

        original(self)
        eos = self.gguf_writer.kv_data[0].get(Keys.Tokenizer.EOS_ID)
        eos_id = int(eos.value) if eos is not None else None
        extra = [t for t in eot_ids if t != eos_id]
        if extra and Keys.Tokenizer.EOT_ID not in self.gguf_writer.kv_data[0]:
            self.gguf_writer.add_eot_token_id(extra[0])
            state["eot_token_id"] = extra[0]

    model_class.set_vocab = set_vocab


def _install_license(gguf: Any, license_: str | None) -> None:
    """gguf-py's metadata override file has no key for general.license (only the model card does): set it."""
    if not license_:
        return
    original = gguf.Metadata.load

    def load(*args, **kwargs):
        meta = original(*args, **kwargs)
        if meta.license is None:
            meta.license = license_
        return meta

    gguf.Metadata.load = staticmethod(load)


class _Fail(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import gguf
    import torch
    from conversion import (
        TEXT_MODEL_MAP,
        LazyTorchTensor,
        ModelBase,
        ModelType,
        TextModel,
        get_model_architecture,
        get_model_class,
    )

    logging.basicConfig(level=logging.WARNING if not spec.get("verbose") else logging.INFO)
    model_dir = Path(spec["model_dir"])
    state: dict[str, Any] = {"gguf_py": str(Path(gguf.__file__).parent)}
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

    with torch.inference_mode():
        hparams = ModelBase.load_hparams(model_dir, False)
        try:
            arch = get_model_architecture(hparams, ModelType.TEXT)
            model_class = get_model_class(arch)
        except (NotImplementedError, ValueError):
            arch = (hparams.get("architectures") or ["<none in config.json>"])[0]
            raise _Fail("arch", f"llama.cpp cannot convert architecture {arch}; supported: "
                        + ", ".join(sorted(TEXT_MODEL_MAP))) from None
        state["architecture"] = arch
        extra: dict[str, Any] = {}
        if spec.get("adapter_dir"):
            plan = _fused_plan(model_dir, spec["adapter_dir"])
            state["fused"] = _install_fused_merge(ModelBase, LazyTorchTensor, plan, direct_f16=spec["outtype"] == "f16")
            if plan.config_changes:
                # the converter reads the merged model's config, as it would from PEFT's merged folder
                # (tie_word_embeddings false once lm_head differs from the embedding)
                extra["hparams"] = {**hparams, **plan.config_changes}
                state["fused"]["config_changes"] = plan.config_changes
        _install_pretokenizer_fallback(TextModel, model_dir, state)
        eot_ids = spec.get("eot_token_ids")
        if eot_ids is None:  # worked out here, where transformers is loaded anyway for the vocabulary
            from grpoctl.export.gguf import end_of_turn_ids

            eot_ids = end_of_turn_ids(model_dir)
        state["eot_token_ids"] = eot_ids
        _install_eot(model_class, eot_ids, state)
        metadata = Path(spec["metadata_file"]) if spec.get("metadata_file") else None
        if metadata is not None:
            _install_license(gguf, json.loads(metadata.read_text()).get(gguf.Keys.General.LICENSE))
        model = model_class(model_dir, ftypes[spec["outtype"]], Path(spec["outfile"]), metadata_override=metadata,
                            model_name=spec.get("model_name"), **extra)
        model.write()
    return state


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    result_path = Path(spec["result_file"])
    try:
        state = run(spec)
        result_path.write_text(json.dumps({"ok": True, **state}))
        return 0
    except _Fail as e:
        result_path.write_text(json.dumps({"ok": False, "kind": e.kind, "message": str(e)}))
        return 2
    except BaseException as e:  # the converter's own failures: keep the last line, the trace goes to stderr
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        result_path.write_text(json.dumps({"ok": False, "kind": "converter", "message": msg[0] if msg else "?"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
