"""Fixtures for manifest tests: tokenizers carrying each family's published chat template, a fake
training run and an export directory recorded in artifacts.json (no real export needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TEMPLATES = DATA / "templates"

_DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
_LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]

# Special tokens, BOS/EOS and whether tokenization adds BOS, per published tokenizer.
FAMILIES: dict[str, dict] = {
    "smollm2": dict(specials=[], bos="<|im_start|>", eos="<|im_end|>"),
    "qwen2": dict(specials=[], eos="<|im_end|>"),
    "qwen3": dict(specials=[], eos="<|im_end|>"),
    "deepseek-r1-0528-qwen3": dict(specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                             "<｜Assistant｜>"],
                                   bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True),
    "deepseek-r1-distill-qwen": dict(specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                               "<｜Assistant｜>"],
                                     bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True),
    "llama-3.1": dict(specials=_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    "llama-3.2": dict(specials=_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    "qwen2.5": dict(specials=[], eos="<|im_end|>"),
    "gemma-2": dict(specials=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
                    add_bos=True),
    "granite-3.3": dict(specials=["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"],
                        eos="<|end_of_text|>"),
    "mistral-small-3.2": dict(specials=["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                                        "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                        "[/TOOL_RESULTS]"], bos="<s>", eos="</s>", add_bos=True),
    "deepseek-v3.2": dict(specials=_DEEPSEEK, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True),
}


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tinymodels import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def family_tokenizer(base_dir: Path, family: str):
    """The fixture's byte-level BPE dressed as ``family``: its published chat template, its special
    tokens, BOS/EOS, and a post-processor that adds BOS where the real tokenizer does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    cfg = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if cfg["specials"]:
        tok.add_special_tokens({"additional_special_tokens": cfg["specials"]})
    if cfg.get("bos"):
        tok.bos_token = cfg["bos"]
    tok.eos_token = cfg["eos"]
    if cfg.get("add_bos"):
        b = cfg["bos"]
        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, tok.convert_tokens_to_ids(b))])
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tok


@pytest.fixture(scope="session")
def go_renderer():
    """The Go template renderer binary; skips (with the reason) only when no Go toolchain is usable."""
    from grpoctl.errors import DependencyError
    from grpoctl.manifests.gorender import build_renderer

    try:
        return build_renderer()
    except DependencyError as err:
        pytest.skip(f"no usable Go toolchain, cannot render with text/template: {err}")


def write_run(root: Path, tokenizer_src: Path, *, system_prompt: str | None = "Reason step by step. End with #### N.",
              base_id: str = "Qwen/Qwen3-0.6B", base_path: str | None = None, reasoning: bool = True,
              lora_r: int = 32, max_seq_length: int = 1536) -> Path:
    """A run directory as ``grpoctl train`` leaves it (run.json + adapter/ with the tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    adapter = root / "adapter"
    shutil.copytree(tokenizer_src, adapter, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": lora_r, "lora_alpha": 64, "peft_type": "LORA",
                                                             "base_model_name_or_path": base_id}))
    meta = {"config": {"data": {"system_prompt": system_prompt},
                       "model": {"max_seq_length": max_seq_length},
                       "trainer": {"temperature": 1.0, "top_p": 0.95, "min_p": 0.1, "top_k": 50},
                       "lora": {"r": lora_r}},
            "base_model": {"id": base_id, "path": base_path or str(tokenizer_src)}}
    if reasoning:
        meta["reasoning"] = {"start": "<think>", "end": "</think>"}
    (root / "run.json").write_text(json.dumps(meta))
    return root


def write_export(run: Path, *, name: str = "Tiny-GRPO", quants=("Q4_K_M",), merged: bool = True,
                 lora: bool = True, merged_4bit: bool = False, real_gguf: bool = False) -> Path:
    """An export directory recorded in artifacts.json: GGUF files (placeholders, or the embedded real
    SmolLM2 GGUF), merged/ and lora/ folders carrying the run's tokenizer."""
    from grpoctl.artifacts import Artifacts, Provenance
    from grpoctl.models import identify
    from grpoctl.rundir import RunDir

    export = run / "export"
    (export / "gguf").mkdir(parents=True, exist_ok=True)
    manifest = Artifacts(root=export, provenance=Provenance(source=str(run), run=str(run),
                                                            base_model=identify(RunDir(run).base_model)))
    for q in quants:
        p = export / "gguf" / f"{name}-{q}.gguf"
        if real_gguf:
            from grpoctl.models import embedded_gguf_path

            shutil.copyfile(embedded_gguf_path(), p)
        else:
            p.write_bytes(b"GGUF" + bytes(60))
        manifest.add_file(p, f"gguf:{q.lower()}")
    tok_dir = run / "adapter"
    for folder, wanted in (("merged", merged), ("merged-4bit", merged_4bit)):
        if wanted:
            shutil.copytree(tok_dir, export / folder, ignore=shutil.ignore_patterns("adapter_*"))
            (export / folder / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
            manifest.add_tree(export / folder, folder)
    if lora:
        shutil.copytree(tok_dir, export / "lora")
        manifest.add_tree(export / "lora", "lora")
    manifest.save()
    return export


def gguf_with_template(src: Path, template: Path, out: Path) -> Path:
    """A copy of the GGUF ``src`` whose embedded chat template is ``template`` (gguf-py's gguf_new_metadata,
    llama.cpp's own tool)."""
    import subprocess
    import sys

    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(out),
                    "--chat-template-file", str(template), "--force"], check=True, capture_output=True, timeout=600)
    return out
