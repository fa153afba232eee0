"""Model cards (``README.md``) for the pushed repos, built only from ``artifacts.json`` and the run.

Every number on a card (sizes, sha256, parity, rewards, steps) is copied from those two sources; a fact
neither records is left out rather than guessed. The YAML front matter uses the Hub's model card
metadata keys (``base_model``, ``base_model_relation``, ``library_name``, ``tags``, ``license``,
``pipeline_tag``, ``datasets``) and is written by huggingface_hub's ``ModelCardData``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.artifacts import Artifacts, FileEntry, ParityResult
from grpoctl.fsutil import human_bytes
from grpoctl.gguftypes import default_type
from grpoctl.models import looks_like_hub_id
from grpoctl.rundir import BaseModelRef, RunDir

# The reward curve pushed beside each card (SVG drawn by grpoctl.report from the run's metrics.jsonl).
REWARD_PLOT = "reward.svg"

# kind -> (library_name, extra tags, one-line description)
_KIND_META: dict[str, tuple[str, list[str], str]] = {
    "merged": ("transformers", ["safetensors"], "16-bit safetensors, LoRA merged into the base weights"),
    "merged-4bit": ("transformers", ["bitsandbytes", "4-bit"], "bitsandbytes 4-bit (nf4) weights of the merged model"),
    "lora": ("peft", ["lora", "adapter"], "LoRA adapter (PEFT) for the base model"),
    "gguf": ("gguf", ["gguf", "llama.cpp", "ollama"], "GGUF files for llama.cpp and Ollama"),
}


@dataclass
class CardContext:
    """What every card of one push shares: the export's record, the run (if known), the repo ids, the branch."""

    artifacts: Artifacts
    run: RunDir | None
    repos: dict[str, str]
    revision: str = "main"
    base: BaseModelRef = field(init=False)

    def __post_init__(self) -> None:
        # export records what the base is (its Hub id and license); without that record the card names nothing
        self.base = self.artifacts.provenance.base_model or BaseModelRef(id="", path="")


# --- facts -------------------------------------------------------------------------------------------
def _looks_like_hub_id(s: str) -> bool:
    return looks_like_hub_id(s) and not Path(s).exists()  # a local folder named owner/name is not on the Hub


def _dataset(run: RunDir | None) -> tuple[str | None, str | None]:
    """(Hub dataset id or None, human description) of the training data, as recorded by the run."""
    if run is None:
        return None, None
    name = run.dataset
    if not name:
        return None, None
    hub = name if _looks_like_hub_id(name) and not name.endswith((".jsonl", ".json", ".csv", ".parquet")) else None
    return hub, name


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _parity_text(rec: ParityResult | None) -> str:
    if rec is None:
        return "—"
    floor = [f"top-1 >= {rec.floor.top1 * 100:.1f}%"] if rec.floor.top1 is not None else []
    floor += [f"KL <= {rec.floor.kl:g}"] if rec.floor.kl is not None else []
    task = ""
    if rec.task is not None:
        d = rec.task.difference
        task = (f"; task reward {rec.task.mean_reward:.3g} ({d.mean:+.3g} vs. the reference, 95% interval "
                f"{d.low:+.3g} to {d.high:+.3g}{', a significant drop' if rec.task.significant_drop else ''}), "
                f"{rec.task.agreement * 100:.0f}% of answers identical")
    return (f"top-1 {rec.top1 * 100:.1f}%, mean KL {rec.kl:.4g}" + (f" (floor {', '.join(floor)})" if floor else "")
            + task + (", passed" if rec.passed else ", FAILED"))


# --- sections ------------------------------------------------------------------------------------------
def _front_matter(kind: str, ctx: CardContext) -> str:
    from huggingface_hub import ModelCardData

    library, extra_tags, _ = _KIND_META[kind]
    base_id = ctx.base.hub_id
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
    if ctx.base.license:
        data["license"] = ctx.base.license
    if hub_ds:
        data["datasets"] = [hub_ds]
    return ModelCardData(**data).to_yaml()


