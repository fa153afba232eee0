"""How many real chat templates translate to a faithful Go TEMPLATE, which are refused and why, and what
Ollama >= 0.30 renders each with (its own registry rules, followed from the source).

    python -m tests.manifests.template_coverage DIR [--json OUT]

DIR holds ``*.jinja`` chat templates (llama.cpp's ``models/templates`` corpus is the reference set: it
ships in the llama-cpp-python sdist under ``vendor/llama.cpp/models/templates``). Each is dressed on the
test tokenizer (its special tokens found in the template text, BOS ``<s>``, EOS ``</s>``), probed,
translated and checked with Go exactly as ``grpoctl manifests`` does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

# Special tokens as they appear in chat templates: <|...|>, <｜...｜>, [INST]-style and <..._of_turn> markers.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>]{1,40}｜>|<(?:start|end)_of_turn>|\[/?[A-Z_]{3,20}\]")


def corpus_tokenizer(base_dir: Path, template: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    specials = sorted(set(_SPECIAL.findall(template)) | {"<s>", "</s>"})
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    tok.chat_template = template
    return tok


def classify(tok: Any) -> dict[str, Any]:
    """One template's outcome: translation, check, and what Ollama renders with each Modelfile."""
    from grpoctl.manifests.gorender import check_fidelity
    from grpoctl.manifests.ollama import _template_capabilities, ollama_prompt
    from grpoctl.manifests.templates import UntranslatableTemplate, probe_chat_format, to_go_template

    out: dict[str, Any] = {}
    try:
        fmt = probe_chat_format(tok)
    except UntranslatableTemplate as err:
        out.update(go="refused", classes=["structure"], reason=str(err))
        fmt = None
    else:
        report = check_fidelity(tok, fmt, to_go_template(fmt), "Be brief.")
        out.update(go="faithful" if report.passed else "refused", classes=report.failed_shapes,
                   reason=report.reason[:160], think_switch=fmt.uses_think_flag,
                   system_rejected=not fmt.system_supported)
    plain = ollama_prompt(tok.chat_template, None)
    out["no_template"] = plain.mode + (f":{plain.registry.name}" if plain.registry else "")
    if plain.mode == "native":
        out["auto"] = "no TEMPLATE, native"
    elif out["go"] == "faithful":
        out["auto"] = "TEMPLATE, " + ollama_prompt(tok.chat_template, _template_capabilities(fmt)).mode
    else:
        out["auto"] = f"no TEMPLATE, {out['no_template']} (not faithful)"
    return out


def main(argv: list[str] | None = None) -> int:
    from tests.tinymodels import build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    files = sorted(args.corpus.glob("*.jinja"))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        for i, path in enumerate(files, 1):
            results[path.stem] = r = classify(corpus_tokenizer(Path(tmp), path.read_text()))
            print(f"[{i}/{len(files)}] {path.stem:46s} {r['go']:9s} {','.join(r['classes']):28s} {r['auto']}",
                  file=sys.stderr, flush=True)
    n = len(results)
    go = Counter(r["go"] for r in results.values())
    classes = Counter(c for r in results.values() if r["go"] == "refused" for c in r["classes"])
    first = Counter(r["classes"][0] if len(r["classes"]) == 1 else "+".join(r["classes"])
                    for r in results.values() if r["go"] == "refused")
    auto = Counter(r["auto"] for r in results.values())
    print(f"templates: {n}")
    print(f"Go TEMPLATE faithful: {go['faithful']}, refused: {go['refused']}")
    print("refused, by class (a template can fail several): "
          + ", ".join(f"{k} {v}" for k, v in classes.most_common()))
    print("refused, by exact set of classes: " + ", ".join(f"{k} {v}" for k, v in first.most_common()))
    switched = sum(bool(r.get("think_switch")) for r in results.values() if r["go"] == "faithful")
    print(f"faithful with a think switch: {switched}")
    print("Modelfile by default (Ollama >= 0.30): " + ", ".join(f"{k}: {v}" for k, v in auto.most_common()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
