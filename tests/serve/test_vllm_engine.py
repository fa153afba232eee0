"""``grpoctl serve --engine vllm``: bad input, and the whole path against a stub vLLM server on the CPU.

The stub (tests/serve/stub_vllm) answers vLLM's command line and OpenAI endpoints with transformers, so these
tests prove grpoctl's side: the manifests' argv reaches the server, /health and /v1/models gate readiness,
the smoke chat and prompt log-probability parity run, pid/lock/log files and ``--stop`` work. The real vLLM
runs the same commands on a GPU machine (bench/vllm_gpu.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_run

ROOT = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent / "stub_vllm"


def grpoctl(*args: str, stub: bool = True, extra_env: dict | None = None, timeout: float = 600):
    path = os.pathsep.join([str(STUB), str(ROOT)] if stub else [str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "grpoctl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def one_line(result, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("grpoctl: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_qwen3) -> Path:
    """A run whose export holds the merged model, the LoRA adapter and both sets of vLLM manifests."""
    run = make_run(tmp_path_factory.mktemp("vllm") / "run", tiny_qwen3)
    result = grpoctl("export", run, "--merged", "16bit", "--lora", "-q", stub=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_the_export_records_both_vllm_modes_with_their_argv(vllm_run):
    art = json.loads((vllm_run / "export" / "artifacts.json").read_text())
    modes = {m["mode"]: m["argv"] for m in art["manifests"]["vllm"]["modes"]}
    assert set(modes) == {"merged", "lora"}
    assert modes["merged"][0] == "$EXPORT_DIR/merged" and "--enable-lora" in modes["lora"]


def test_a_gguf_only_export_is_refused_with_the_export_that_would_serve(tmp_path):
    from grpoctl.models import embedded_gguf_path
    from tests.serve.exports import make_export, write_run

    run = write_run(tmp_path / "run")
    make_export(run / "export", {"q4_1": embedded_gguf_path()})
    line = one_line(grpoctl("serve", run, "--engine", "vllm"), 3)
    assert "no merged model or LoRA adapter" in line and "--merged 16bit" in line


def test_a_gguf_file_is_refused_for_vllm(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert "--engine llamacpp" in one_line(grpoctl("serve", gguf, "--engine", "vllm"), 2)


@pytest.mark.parametrize("args", [["--engine", "vllm", "--quant", "q4_k_m"], ["--parity"], ["--vllm-mode", "lora"]])
def test_flags_of_another_engine_are_refused(vllm_run, args):
    one_line(grpoctl("serve", vllm_run, *args), 2)


def test_an_unknown_vllm_mode_of_this_export_says_which_it_has(vllm_run):
    line = one_line(grpoctl("serve", vllm_run, "--engine", "vllm", "--vllm-mode", "merged-4bit"), 3)
    assert "merged, lora" in line


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_installed_the_engine_says_how_to_get_it(vllm_run):
    assert "pip install 'grpoctl[gpu]'" in one_line(grpoctl("serve", vllm_run, "--engine", "vllm", stub=False), 6)


def test_a_taken_port_is_one_line(vllm_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = one_line(grpoctl("serve", vllm_run, "--engine", "vllm", "--port", port, "--smoke"), 11)
    assert f"port {port}" in line and "in use" in line


def test_merged_model_smoke_and_parity_against_a_stub_vllm_server(vllm_run):
    result = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", "0", "--vllm-mode", "merged", "--smoke",
                     "--parity")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "smoke: ok" in out and "system: You are a careful math tutor." in out
    row = next(ln for ln in out.splitlines() if ln.startswith("vLLM merged"))
    assert row.rstrip().endswith("pass")
    export = vllm_run / "export"
    art = json.loads((export / "artifacts.json").read_text())
    rec = art["served_parity"]["vllm:merged"]
    # the merged weights are bf16: the reference's own bf16 rounding is the scale of the difference
    assert rec["passed"] and rec["positions"] > 100 and rec["top1"] > 0.9 and rec["kl_topk"] <= rec["kl_floor"]
    assert "vllm/parity-merged.json" in {f["path"] for f in art["files"]}
    assert json.loads((export / "vllm" / "parity-merged.json").read_text())["served"][0]["mode"] == "merged"


def test_adapter_parity_passes_and_fails_when_the_server_drops_the_adapter(vllm_run):
    good = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", "0", "--vllm-mode", "lora", "--parity")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", "0", "--vllm-mode", "lora", "--parity",
                  extra_env={"STUB_VLLM_DROP_LORA": "1"})
    assert bad.returncode == 1, bad.stdout + bad.stderr
    row = next(ln for ln in bad.stdout.splitlines() if ln.startswith("vLLM lora"))
    assert row.rstrip().endswith("FAIL")
    rec = json.loads((vllm_run / "export" / "artifacts.json").read_text())["served_parity"]["vllm:lora"]
    assert not rec["passed"] and rec["kl_topk"] > rec["kl_floor"]


def test_detach_writes_a_vllm_pid_file_and_stop_ends_it(vllm_run, tmp_path):
    from grpoctl.serve.llamacpp import free_port

    port = free_port()
    started = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", port, "--detach")
    assert started.returncode == 0, started.stdout + started.stderr
    state = Path(os.environ["GRPOCTL_CACHE"]) / "serve"
    pid = int((state / f"vllm-{port}.pid").read_text())
    try:
        again = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", port, "--smoke")
        assert "a grpoctl vLLM server already runs" in one_line(again, 11) or "in use" in again.stderr
        stopped = grpoctl("serve", "--stop", "--port", port)
        assert stopped.returncode == 0 and f"stopped vLLM server on port {port} (pid {pid})" in stopped.stdout
        assert not (state / f"vllm-{port}.pid").exists()
    finally:
        try:
            os.killpg(pid, 9)
        except OSError:
            pass


def test_smoke_counts_an_answer_the_reasoning_parser_kept_as_reasoning(vllm_run):
    """Seen on a GPU: a template that pre-fills <think> and an answer cut at max_tokens come back from vLLM's
    reasoning parser with no `content`, only `reasoning_content`; that is an answer, not an empty one."""
    r = grpoctl("serve", vllm_run, "--engine", "vllm", "--port", "0", "--vllm-mode", "merged", "--smoke",
                "--max-tokens", "8", extra_env={"STUB_VLLM_ALL_REASONING": "1"})
    assert r.returncode == 0 and "smoke: ok" in r.stdout, r.stdout + r.stderr
    assert "answer: <empty>" not in r.stdout