def _files_table(kind: str, ctx: CardContext, entries: list[FileEntry], prefix: str) -> list[str]:
    lines = ["## Files", ""]
    if kind == "gguf":
        lines += ["| File | Quant | Size | Bytes | SHA256 | Parity vs. PEFT reference |",
                  "|---|---|---|---|---|---|"]
    else:
        lines += ["| File | Size | Bytes | SHA256 |", "|---|---|---|---|"]
    for e in entries:
        name = e.path[len(prefix):]
        if kind == "gguf":
            parity = ctx.artifacts.parity
            rec = parity.files.get(Path(e.path).name) if parity and e.quant else None
            par = _parity_text(rec) if e.quant else "—"
            quant = (e.quant or "—").upper() + (" (imatrix)" if e.imatrix else "") + \
                (" (searched recipe)" if e.recipe else "")
            lines.append(f"| `{name}` | {quant} | {human_bytes(e.size)} | {e.size} | `{e.sha256}` | {par} |")
        else:
            lines.append(f"| `{name}` | {human_bytes(e.size)} | {e.size} | `{e.sha256}` |")
    lines.append("")
    lines.append("Sizes and sha256 are those recorded in `artifacts.json` by `grpoctl export` "
                 "and checked again before upload.")
    return lines + [""]


def _usage(kind: str, ctx: CardContext, entries: list[FileEntry]) -> list[str]:
    repo = ctx.repos[kind]
    rev_note = [] if ctx.revision == "main" else [f"Files are on the branch `{ctx.revision}`.", ""]
    lines = ["## How to run it", ""] + rev_note
    if kind == "gguf":
        quants = [e.quant for e in entries if e.quant]
        q = (default_type(quants) or "q4_k_m").upper()
        lines += ["Ollama (pulls straight from this repo; pick any quant listed above):", "", "```sh",
                  f"ollama run hf.co/{repo}:{q}", "```", "",
                  "llama.cpp server (OpenAI-compatible API on port 8080):", "", "```sh",
                  f"llama-server -hf {repo}:{q}", "```", "",
                  "llama-cpp-python:", "", "```python", "from llama_cpp import Llama", "",
                  f'llm = Llama.from_pretrained(repo_id="{repo}", filename="*{q}.gguf")',
                  'print(llm.create_chat_completion(messages=[{"role": "user", "content": "What is 12 * 7?"}])'
                  '["choices"][0]["message"]["content"])',
                  "```", ""]
        names = {Path(e.path).name for e in entries if e.kind == "manifest"}
        hub_files = [n for n in ("template", "system", "params") if n in names]
        if hub_files:
            lines += [f"`ollama run hf.co/...` reads {', '.join(f'`{n}`' for n in hub_files)} from this repo: the "
                      "training run's chat template (as a Go template checked against the model's own), system "
                      "prompt and sampling settings, the same as the `Modelfile`'s.", ""]
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
        base = ctx.base.hub_id or "<base model>"
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
        if ctx.base.hub_id is None:
            lines += [f"The base model was a local folder (`{ctx.base.id}`); use the same weights.", ""]
    return lines


def reward_plot(ctx: CardContext) -> bytes | None:
    """The run's mean reward per logged step as SVG, to upload beside the card; None without a run or metrics."""
    from grpoctl.report import reward_chart

    svg = reward_chart(ctx.run) if ctx.run is not None else None
    return svg.encode() if svg else None


