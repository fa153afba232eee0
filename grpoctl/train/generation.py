"""Which engine writes the completions GRPO learns from: vLLM or transformers' ``generate``.

Generation is most of a GRPO step. vLLM (paged attention, continuous batching, CUDA graphs) is where the
tutorial's speed comes from; transformers' ``generate`` runs everywhere. ``trainer.generation`` chooses:

    vllm   vLLM, or a clear error where it cannot run (no CUDA GPU, vLLM not installed)
    hf     transformers' generate
    auto   vLLM when a CUDA GPU and vLLM are there, else generate; one line says which and why

With vLLM, the Unsloth backend uses Unsloth's own engine in the training process (``fast_inference``: the
LoRA weights are shared with vLLM, not copied). The TRL backend runs TRL's vLLM integration in one of two
modes (``trainer.vllm_mode``): ``colocate``, vLLM inside the training process on the same GPU, or
``server``, a vLLM server on a GPU set aside for it, started and stopped by grpoctl
(:mod:`grpoctl.train.vllm_server`); ``auto`` is server where a visible GPU is left over by the training
processes, else colocate. Either way TRL pushes the merged weights to vLLM before each step's generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpoctl.config import GENERATIONS, VLLM_MODES
from grpoctl.errors import ConfigError, DependencyError


@dataclass(frozen=True)
class Generation:
    engine: str  # "vllm" | "hf"
    mode: str | None  # vllm only: "colocate" | "server" (unsloth: always its in-process engine, "colocate")
    reason: str  # why, in words: printed once and recorded in run.json

    def line(self) -> str:
        what = "transformers generate" if self.engine == "hf" else f"vLLM ({self.mode})"
        return f"generation: {what}: {self.reason}"


def vllm_version() -> str | None:
    """The installed vLLM's version, read from its metadata (importing vLLM takes seconds and a GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def pick_generation(requested: str, vllm_mode: str, backend: str, *, cuda: bool, vllm: str | None,
                    gpus: int, processes: int, load_in_4bit: bool = False) -> Generation:
    """Resolve ``trainer.generation`` / ``trainer.vllm_mode`` for this machine (a pure function of its inputs).

    ``gpus``: the CUDA devices visible to the launch; ``processes``: training processes, one per GPU."""
    if requested not in GENERATIONS:
        raise ConfigError(f"trainer.generation must be one of {', '.join(GENERATIONS)}, not {requested!r}")
    if vllm_mode not in VLLM_MODES:
        raise ConfigError(f"trainer.vllm_mode must be one of {', '.join(VLLM_MODES)}, not {vllm_mode!r}")
    if requested == "hf":
        return Generation("hf", None, "trainer.generation=hf")
    missing = ("no CUDA GPU" if not cuda else
               "vLLM is not installed (pip install 'grpoctl[gpu]')" if vllm is None else None)
    if missing:
        if requested == "vllm":
            raise DependencyError(f"trainer.generation=vllm needs a CUDA GPU and vLLM: {missing}; "
                                  "use --generation hf (or auto)")
        return Generation("hf", None, missing)
    if backend == "unsloth":
        if vllm_mode == "server":
            raise ConfigError("trainer.vllm_mode=server applies to --backend trl; Unsloth generates with its own "
                              "vLLM engine inside the training process (set trainer.vllm_mode=auto or colocate)")
        return Generation("vllm", "colocate", f"vLLM {vllm} through Unsloth (fast_inference, LoRA shared in memory)")
    if load_in_4bit and requested == "auto":
        # TRL pushes the merged weights into vLLM every step; with a bitsandbytes 4-bit base those are 4-bit
        # tensors re-quantized by PEFT's merge, a path grpoctl has not run. Unsloth shares 4-bit weights instead.
        return Generation("hf", None, "a 4-bit base with --backend trl (vLLM generation for a 4-bit base runs "
                                      "through --backend unsloth; --generation vllm forces TRL's)")
    spare = gpus - processes
    if vllm_mode == "server" and spare < 1:
        raise ConfigError(f"trainer.vllm_mode=server needs a GPU for the vLLM server besides the {processes} "
                          f"training process(es), but {gpus} GPU(s) are visible; use trainer.vllm_mode=colocate "
                          "or lower --num-processes")
    mode = vllm_mode if vllm_mode != "auto" else ("server" if spare >= 1 else "colocate")
    where = (f"a vLLM server on GPU {processes} of {gpus}, training on the other(s)" if mode == "server"
             else "vLLM in the training process, sharing its GPU")
    return Generation("vllm", mode, f"vLLM {vllm} through TRL: {where}")
