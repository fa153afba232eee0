"""How many real chat templates translate to a faithful Go TEMPLATE, which are refused and why, and what
Ollama >= 0.30 renders each with (its own registry rules, followed from the source).

    python -m tests.manifests.template_coverage DIR [--json OUT]
    python -m tests.manifests.template_coverage DIR --llama-server BIN --gguf GGUF --tokenizer HF_DIR

DIR holds ``*.jinja`` chat templates (llama.cpp's ``models/templates`` corpus is the reference set: it
ships in the llama-cpp-python sdist under ``vendor/llama.cpp/models/templates``). Each is dressed on the
test tokenizer (its special tokens found in the template text, BOS ``<s>``, EOS ``</s>``), probed,
translated and checked with Go exactly as ``grpoctl manifests`` does.

With ``--llama-server`` it measures Ollama's native path instead, as ``grpoctl manifests`` checks it
(``check_native``): llama.cpp's chat layer and C++ Jinja engine (``POST /apply-template`` of that
llama-server started on GGUF with ``--chat-template-file``) against transformers (the tokenizer in HF_DIR
carrying the same template).
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
    """One template's outcome: the Go check, and the Modelfile ``grpoctl manifests`` writes by default."""
    from grpoctl.manifests.ollama import plan_template

    plan = plan_template(tok, None, "Be brief.")
    sec = plan.section
    fidelity = sec.get("fidelity") if isinstance(sec.get("fidelity"), dict) else {}
    out: dict[str, Any] = {"go": "faithful" if plan.go_faithful else "refused",
                           "classes": fidelity.get("failed_shapes", []) if sec["translated"] else ["structure"],
                           "reason": sec.get("reason", "")[:160],
                           "think_switch": bool(plan.fmt and plan.fmt.uses_think_flag)}
    renders = sec["renders_with"][">=0.30"]
    kind = ("native" if "native" in renders else "registry" if "registry" in renders else "template")
    out["auto"] = ("TEMPLATE, " if sec["template_written"] else "no TEMPLATE, ") + kind + (
        ", llama.cpp departs" if sec.get("llama_cpp_departures") else "")
    return out


def main(argv: list[str] | None = None) -> int:
    from tests.tinymodels import build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--llama-server", type=Path, default=None, help="measure the native path with this binary")
    ap.add_argument("--gguf", type=Path, default=None, help="model llama-server loads (its template is replaced)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer matching the GGUF's vocabulary")
    args = ap.parse_args(argv)
    files = sorted(args.corpus.glob("*.jinja"))
    if args.llama_server:
        return _native(args, files)
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



def _native(args: argparse.Namespace, files: list[Path]) -> int:
    import os

    from transformers import AutoTokenizer

    from grpoctl.manifests.ollama import check_native

    os.environ["GRPOCTL_LLAMA_CPP_BIN"] = str(args.llama_server.parent)
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    results: dict[str, Any] = {}
    for i, path in enumerate(files, 1):
        tok.chat_template = path.read_text()
        report = check_native(tok, args.gguf, None, "Be brief.", chat_template_file=path)
        results[path.stem] = {"passed": report.passed, "failures": report.failures}
        where = "; differ: " + ", ".join(c["name"] for c in report.failures) if report.failures else ""
        print(f"[{i}/{len(files)}] {path.stem:46s} {len(report.cases) - len(report.failures)}/{len(report.cases)} "
              f"equal{where}", file=sys.stderr, flush=True)
    print(f"templates: {len(files)}; llama.cpp renders like transformers on every conversation Ollama can send: "
          f"{sum(r['passed'] for r in results.values())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