def _recipe(ctx: CardContext, reward_plot: str | None = None) -> list[str]:
    lines = ["## Training recipe", ""]
    run = ctx.run
    if run is None:
        return lines + ["The training run directory was not available when this card was written, so the recipe "
                        "is not recorded here.", ""]
    base = ctx.base
    lines.append("- Method: GRPO (group relative policy optimisation) with a LoRA adapter, trained by grpoctl")
    if base.id:
        shown = f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.id}`"
        lines.append(f"- Base model: {shown}" + (f" (revision `{base.revision}`)" if base.revision else ""))
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
    if reward_plot:
        lines += [f"![Mean reward per training step]({reward_plot})", ""]
    for title, section in (("LoRA", run.section("lora")), ("Trainer", run.section("trainer"))):
        items = [(k, v) for k, v in section.items() if isinstance(v, (str, int, float, bool, list)) and k != "backend"]
        if items:
            lines += [f"| {title} setting | Value |", "|---|---|"]
            lines += [f"| `{k}` | {', '.join(map(str, v)) if isinstance(v, list) else _fmt_num(v)} |" for k, v in items]
            lines.append("")
    return lines


def _verification(ctx: CardContext) -> list[str]:
    verify = ctx.artifacts.verify
    if verify is None:
        return []
    s = verify.summary
    lines = ["## Adapter verification (from the export)", "", "| Check | Result |", "|---|---|",
             f"| result | {verify.status}{' (strict)' if verify.strict else ''} |",
             f"| LoRA modules checked | {s.modules} |",
             f"| modules with a zero update (untrained) | {s.zero_delta} |",
             f"| modules whose lora_B is all zero | {s.zero_b} |",
             f"| update norm, scale·B·A (smallest, largest) | {s.delta_norm_min:.4g}, {s.delta_norm_max:.4g} |"]
    if verify.saved_modules:
        lines.append(f"| modules saved whole | {', '.join(f'`{m}`' for m in verify.saved_modules)} |")
    lines.append(f"| adapter sha256 | `{verify.adapter_sha256}` |")
    lines += [f"| warning | {w} |" for w in verify.warnings]
    return lines + [""]


def _parity_notes(ctx: CardContext) -> list[str]:
    parity = ctx.artifacts.parity
    if parity is None:
        return []
    probes, noise = parity.probes, parity.noise_floor
    reference = "the PEFT reference" if "PEFT" in parity.reference else "the reference"
    lines = [f"Parity is measured by `grpoctl export`: each file is run in llama.cpp against {reference} "
             f"({parity.reference}), "
             f"on {probes.get('texts')} fixed probe texts ({probes.get('positions')} positions; prose, math, code "
             "and chat with the training system prompt), teacher-forced on the same token ids: top-1 next-token "
             "agreement and mean KL divergence.",
             f"- noise floor ({noise.what}): top-1 {noise.top1 * 100:.1f}%, mean KL {noise.kl:.4g}"]
    if not parity.top1_gated:
        lines.append("- top-1 is not gated: the reference is too flat on these probes for argmax agreement to mean "
                     "anything; KL is")
    lines.append(f"- greedy answer of the reference: {parity.reference_answer!r}")
    task = parity.task
    if task is not None and task.skipped:
        lines.append(f"- task parity not measured: {task.skipped}")
    elif task is not None and task.reference is not None:
        weights = ", ".join(f"`{n}`" + (f" x{w:g}" if w != 1 else "") for n, w in (task.weights or {}).items())
        lines.append(f"- task parity: {task.prompts} prompts from {task.source}, answered greedily (up to "
                     f"{task.max_new_tokens} tokens) by {reference} and by each file in llama.cpp with the file's own "
                     f"chat template, scored with the run's rewards ({weights}); the reference's mean reward is "
                     f"{task.reference.mean_reward:.3g}. The difference is paired per prompt, with a bootstrap "
                     f"{(task.level or 0.95) * 100:.0f}% interval")
    return lines + [""]


def _imatrix_notes(ctx: CardContext) -> list[str]:
    """How the importance matrix was made and what it bought, from the ``imatrix`` and ``parity`` sections."""
    section = ctx.artifacts.imatrix
    if section is None:
        return []
    parity = ctx.artifacts.parity
    comparison = parity.imatrix.types if parity is not None and parity.imatrix is not None else {}
    quants = ", ".join(t.upper() for t in section.types)
    lines = ["## Importance matrix", "",
             f"{quants} {'were' if len(section.types) > 1 else 'was'} quantized by llama.cpp's "
             f"`llama-quantize --imatrix {section.file}` (the matrix is in this repo)."]
    cal = section.calibration
    if cal is not None and cal.source == "run":
        lines[-1] += (f" `llama-imatrix` computed it over `{cal.file}` (also here, {cal.tokens} tokens): "
                      f"{cal.documents} prompts of the training data, rendered with the chat template and the "
                      f"training system prompt, each followed by a completion {cal.completions}.")
    elif cal is not None:
        lines[-1] += f" `llama-imatrix` computed it over the text `{cal.file}` (also here)."
    else:
        lines[-1] += " The matrix was supplied by the publisher; its calibration text is not recorded."
    rows = [(t, r.plain, r) for t, r in comparison.items() if r.plain is not None]
    if rows:
        held = " (none of which is in the calibration text)" if section.held_out else ""
        lines += ["", f"Against the same quant made without the matrix, on the parity probes{held}:", "",
                  "| Quant | top-1 without | mean KL without | top-1 with | mean KL with | mean KL |",
                  "|---|---|---|---|---|---|"]
        for t, p, r in rows:
            m, gain = r.imatrix, r.gain.kl if r.gain is not None and r.gain.kl is not None else 0.0
            lines.append(f"| {t.upper()} | {p.top1 * 100:.1f}% | {p.kl:.4f} | {m.top1 * 100:.1f}% | "
                         f"{m.kl:.4f} | {abs(gain) * 100:.1f}% {'lower' if gain >= 0 else 'higher'} |")
    return lines + [""]


def _quant_recipe_notes(ctx: CardContext) -> list[str]:
    """The searched per-tensor recipes: how they were found and the plain / imatrix / searched table."""
    section = ctx.artifacts.quant_recipe
    if section is None or not section.types:
        return []
    lines = ["## Per-tensor recipe", "",
             f"Tensor types were searched on the calibration text `{section.calibration}` ({section.positions} "
             f"positions, never the parity probes): {section.method}. A searched file ships only when its KL on "
             "that text is below the importance-matrix quant's and it is no larger than the plain and "
             "importance-matrix quants of its type. Rebuild one with "
             "`llama-quantize --imatrix MATRIX --tensor-type-file RECIPE F16.gguf OUT.gguf TYPE`.", "",
             "| Quant | File | Size | mean KL | p99 KL | top-1 |", "|---|---|---|---|---|---|"]
    for t, rec in section.types.items():
        for r in rec.rows:
            name = f"**{r.variant}** (shipped)" if r.shipped else r.variant
            p99 = f"{r.kl_p99:.4f}" if r.kl_p99 is not None else "—"
            lines.append(f"| {t.upper()} | {name} | {human_bytes(r.bytes)} | {r.kl:.4f} | {p99} | "
                         f"{r.top1 * 100:.1f}% |")
    lines += ["", "Measured on the parity probes, as above. Recipes:", ""]
    for t, rec in section.types.items():
        what = f"`{rec.recipe}`" if rec.shipped else "not shipped"
        lines.append(f"- {t.upper()}: {what}, {rec.changed} tensors changed; {rec.reason}")
    return lines + [""]


def _related(kind: str, ctx: CardContext) -> list[str]:
    others = [(k, r) for k, r in ctx.repos.items() if k != kind]
    if not others:
        return []
    label = {"merged": "merged 16-bit model", "merged-4bit": "4-bit model", "lora": "LoRA adapter",
             "gguf": "GGUF files"}
    return ["## Related repos", ""] + [f"- {label[k]}: [{r}](https://huggingface.co/{r})" for k, r in others] + [""]


def _provenance(ctx: CardContext) -> list[str]:
    prov = ctx.artifacts.provenance
    lines = ["## Provenance", "", f"- grpoctl {prov.grpoctl_version}, export created {ctx.artifacts.created}"]
    if prov.libraries:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in sorted(prov.libraries.items())))
    return lines + [""]


def render_card(kind: str, ctx: CardContext, entries: list[FileEntry], prefix: str,
                reward_plot: str | None = None) -> str:
    """The full ``README.md`` for the repo of one artifact family: ``entries`` are its files, under ``prefix``
    in the export; ``reward_plot``: the reward curve's path in the repo, shown with the recipe."""
    entries = sorted((e for e in entries if e.path[len(prefix):] != "README.md"), key=lambda e: e.path)
    repo = ctx.repos[kind]
    name = repo.split("/")[1]
    desc = _KIND_META[kind][2]
    base = ctx.base
    base_txt = (f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id
                else (f"`{base.id}`" if base.id else "its base model"))
    body = [f"# {name}", "", f"{desc}. Fine-tuned from {base_txt} with GRPO and LoRA using grpoctl.", ""]
    body += _files_table(kind, ctx, entries, prefix)
    if kind == "gguf":
        body += _parity_notes(ctx)
        body += _imatrix_notes(ctx)
        body += _quant_recipe_notes(ctx)
    body += _usage(kind, ctx, entries)
    body += _recipe(ctx, reward_plot)
    body += _verification(ctx)
    body += _related(kind, ctx)
    body += _provenance(ctx)
    return f"---\n{_front_matter(kind, ctx)}\n---\n\n" + "\n".join(body).rstrip() + "\n"
