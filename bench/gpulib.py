"""Shared pieces of the GPU benchmarks: Qwen3-shaped random models, a per-GPU memory sampler, and a
subprocess runner that keeps each run's log and never lets one run take the whole benchmark down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# Qwen3's published configs (hidden sizes, heads, vocabulary); weights are random. "tiny" rehearses on a CPU.
QWEN3_SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1000000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=151936, tie_word_embeddings=False,
                 max_position_embeddings=4096, rope_theta=1000000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def default_tokenizer() -> Path:
    """The embedded SmolLM2 tokenizer: a real BPE with a chat template that llama.cpp's converter knows; the
    model's 151,936-row vocabulary extends past it (the converter pads the rest, decoding skips them)."""
    from grpoctl.models import embedded_model_dir

    return embedded_model_dir()


def build_qwen3_in_child(dest: Path, shape: str, tokenizer_dir: Path, device: str) -> Path:
    """``build_qwen3`` in a separate process, so the benchmark's own process never holds GPU memory."""
    if not (dest / "config.json").is_file():
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from gpulib import build_qwen3; "
                f"build_qwen3(__import__('pathlib').Path({str(dest)!r}), {shape!r}, {str(tokenizer_dir)!r}, "
                f"{device!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    return dest


def build_qwen3(dest: Path, shape: str, tokenizer_dir: Path, device: str = "cuda") -> Path:
    """A random bf16 Qwen3 of ``shape`` saved with transformers (built on ``device``; cached in ``dest``)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3Config

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    tok = AutoTokenizer.from_pretrained(tmp)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3Config(**QWEN3_SHAPES[shape], rms_norm_eps=1e-6, initializer_range=0.02, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=config.pad_token_id)
    model.save_pretrained(tmp)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tmp.rename(dest)
    return dest


class GpuSampler:
    """Peak memory used (MiB) and mean utilisation (%) per GPU, polled from nvidia-smi every 0.5 s.

    Counts what the driver sees (CUDA context and the allocator's cache included), one figure per GPU, so
    each process of a one-process-per-GPU run has its own column. Empty where nvidia-smi is absent."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.util: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.strip().splitlines():
                idx, mem, util = (int(x.strip()) for x in line.split(","))
                self.peak[idx] = max(self.peak.get(idx, 0), mem)
                self.util.setdefault(idx, []).append(util)
            self._stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict[str, dict[int, float]]:
        return {"peak_mib": dict(self.peak),
                "mean_util_pct": {i: round(sum(u) / len(u), 1) for i, u in self.util.items() if u}}


def run_logged(name: str, cmd: list[str], out: Path, timeout: float, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> dict:
    """Run ``cmd`` with its output in ``out/name.log``; a timeout or failure is recorded, not raised."""
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = "timeout"
    return {"name": name, "rc": rc, "process_wall_s": round(time.perf_counter() - start, 1),
            "command": " ".join(cmd)}


def stop(proc: subprocess.Popen) -> None:
    """End a run and everything it started. SIGTERM first: torchrun (under accelerate launch) starts its
    workers in sessions of their own and ends them only when it is asked to, so a SIGKILL to the launcher's
    group alone leaves them training on the GPUs."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(out: Path, name: str, chars: int = 2500) -> str:
    text = (out / f"{name}.log").read_text(errors="replace")
    return text[-chars:]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for mod in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "unsloth", "bitsandbytes",
                "vllm", "llama_cpp_python"):
        try:
            found[mod] = version(mod)
        except PackageNotFoundError:
            found[mod] = None
    try:  # not through torch: this process must hold no CUDA context while the runs are measured
        found["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["gpus"] = None
    found["cpus"] = str(os.cpu_count())
    return found


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
