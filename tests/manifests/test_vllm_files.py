"""The vLLM files ``write_manifests`` leaves in an export, started as far as this CPU machine allows:
every container path resolves to a mount, every mounted host path exists, the image is the tested vLLM,
and the argv passes `vllm serve`'s argument rules (followed from vLLM's source: vLLM is not installed here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from grpoctl.artifacts import Artifacts
from grpoctl.manifests.api import write_manifests
from grpoctl.rundir import RunDir
from tests.manifests.conftest import write_export, write_run
from tests.manifests.vllm_source_parser import parse

REPO = Path(__file__).resolve().parents[2]


def _export(tmp_path: Path, tokenizer_dir: Path, *, base_id: str, base_path: str | None = None,
            adapter: dict | None = None, merged: bool = False, revision: str | None = None) -> Path:
    run = write_run(tmp_path / "run", tokenizer_dir, base_id=base_id, base_path=base_path)
    meta = json.loads((run / "run.json").read_text())
    meta["base_model"]["revision"] = revision
    (run / "run.json").write_text(json.dumps(meta))
    if adapter:
        cfg = run / "adapter" / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **adapter}))
    export = write_export(run, quants=(), merged=merged, lora=True)
    write_manifests(export, run=RunDir(run))
    return export


def _compose(export: Path, suffix: str = "-lora") -> dict:
    return yaml.safe_load((export / "vllm" / f"docker-compose{suffix}.yml").read_text())["services"]["vllm"]


def _k8s_container(export: Path, suffix: str = "-lora") -> dict:
    docs = list(yaml.safe_load_all((export / "vllm" / f"k8s{suffix}.yaml").read_text()))
    return docs[1]["spec"]["template"]["spec"]["containers"][0]


def _container_paths(argv: list[str]) -> list[str]:
    """Every argument that names a path inside the container (the model, --tokenizer, --lora-modules ...)."""
    out = []
    for i, a in enumerate(argv):
        if argv[i - 1] == "--lora-modules" and "=" in a:
            a = a.split("=", 1)[1]
        if a.startswith("/"):
            out.append(a)
    return out


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def assert_compose_resolves(export: Path, suffix: str) -> dict:
    """Compose as `docker compose up` would start it: bind sources exist, every path the argv uses is mounted."""
    svc = _compose(export, suffix)
    binds = [v.replace("$$", "$").split(":") for v in svc["volumes"]]
    mounts = [target for _, target, *_ in binds]
    for source, target, *_ in binds:
        if "/" in source or source.startswith("."):  # a bind mount, not the named hf-cache volume
            assert (export / "vllm" / source).resolve().exists(), f"{source} (mounted at {target}) does not exist"
    argv = [a.replace("$$", "$") for a in svc["command"]]
    for p in _container_paths(argv):
        assert _under(p, mounts), f"{p} is used by the command but not under any mount ({mounts})"
    return svc


def assert_k8s_resolves(export: Path, suffix: str) -> dict:
    c = _k8s_container(export, suffix)
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    for p in _container_paths(c["args"]):
        assert _under(p, mounts), f"{p} is used by the container but not under any volumeMount ({mounts})"
    return c


def _serve_sh_argv(export: Path, suffix: str) -> list[str]:
    """Run serve.sh with `vllm` on PATH replaced by a program that prints the argv it was given."""
    bindir = export.parent / "fake-bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "vllm"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[2:]))\n")  # after `serve`
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(export / "vllm" / f"serve{suffix}.sh")], capture_output=True, text=True,
                          env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_lora_files_on_a_local_base_mount_it_and_name_it_by_its_folder(tmp_path, base_tokenizer_dir):
    base = base_tokenizer_dir.resolve()
    export = _export(tmp_path, base_tokenizer_dir, base_id=str(base), base_path=str(base), merged=True)
    svc = assert_compose_resolves(export, "-lora")
    assert f"{base}:/base:ro" in svc["volumes"]
    argv = [a.replace("$$", "$") for a in svc["command"]]
    assert argv[0] == "/base"
    served = argv[argv.index("--served-model-name") + 1]
    assert served == base.name and "/" not in served  # a name a client can ask for, not a host path
    c = assert_k8s_resolves(export, "-lora")
    assert c["args"][0] == "/base" and {"name": "cache", "mountPath": "/base", "subPath": "base",
                                        "readOnly": True} in c["volumeMounts"]
    host = _serve_sh_argv(export, "-lora")  # serve.sh runs on this machine: the folder itself
    assert host[0] == str(base) and all(Path(p).exists() for p in _container_paths(host))


def test_lora_files_on_a_hub_base_name_the_hub_id_at_the_trained_revision(tmp_path, base_tokenizer_dir):
    export = _export(tmp_path, base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", revision="c1899de2", merged=True)
    svc = assert_compose_resolves(export, "-lora")
    assert not any(":/base" in v for v in svc["volumes"])
    for argv in ([a.replace("$$", "$") for a in svc["command"]], assert_k8s_resolves(export, "-lora")["args"]):
        assert argv[0] == "Qwen/Qwen3-0.6B" and argv[argv.index("--revision") + 1] == "c1899de2"
        assert argv[argv.index("--served-model-name") + 1] == "Qwen/Qwen3-0.6B"


def test_merged_files_resolve_in_their_containers(tmp_path, base_tokenizer_dir):
    export = _export(tmp_path, base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", merged=True)
    assert_compose_resolves(export, "")
    assert_k8s_resolves(export, "")
    assert all(Path(p).exists() for p in _container_paths(_serve_sh_argv(export, "")))


def test_image_is_the_vllm_release_the_gpu_extra_pins(tmp_path, base_tokenizer_dir):
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pin = next(r.split("==", 1)[1] for r in gpu if r.startswith("vllm=="))
    export = _export(tmp_path, base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", merged=True)
    for suffix in ("", "-lora"):
        assert _compose(export, suffix)["image"] == f"vllm/vllm-openai:v{pin}"
        assert _k8s_container(export, suffix)["image"] == f"vllm/vllm-openai:v{pin}"


@pytest.mark.parametrize(("adapter", "rank"), [({"r": 8}, "8"), ({"r": 24}, "32"),
                                               ({"r": 16, "rank_pattern": {"q_proj": 64}}, "64")])
def test_max_lora_rank_covers_the_adapters_largest_rank(tmp_path, base_tokenizer_dir, adapter, rank):
    export = _export(tmp_path, base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", adapter=adapter)
    argv = _serve_sh_argv(export, "")
    assert argv[argv.index("--max-lora-rank") + 1] == rank


@pytest.mark.parametrize(("adapter", "reason"), [
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save lm_head, embed_tokens"),
    ({"use_dora": True}, "DoRA"),
    ({"r": 1024}, "rank 1024"),
])
def test_adapters_vllm_cannot_load_as_lora_are_served_merged_following_vllm_source(
        tmp_path, base_tokenizer_dir, adapter, reason):
    """vllm/lora/peft_helper.py refuses these adapters when a request first uses them; no -lora files then."""
    export = _export(tmp_path, base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", adapter=adapter, merged=True)
    files = sorted(p.name for p in (export / "vllm").iterdir())
    assert files == ["docker-compose.yml", "k8s.yaml", "serve.sh"]
    assert "--enable-lora" not in _serve_sh_argv(export, "")
    notes = Artifacts.load(export).manifests.notes
    assert any(reason in n and "serve the merged model" in n for n in notes), notes


def test_every_written_argv_passes_vllm_serve_argument_rules_followed_from_vllm_source(tmp_path, base_tokenizer_dir):
    exports = [_export(tmp_path / "hub", base_tokenizer_dir, base_id="Qwen/Qwen3-0.6B", merged=True,
                       revision="c1899de2"),
               _export(tmp_path / "local", base_tokenizer_dir, base_id=str(base_tokenizer_dir.resolve()),
                       base_path=str(base_tokenizer_dir.resolve()), adapter={"r": 24})]
    for export in exports:
        for suffix in ("", "-lora"):
            if not (export / "vllm" / f"serve{suffix}.sh").is_file():
                continue
            for argv in (_serve_sh_argv(export, suffix),
                         [a.replace("$$", "$") for a in _compose(export, suffix)["command"]],
                         _k8s_container(export, suffix)["args"]):
                ns = parse(argv)
                if "--enable-lora" in argv:
                    assert ns.enable_lora and ns.max_lora_rank >= 24 and len(ns.lora_modules) == 1
                assert ns.max_model_len == 1536 and ns.port == 8000


@pytest.mark.parametrize("broken", [
    ["--max-lora-rank", "24"],  # not one of vLLM's MaxLoRARanks
    ["--dtype", "bf16"],  # not a ModelDType
    ["--lora-modules", "name=/models/lo=ra"],  # LoRAParserAction unpacks exactly one "="
    ["--max-lora-ranks", "32"],  # no such option
    ["--override-generation-config", "temperature=1"],  # not JSON
])
def test_the_argument_rules_reject_what_vllm_rejects(broken):
    ok = ["/models/merged", "--served-model-name", "m", "--port", "8000"]
    parse(ok)
    with pytest.raises(Exception):  # noqa: B017  (argparse's error, or the ValueError vLLM's own action raises)
        parse(ok + broken)


def test_the_mount_check_fails_on_a_file_that_uses_an_unmounted_path(tmp_path, base_tokenizer_dir):
    """A compose file naming the base by a host path that nothing mounts into the container."""
    base = base_tokenizer_dir.resolve()
    export = _export(tmp_path, base_tokenizer_dir, base_id=str(base), base_path=str(base), merged=True)
    path = export / "vllm" / "docker-compose-lora.yml"
    doc = yaml.safe_load(path.read_text())
    svc = doc["services"]["vllm"]
    svc["command"][0] = str(base)
    svc["volumes"] = [v for v in svc["volumes"] if not v.endswith(":/base:ro")]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError, match="not under any mount"):
        assert_compose_resolves(export, "-lora")
    svc["volumes"].append(f"{tmp_path / 'gone'}:/elsewhere:ro")
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError, match="does not exist"):
        assert_compose_resolves(export, "-lora")
