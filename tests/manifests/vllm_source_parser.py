"""`vllm serve`'s argument rules for the options grpoctl writes, declared the way vLLM declares them.

vLLM is not installable on this CPU machine, so this follows its source (read through the project's
code search, not imported):

- vllm/engine/arg_utils.py (EngineArgs.add_cli_args): ``--served-model-name`` (nargs "+"), ``--tokenizer``,
  ``--revision``, ``--dtype`` (ModelDType in vllm/config/model.py: auto, half, float16, bfloat16, float,
  float32), ``--max-model-len`` (an integer, "1k"-style suffixes also accepted), ``--quantization``,
  ``--generation-config`` (a string, default "auto"), ``--override-generation-config`` (JSON object),
  ``--gpu-memory-utilization`` (float), ``--tensor-parallel-size`` / ``--data-parallel-size`` (int),
  ``--enable-lora`` (boolean flag), ``--max-lora-rank`` (MaxLoRARanks in vllm/config/lora.py),
  ``--reasoning-parser`` (names registered in vllm/reasoning/__init__.py).
- vllm/entrypoints/openai/cli_args.py: the positional model tag, ``--host``, ``--port``, ``--chat-template``
  and ``--lora-modules`` with its LoRAParserAction: an item with "=" and no "," is ``name=path`` split on
  "=" (so exactly one "="), anything else must be a JSON object with ``name`` and ``path``.

A plain argparse parser with these declarations rejects unknown options, wrong types and values outside
the choices, which is what vLLM's own parser does with them. When vLLM is installed the real parser is
used instead (tests/manifests/test_vllm.py).
"""

from __future__ import annotations

import argparse
import json

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODEL_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# a subset of vllm/reasoning/__init__.py's registry: the parsers grpoctl can choose, plus neighbours
REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "qwen3", "granite", "mistral", "glm45")
# a subset of vLLM's quantization methods (vllm/model_executor/layers/quantization/__init__.py)
QUANTIZATION = ("awq", "gptq", "fp8", "bitsandbytes", "gguf", "compressed-tensors")


class _Error(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of sys.exit, so a test sees why
        raise _Error(message)


def _human_int(text: str) -> int:
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    if text and text[-1].lower() in units:
        return int(float(text[:-1]) * units[text[-1].lower()])
    return int(text)


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expects a JSON object")
    return value


class _LoRAParserAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values:
            if not item:
                continue
            if "=" in item and "," not in item:
                name, path = item.split("=")  # vLLM's own unpacking: a second "=" is an error there too
                modules.append((name, path))
            else:
                try:
                    d = json.loads(item)
                except json.JSONDecodeError:
                    parser.error(f"Invalid JSON format for --lora-modules: {item}")
                modules.append((d["name"], d["path"]))
        setattr(namespace, self.dest, modules)


def vllm_serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm serve", allow_abbrev=False)
    p.add_argument("model_tag")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--tokenizer")
    p.add_argument("--revision")
    p.add_argument("--dtype", choices=MODEL_DTYPES)
    p.add_argument("--max-model-len", type=_human_int)
    p.add_argument("--quantization", choices=QUANTIZATION)
    p.add_argument("--generation-config")
    p.add_argument("--override-generation-config", type=_json_object)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--data-parallel-size", type=int)
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction)
    p.add_argument("--max-lora-rank", type=int, choices=MAX_LORA_RANKS)
    p.add_argument("--lora-modules", nargs="+", action=_LoRAParserAction)
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS)
    p.add_argument("--chat-template")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (without the leading ``vllm serve``); raises with argparse's reason when vLLM would refuse."""
    return vllm_serve_parser().parse_args(argv)
