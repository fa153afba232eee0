"""vLLM manifests: argv through a real bash, YAML against the Kubernetes and Compose schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpoctl.errors import UsageError
from grpoctl.manifests.vllm import (
    VllmPlan,
    compose_dict,
    docker_compose_yml,
    k8s_objects,
    k8s_yaml,
    max_lora_rank,
    serve_sh,
)

DATA = Path(__file__).parent / "data"
HOSTILE_NAME = "evil'$(touch${IFS}pwned)`id`;\"x\"&|<>*?$HOME${PATH}"


def _plans() -> list[VllmPlan]:
    return [
        VllmPlan(mode="merged", served_model_name="tiny-grpo", model="merged", max_model_len=1536, dtype="bfloat16",
                 sampling={"temperature": 1.0, "top_p": 0.95}, reasoning_parser="qwen3"),
        VllmPlan(mode="merged-4bit", served_model_name="tiny-grpo", model="merged-4bit", quantization="bitsandbytes"),
        VllmPlan(mode="lora", served_model_name="tiny-grpo", model="Qwen/Qwen3-0.6B", model_is_ref=True,
                 lora_path="lora", lora_rank=32, tokenizer="lora", chat_template="chat_template.jinja",
                 tensor_parallel_size=2,
                 gpu_memory_utilization=0.8, port=9000),
        VllmPlan(mode="merged", served_model_name=HOSTILE_NAME, model="merged"),
        VllmPlan(mode="lora", served_model_name="tiny-grpo", model="Qwen/Qwen3-0.6B", model_is_ref=True,
                 lora_path="lora", lora_rank=32, tokenizer="lora", tensor_parallel_size=2, data_parallel_size=3),
    ]


def _id(plan: VllmPlan) -> str:
    return (plan.mode + ("-hostile" if "$" in plan.served_model_name else "")
            + (f"-tp{plan.tensor_parallel_size}-dp{plan.data_parallel_size}" if plan.gpus > 1 else ""))


def _run_serve_sh(tmp_path: Path, plan: VllmPlan, extra: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Run serve.sh with `vllm` replaced by a program that prints its argv as JSON."""
    export = tmp_path / "export dir with spaces $x"
    (export / "vllm").mkdir(parents=True)
    script = export / "vllm" / "serve.sh"
    script.write_text(serve_sh(plan))
    script.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "vllm"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    run_env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, env=run_env,
                          cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pwned").exists()
    return json.loads(proc.stdout), export


@pytest.mark.parametrize("plan", _plans(), ids=_id)
def test_serve_sh_passes_exact_argv(tmp_path, plan):
    argv, export = _run_serve_sh(tmp_path, plan, ["--max-num-seqs", "8"])
    expected = ["serve"] + plan.args(str(export.resolve()), str((export / "vllm").resolve()))
    expected += ["--host", "0.0.0.0", "--port", str(plan.port), "--max-num-seqs", "8"]
    assert argv == expected


def test_serve_sh_env_overrides(tmp_path):
    argv, _ = _run_serve_sh(tmp_path, _plans()[0], [], env={"PORT": "9123", "HOST": "127.0.0.1"})
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "9123"]


def test_lora_flags_and_rank_rounding():
    plan = _plans()[2]
    args = plan.args("/m", "/v")
    assert args[0] == "Qwen/Qwen3-0.6B"
    assert args[args.index("--lora-modules") + 1] == "tiny-grpo=/m/lora"
    assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "32"
    assert args[args.index("--chat-template") + 1] == "/v/chat_template.jinja"
    assert args[args.index("--tokenizer") + 1] == "/m/lora"
    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 33, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(UsageError, match="largest rank"):
        max_lora_rank(1024)


def test_merged_flags_from_run():
    args = _plans()[0].args("/m", "/v")
    assert args[:3] == ["/m/merged", "--served-model-name", "tiny-grpo"]
    assert args[args.index("--max-model-len") + 1] == "1536"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert args[args.index("--generation-config") + 1] == "auto"
    assert json.loads(args[args.index("--override-generation-config") + 1]) == {"temperature": 1.0, "top_p": 0.95}
    assert args[args.index("--reasoning-parser") + 1] == "qwen3"
    assert "--chat-template" not in args and "--quantization" not in args
    args4 = _plans()[1].args("/m", "/v")
    assert args4[args4.index("--quantization") + 1] == "bitsandbytes"
    assert args[args.index("--tensor-parallel-size") + 1] == "1" == args[args.index("--data-parallel-size") + 1]


