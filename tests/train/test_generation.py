"""Who generates the completions: ``trainer.generation`` / ``trainer.vllm_mode`` resolved for the machine, and the
vLLM server of server mode started, awaited and always stopped (against a stub server on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from grpoctl.errors import ConfigError, DependencyError, ServeError
from grpoctl.train import vllm_server
from grpoctl.train.generation import pick_generation

GPU = dict(cuda=True, vllm="0.26.0", gpus=1, processes=1)


def test_auto_without_a_gpu_generates_with_transformers_and_says_why():
    g = pick_generation("auto", "auto", "trl", cuda=False, vllm="0.26.0", gpus=0, processes=1)
    assert (g.engine, g.mode) == ("hf", None) and "no CUDA GPU" in g.line()


def test_auto_without_vllm_generates_with_transformers_and_says_how_to_get_it():
    g = pick_generation("auto", "auto", "unsloth", cuda=True, vllm=None, gpus=1, processes=1)
    assert g.engine == "hf" and "pip install 'grpoctl[gpu]'" in g.reason


def test_an_explicit_vllm_that_cannot_run_is_a_dependency_error():
    with pytest.raises(DependencyError, match="no CUDA GPU"):
        pick_generation("vllm", "auto", "trl", cuda=False, vllm="0.26.0", gpus=0, processes=1)
    with pytest.raises(DependencyError, match="not installed"):
        pick_generation("vllm", "auto", "trl", cuda=True, vllm=None, gpus=1, processes=1)


def test_unsloth_generates_with_its_own_engine_and_refuses_server_mode():
    g = pick_generation("auto", "auto", "unsloth", **GPU)
    assert (g.engine, g.mode) == ("vllm", "colocate") and "Unsloth" in g.reason
    with pytest.raises(ConfigError, match="applies to --backend trl"):
        pick_generation("vllm", "server", "unsloth", **GPU)


def test_trl_colocates_on_one_gpu_and_serves_from_a_spare_one():
    assert pick_generation("auto", "auto", "trl", **GPU).mode == "colocate"
    two = pick_generation("auto", "auto", "trl", cuda=True, vllm="0.26.0", gpus=2, processes=1)
    assert two.mode == "server" and "GPU 1 of 2" in two.reason
    assert pick_generation("auto", "colocate", "trl", cuda=True, vllm="0.26.0", gpus=2, processes=1).mode == "colocate"
    with pytest.raises(ConfigError, match="needs a GPU for the vLLM server"):
        pick_generation("vllm", "server", "trl", cuda=True, vllm="0.26.0", gpus=2, processes=2)


def test_trl_on_a_4bit_base_stays_on_transformers_unless_forced():
    assert pick_generation("auto", "auto", "trl", load_in_4bit=True, **GPU).engine == "hf"
    assert pick_generation("vllm", "auto", "trl", load_in_4bit=True, **GPU).engine == "vllm"


def test_hf_is_always_possible():
    assert pick_generation("hf", "auto", "unsloth", **GPU).engine == "hf"


def test_bad_choices_fail_as_config_errors():
    from grpoctl.config import load_config

    with pytest.raises(ConfigError, match="trainer.generation must be one of"):
        load_config(overrides=["trainer.generation=fast"])
    with pytest.raises(ConfigError, match="trainer.vllm_mode must be one of"):
        load_config(overrides=["trainer.vllm_mode=remote"])


def test_train_with_generation_vllm_on_a_cpu_is_one_line_before_any_model_loads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "grpoctl", "train", "--generation", "vllm", "-o", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 6 and len(lines) == 1, r.stderr
    assert "trainer.generation=vllm needs a CUDA GPU and vLLM" in lines[0] and not (tmp_path / "r").exists()


# --- the server of vllm_mode=server, with a stub in place of TRL's vLLM command ----------------------------

STUB = textwrap.dedent("""
    import http.server, sys, time
    port, delay, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if mode == "die":
        print("ValueError: this model is not supported", flush=True)
        sys.exit(3)
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def stub_command(tmp_path, monkeypatch):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    modes = {"mode": "serve", "delay": "1.0"}

    def command(model: str, port: int, gpu_memory_utilization: float, max_model_len: int | None) -> list[str]:
        return [sys.executable, str(script), str(port), modes["delay"], modes["mode"]]

    monkeypatch.setattr(vllm_server, "server_command", command)
    return modes


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_server_mode_waits_for_health_and_stops_the_server_after(stub_command, tmp_path):
    import urllib.request

    seen: list[str] = []
    with vllm_server.running_server("m", "1", tmp_path / "vllm-server.log", gpu_memory_utilization=0.5,
                                    max_model_len=512, say=lambda *a, **k: seen.append(a[0])) as url:
        assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", "stub.py"], capture_output=True,
                                               text=True).stdout.split()]
    time.sleep(0.2)
    assert pids and not any(_alive(p) for p in pids)
    assert any("GPU 1" in s for s in seen) and any("ready" in s for s in seen)


def test_server_mode_stops_the_server_when_training_fails(stub_command, tmp_path):
    with pytest.raises(RuntimeError):
        with vllm_server.running_server("m", "0", tmp_path / "l.log", gpu_memory_utilization=0.5,
                                        max_model_len=None, say=lambda *a, **k: None):
            pids = [int(p) for p in subprocess.run(["pgrep", "-f", "stub.py"], capture_output=True,
                                                   text=True).stdout.split()]
            raise RuntimeError("training broke")
    time.sleep(0.2)
    assert pids and not any(_alive(p) for p in pids)


def test_a_server_that_dies_first_gives_its_reason_and_log(stub_command, tmp_path):
    stub_command["mode"] = "die"
    log = tmp_path / "vllm-server.log"
    with pytest.raises(ServeError, match="not supported") as e:
        with vllm_server.running_server("m", "0", log, gpu_memory_utilization=0.5, max_model_len=None,
                                        say=lambda *a, **k: None):
            pass
    assert str(log) in str(e.value)


def _trainer_args(overrides: list[str], gen) -> object:
    """The GRPOConfig a run would build, made by TRL's own class from grpoctl's arguments."""
    from types import SimpleNamespace

    import torch
    from trl import GRPOConfig

    from grpoctl.config import load_config
    from grpoctl.train.run import _grpo_args

    loaded = SimpleNamespace(model=torch.nn.Linear(2, 2), backend="trl")
    data = SimpleNamespace(max_completion_length=16)
    return GRPOConfig(**_grpo_args(load_config(overrides=overrides), loaded, data, [1.0], "adamw_torch",
                                   Path("/nonexistent"), gen))


def test_vllm_importance_sampling_correction_reaches_trl_only_when_set():
    """Unset keeps the backend's own default (Unsloth turns it off); set, TRL's config carries it, so a run can
    ask for the vllm_logp_diff metric, which the trainer computes only with the correction on."""
    from trl import GRPOConfig

    from grpoctl.train.generation import Generation

    vllm = Generation("vllm", "colocate", "test")
    default = GRPOConfig.__dataclass_fields__["vllm_importance_sampling_correction"].default
    assert _trainer_args([], vllm).vllm_importance_sampling_correction is default
    for value in (not default, default):
        args = _trainer_args([f"trainer.vllm_importance_sampling_correction={str(value).lower()}"], vllm)
        assert args.use_vllm and args.vllm_importance_sampling_correction is value
    # transformers' generate has no sampling log-probabilities to correct for: the setting is not passed
    hf = _trainer_args(["trainer.vllm_importance_sampling_correction=false"], Generation("hf", None, "test"))
    assert not hf.use_vllm and hf.vllm_importance_sampling_correction is default
