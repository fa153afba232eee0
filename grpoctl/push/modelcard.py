"""Model cards (``README.md``) for the pushed repos, built only from ``artifacts.json`` and the run.

Every number on a card (sizes, sha256, parity, rewards, steps) is copied from those two sources; a fact
neither records is left out rather than guessed. The YAML front matter uses the Hub's model card
metadata keys (``base_model``, ``base_model_relation``, ``library_name``, ``tags``, ``license``,
``pipeline_tag``, ``datasets``) and is written by huggingface_hub's ``ModelCardData``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.artifacts import ArtifactManifest, FileEntry
from grpoctl.models import EMBEDDED_HUB_ID, looks_like_hub_id
from grpoctl.rundir import RunDir

_EMBEDDED_LICENSE = "apache-2.0"

# kind -> (library_name, extra tags, title suffix, one-line description)
_KIND_META: dict[str, tuple[str, list[str], str]] = {
    "merged": ("transformers", ["safetensors"], "16-bit safetensors, LoRA merged into the base weights"),
    "merged-4bit": ("transformers", ["bitsandbytes", "4-bit"], "bitsandbytes 4-bit (nf4) weights of the merged model"),
    "lora": ("peft", ["lora", "adapter"], "LoRA adapter (PEFT) for the base model"),
    "gguf": ("gguf", ["gguf", "llama.cpp", "ollama"], "GGUF files for llama.cpp and Ollama"),
}


@dataclass
class CardContext:
    """What every card of one push shares: the manifest, the run (if known), the repo ids, the branch."""

    manifest: ArtifactManifest
    run: RunDir | None
    repos: dict[str, str]
    revision: str = "main"
    base: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.base = base_model_info(self.run, self.manifest)


# --- facts -------------------------------------------------------------------------------------------
def _looks_like_hub_id(s: str) -> bool:
    return looks_like_hub_id(s) and not Path(s).exists()  # a local folder named owner/name is not on the Hub


def base_model_info(run: RunDir | None, manifest: ArtifactManifest) -> dict[str, Any]:
    """Hub id (when there is one), local path and license of the base model."""
    raw: dict[str, Any] = {}
    if run is not None:
        raw = dict(run.meta.get("base_model") or {})
    prov = manifest.provenance.get("base_model")
    if not raw and isinstance(prov, dict):
        raw = dict(prov)
    elif not raw and isinstance(prov, str):
        raw = {"id": prov}
    bid, path = raw.get("id"), raw.get("path")
    info: dict[str, Any] = {"id": None, "display": bid or path, "path": path, "revision": raw.get("revision"),
                            "license": None}
    if isinstance(bid, str) and bid.startswith("embedded:"):
        info["id"], info["license"] = EMBEDDED_HUB_ID, _EMBEDDED_LICENSE
    elif isinstance(bid, str) and _looks_like_hub_id(bid):
        info["id"] = bid
    if path and Path(path).is_dir():
        src = Path(path) / "grpoctl-source.json"
        if src.is_file():
            meta = json.loads(src.read_text())
            info["id"] = info["id"] or meta.get("hub_id")
            info["license"] = info["license"] or meta.get("license")
        readme = Path(path) / "README.md"
        if readme.is_file() and not info["license"]:
            from huggingface_hub import metadata_load

            try:
                info["license"] = (metadata_load(readme) or {}).get("license")
            except Exception:  # a malformed upstream card must not block a push
                pass
    return info


def _dataset(run: RunDir | None) -> tuple[str | None, str | None]:
    """(Hub dataset id or None, human description) of the training data, as recorded by the run."""
    if run is None:
        return None, None
    name = run.dataset
    if not name:
        return None, None
    hub = name if _looks_like_hub_id(name) and not name.endswith((".jsonl", ".json", ".csv", ".parquet")) else None
    return hub, name


def quant_of(entry: FileEntry) -> str | None:
    if entry.kind.startswith("gguf:"):
        return entry.kind.split(":", 1)[1].upper()
    return None


def parity_for(entry: FileEntry, manifest: ArtifactManifest) -> dict[str, Any] | None:
    """The parity record of one GGUF file, wherever the exporter put it (entry extra or ``parity``)."""
    if isinstance(entry.extra.get("parity"), dict):
        return entry.extra["parity"]
    section = manifest.sections.get("parity")
    if not section:
        return None
    name, quant = Path(entry.path).name, (quant_of(entry) or "")
    keys = {entry.path.lower(), name.lower(), quant.lower()}
    records: list[Any] = []
    containers = [section] if isinstance(section, list) else [
        section, section.get("files"), section.get("results"), section.get("quants")]
    for container in containers:
        if isinstance(container, dict):  # keyed by file path, file name or quant type
            for k, v in container.items():
                if str(k).lower() in keys and isinstance(v, dict):
                    return v
        elif isinstance(container, list):  # records naming their file or quant
            records += [c for c in container if isinstance(c, dict)]
    for c in records:
        ids = {str(c.get(k, "")).lower() for k in ("file", "path", "name", "quant", "type", "gguf")}
        ids |= {Path(str(c.get(k, ""))).name.lower() for k in ("file", "path")}
        if keys & (ids - {""}):
            return c
    return None


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _parity_text(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "—"
    parts = [f"{k} {_fmt_num(v)}" for k, v in rec.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) or k in ("passed", "pass", "ok")]
    return ", ".join(parts) if parts else "—"


def _size(n: int) -> str:
    from grpoctl.push.hub import human_size

    return human_size(n)


# --- sections ------------------------------------------------------------------------------------------
def _front_matter(kind: str, ctx: CardContext) -> str:
    from huggingface_hub import ModelCardData

    library, extra_tags, _ = _KIND_META[kind]
    base_id = ctx.base["id"]
    merged_repo = ctx.repos.get("merged")
    # quantized repos derive from the merged fine-tune when it is published alongside; else from the base
    if kind in ("gguf", "merged-4bit") and merged_repo:
        base, relation = merged_repo, "quantized"
    else:
        base = base_id
        # a LoRA merged into its base is a fine-tune of that one model; the Hub keeps "merge" for model merges
        relation = {"lora": "adapter", "merged": "finetune", "merged-4bit": "finetune", "gguf": "finetune"}[kind]
    tags = ["grpo", "grpoctl", "trl"] + extra_tags
    if ctx.run is not None and str(ctx.run.section("trainer").get("backend", "")).lower() == "unsloth":
        tags.append("unsloth")
    if kind != "gguf":
        tags.append("text-generation")
    hub_ds, _ = _dataset(ctx.run)
    data: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if base:
        data["base_model"] = base
        data["base_model_relation"] = relation
    if ctx.base["license"]:
        data["license"] = ctx.base["license"]
    if hub_ds:
        data["datasets"] = [hub_ds]
    return ModelCardData(**data).to_yaml()


def _files_table(kind: str, ctx: CardContext, entries: list[FileEntry], prefix: str) -> list[str]:
    lines = ["## Files", ""]
    if kind == "gguf":
        lines += ["| File | Quant | Size | Bytes | SHA256 | Parity vs. merged model |",
                  "|---|---|---|---|---|---|"]
    else:
        lines += ["| File | Size | Bytes | SHA256 |", "|---|---|---|---|"]
    for e in entries:
        name = e.path[len(prefix):]
        if kind == "gguf":
            q = quant_of(e) or "—"
            par = _parity_text(parity_for(e, ctx.manifest)) if quant_of(e) else "—"
            lines.append(f"| `{name}` | {q} | {_size(e.size)} | {e.size} | `{e.sha256}` | {par} |")
        else:
            lines.append(f"| `{name}` | {_size(e.size)} | {e.size} | `{e.sha256}` |")
    lines.append("")
    lines.append("Sizes and sha256 are those recorded in `artifacts.json` by `grpoctl export` "
                 "and checked again before upload.")
    return lines + [""]


def _usage(kind: str, ctx: CardContext, entries: list[FileEntry]) -> list[str]:
    repo = ctx.repos[kind]
    rev_note = [] if ctx.revision == "main" else [f"Files are on the branch `{ctx.revision}`.", ""]
    lines = ["## How to run it", ""] + rev_note
    if kind == "gguf":
        quants = [q for q in (quant_of(e) for e in entries) if q]
        q = "Q4_K_M" if "Q4_K_M" in quants else (quants[0] if quants else "Q4_K_M")
        lines += ["Ollama (pulls straight from this repo; pick any quant listed above):", "", "```sh",
                  f"ollama run hf.co/{repo}:{q}", "```", "",
                  "llama.cpp server (OpenAI-compatible API on port 8080):", "", "```sh",
                  f"llama-server -hf {repo}:{q}", "```", "",
                  "llama-cpp-python:", "", "```python", "from llama_cpp import Llama", "",
                  f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{q}.gguf")',
                  'print(llm.create_chat_completion(messages=[{"role": "user", "content": "What is 12 * 7?"}])'
                  '["choices"][0]["message"]["content"])',
                  "```", ""]
        if any(e.kind == "modelfile" for e in entries):
            lines += ["The `Modelfile` here carries the chat template, stop tokens and sampling settings of the "
                      "training run; after downloading the GGUF next to it: `ollama create my-model -f Modelfile`.",
                      ""]
    elif kind in ("merged", "merged-4bit"):
        quant = kind == "merged-4bit"
        lines += ["vLLM (OpenAI-compatible server):", "", "```sh",
                  f"vllm serve {repo}" + (" --quantization bitsandbytes" if quant else ""), "```", "",
                  "Transformers" + (" (needs a CUDA GPU and `bitsandbytes`)" if quant else "") + ":", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tok = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
                  'messages = [{"role": "user", "content": "What is 12 * 7?"}]',
                  'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
                  'return_dict=True).to(model.device)',
                  "out = model.generate(**inputs, max_new_tokens=512)",
                  'print(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    elif kind == "lora":
        base = ctx.base["id"] or "<base model>"
        r = ctx.run.lora_r if ctx.run is not None else None
        # name the base explicitly: the adapter's own config may point at a local folder of the training machine
        tok_repo = repo if any("tokenizer" in Path(e.path).name for e in entries) else base
        lines += ["PEFT (loads the base model and applies this adapter):", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}", device_map="auto")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")',
                  f'tok = AutoTokenizer.from_pretrained("{tok_repo}")',
                  "```", "",
                  "vLLM with the adapter served on top of the base model:", "", "```sh",
                  f"vllm serve {base} --enable-lora --lora-modules grpo={repo}"
                  + (f" --max-lora-rank {r}" if r else ""), "```", ""]
        if ctx.base["id"] is None:
            lines += [f"The base model was a local folder (`{ctx.base['display']}`); use the same weights.", ""]
    return lines


def _recipe(ctx: CardContext) -> list[str]:
    lines = ["## Training recipe", ""]
    run = ctx.run
    if run is None:
        return lines + ["The training run directory was not available when this card was written, so the recipe "
                        "is not recorded here.", ""]
    base = ctx.base
    lines.append("- Method: GRPO (group relative policy optimisation) with a LoRA adapter, trained by grpoctl")
    if base["display"]:
        shown = f"[{base['id']}](https://huggingface.co/{base['id']})" if base["id"] else f"`{base['display']}`"
        lines.append(f"- Base model: {shown}" + (f" (revision `{base['revision']}`)" if base["revision"] else ""))
    _, ds = _dataset(run)
    if ds:
        lines.append(f"- Dataset: `{ds}`")
    if run.system_prompt:
        prompt = run.system_prompt
        if "\n" in prompt or "`" in prompt:  # inline code cannot hold these; an indented fenced block can
            lines += ["- System prompt used in training:", "", "  ```text"]
            lines += [f"  {line}" for line in prompt.replace("```", "'''").splitlines()] + ["  ```", ""]
        else:
            lines.append(f"- System prompt used in training: `{prompt}`")
    if run.reasoning_markers:
        lines.append("- Reasoning markers: `{}` … `{}`".format(*run.reasoning_markers))
    if run.section("model").get("max_seq_length"):
        lines.append(f"- Max sequence length: {run.max_seq_length}")
    backend = run.section("trainer").get("backend")
    if backend:
        lines.append(f"- Trainer backend: {backend}")
    if run.rewards:
        lines.append("- Rewards: " + ", ".join(f"`{n}` (weight {_fmt_num(w)})" for n, w in run.rewards))
    summary = run.summary()  # written by `grpoctl train` (grpoctl/train/run.py), also on Ctrl-C
    steps, window = summary.get("steps"), summary.get("window")
    final, first = summary.get("mean_reward_last"), summary.get("mean_reward_first")
    if final is None:  # a run killed before its summary: the per-step log still tells
        logged = [m for m in run.metrics() if isinstance(m.get("reward"), (int, float))]
        if logged:
            final, first, window = logged[-1]["reward"], logged[0]["reward"], 1
            steps = steps if steps is not None else logged[-1].get("step", len(logged))
    if steps is not None:
        lines.append(f"- Steps: {steps}")
    if final is not None:
        span = f" over the last {window} logged steps" if window and window > 1 else " at the last logged step"
        lines.append(f"- Final mean reward{span}: {_fmt_num(final)}"
                     + (f" (first steps: {_fmt_num(first)})" if first is not None else ""))
    if summary.get("stop_reason"):
        lines.append(f"- Stopped because: {summary['stop_reason']}")
    lines.append("")
    for title, section in (("LoRA", run.section("lora")), ("Trainer", run.section("trainer"))):
        items = [(k, v) for k, v in section.items() if isinstance(v, (str, int, float, bool, list)) and k != "backend"]
        if items:
            lines += [f"| {title} setting | Value |", "|---|---|"]
            lines += [f"| `{k}` | {', '.join(map(str, v)) if isinstance(v, list) else _fmt_num(v)} |" for k, v in items]
            lines.append("")
    return lines


def _verification(ctx: CardContext) -> list[str]:
    verify = ctx.manifest.sections.get("verify")
    if not isinstance(verify, dict):
        return []
    items = [(k, v) for k, v in verify.items() if isinstance(v, (str, int, float, bool))]
    if not items:
        return []
    lines = ["## Adapter verification (from the export)", "", "| Check | Result |", "|---|---|"]
    lines += [f"| {k} | {_fmt_num(v)} |" for k, v in items]
    return lines + [""]


def _parity_notes(ctx: CardContext) -> list[str]:
    section = ctx.manifest.sections.get("parity")
    if not isinstance(section, dict):
        return []
    scal = [(k, v) for k, v in section.items() if isinstance(v, (str, int, float, bool))]
    floor = section.get("noise_floor")
    lines = []
    if scal or isinstance(floor, dict):
        lines += ["Parity is measured by `grpoctl export` against the merged model in transformers "
                  "(top-1 next-token agreement and mean KL divergence on fixed probe prompts)."]
        lines += [f"- {k}: {_fmt_num(v)}" for k, v in scal]
        if isinstance(floor, dict):
            lines.append("- noise floor (merged model, bf16 vs float32): " + _parity_text(floor))
        lines.append("")
    return lines


def _related(kind: str, ctx: CardContext) -> list[str]:
    others = [(k, r) for k, r in ctx.repos.items() if k != kind]
    if not others:
        return []
    label = {"merged": "merged 16-bit model", "merged-4bit": "4-bit model", "lora": "LoRA adapter",
             "gguf": "GGUF files"}
    return ["## Related repos", ""] + [f"- {label[k]}: [{r}](https://huggingface.co/{r})" for k, r in others] + [""]


def _provenance(ctx: CardContext) -> list[str]:
    prov = ctx.manifest.provenance
    libs = prov.get("libraries") or {}
    lines = ["## Provenance", ""]
    if prov.get("grpoctl_version"):
        lines.append(f"- grpoctl {prov['grpoctl_version']}, export created {ctx.manifest.created}")
    if libs:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())))
    return lines + [""] if len(lines) > 2 else []


def render_card(kind: str, ctx: CardContext) -> str:
    """The full ``README.md`` for the repo of one artifact family."""
    from grpoctl.push.hub import FAMILIES, _family_entries

    prefix = FAMILIES[kind][1]
    entries = sorted((e for e in _family_entries(ctx.manifest, kind) if e.path[len(prefix):] != "README.md"),
                     key=lambda e: e.path)
    repo = ctx.repos[kind]
    name = repo.split("/")[1]
    desc = _KIND_META[kind][2]
    base = ctx.base
    base_txt = (f"[{base['id']}](https://huggingface.co/{base['id']})" if base["id"]
                else (f"`{base['display']}`" if base["display"] else "its base model"))
    body = [f"# {name}", "", f"{desc}. Fine-tuned from {base_txt} with GRPO and LoRA using grpoctl.", ""]
    body += _files_table(kind, ctx, entries, prefix)
    if kind == "gguf":
        body += _parity_notes(ctx)
    body += _usage(kind, ctx, entries)
    body += _recipe(ctx)
    body += _verification(ctx)
    body += _related(kind, ctx)
    body += _provenance(ctx)
    return f"---\n{_front_matter(kind, ctx)}\n---\n\n" + "\n".join(body).rstrip() + "\n"