def test_tensor_and_data_parallel_flags_reach_vllm_and_gpu_counts(tmp_path):
    """TP x DP GPUs: both flags in the argv bash hands to vllm, and Compose/Kubernetes reserve that many."""
    plan = _plans()[-1]
    assert plan.gpus == 6
    argv, _ = _run_serve_sh(tmp_path, plan, [])
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--data-parallel-size") + 1] == "3"
    assert compose_dict(plan)["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 6
    container = k8s_objects(plan)[1]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "6"


@pytest.mark.parametrize("bad", [dict(served_model_name="has space"), dict(served_model_name="a=b"),
                                 dict(served_model_name="line\nbreak"), dict(served_model_name="a,b"),
                                 dict(served_model_name="-dash"),  # argparse reads it as an option
                                 dict(gpu_memory_utilization=1.5),
                                 dict(tensor_parallel_size=0), dict(data_parallel_size=0), dict(port=70000)])
def test_bad_plan_values_are_refused(bad):
    kw = dict(mode="merged", served_model_name="m", model="merged") | bad
    with pytest.raises(UsageError):
        VllmPlan(**kw)


@pytest.mark.parametrize("plan", _plans(), ids=_id)
def test_kubernetes_objects_validate_against_schema(plan):
    import kubernetes_validate

    docs = list(yaml.safe_load_all(k8s_yaml(plan)))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    dep = docs[1]["spec"]["template"]["spec"]
    c = dep["containers"][0]
    assert c["args"] == plan.args("/models", "/models/vllm") + ["--host", "0.0.0.0", "--port", "8000"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(plan.tensor_parallel_size * plan.data_parallel_size)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" == c["livenessProbe"]["httpGet"]["path"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{4 * plan.gpus}Gi"}} \
        in dep["volumes"]
    assert docs == k8s_objects(plan)  # the YAML text holds exactly the objects, hostile names included


def _compose_validator():
    import jsonschema

    schema = json.loads((DATA / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)  # the schema's own $schema (draft 2019-09)


@pytest.mark.parametrize("plan", _plans(), ids=_id)
def test_compose_file_validates_against_compose_spec(plan):
    doc = yaml.safe_load(docker_compose_yml(plan))
    errors = sorted(_compose_validator().iter_errors(doc), key=str)
    assert not errors, errors[0]
    svc = doc["services"]["vllm"]
    assert svc["image"].startswith("vllm/vllm-openai") and svc["ipc"] == "host"
    device = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == plan.tensor_parallel_size * plan.data_parallel_size
    assert any(v.endswith(":/root/.cache/huggingface") for v in svc["volumes"])
    assert svc["ports"] == [f"{plan.port}:8000"]
    # Compose interpolates $VAR: literal dollars are doubled, so the container sees the exact argv
    unescaped = [a.replace("$$", "$") for a in svc["command"]]
    assert unescaped == plan.args("/models", "/manifests") + ["--host", "0.0.0.0", "--port", "8000"]
    assert doc == compose_dict(plan)


def _vllm_parser():
    """`vllm serve`'s argument parser from the installed vLLM (module paths moved across releases)."""
    import importlib

    for cli_mod, util_mod in (("vllm.entrypoints.common.cli_args", "vllm.utils.argparse_utils"),
                              ("vllm.entrypoints.openai.cli_args", "vllm.utils.argparse_utils"),
                              ("vllm.entrypoints.openai.cli_args", "vllm.utils")):
        try:
            make_arg_parser = importlib.import_module(cli_mod).make_arg_parser
            parser_cls = importlib.import_module(util_mod).FlexibleArgumentParser
        except Exception:
            continue
        return make_arg_parser(parser_cls())
    return None


_PARSER = _vllm_parser()


@pytest.mark.skipif(_PARSER is None, reason="vLLM is not importable here (it is in the `gpu` extra)")
def test_vllm_own_parser_accepts_every_generated_command_when_vllm_is_installed():
    """Every flag name and value goes through the installed vLLM's `vllm serve` argument parser."""
    for plan in _plans():
        ns = _PARSER.parse_args(plan.args("/m", "/v") + ["--host", "0.0.0.0", "--port", "8000"])
        assert ns.model_tag == (plan.model if plan.model_is_ref else f"/m/{plan.model}")
        assert ns.tensor_parallel_size == plan.tensor_parallel_size
        assert ns.data_parallel_size == plan.data_parallel_size
        assert ns.gpu_memory_utilization == pytest.approx(plan.gpu_memory_utilization)
        if plan.mode == "lora":
            assert ns.enable_lora and ns.max_lora_rank == 32
            assert [(m.name, m.path) for m in ns.lora_modules] == [(plan.served_model_name, "/m/lora")]
            assert ns.tokenizer == "/m/lora"
        else:
            assert ns.served_model_name == [plan.served_model_name]
        if plan.sampling:
            assert ns.override_generation_config == plan.sampling
        if plan.reasoning_parser:
            assert ns.reasoning_parser == plan.reasoning_parser
        if plan.quantization:
            assert ns.quantization == plan.quantization
