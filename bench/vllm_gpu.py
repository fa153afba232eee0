"""vLLM on a GPU machine: GRPO generation through vLLM against transformers' generate, and the vLLM serving path.

    python bench/vllm_gpu.py serve OUTDIR [--deadline-s 560]
        a tiny vLLM-friendly Qwen3 (the test fixture's tokenizer), a run with a trained-looking LoRA, then
        `grpoctl export RUN --merged 16bit --lora`; every argv the vLLM manifests record (serve.sh, Compose's
        command, Kubernetes' args) parsed by vLLM's own CLI parser; `grpoctl serve --engine vllm --smoke --parity`
        for the merged model and for base + LoRA; serve.sh and serve-lora.sh started as written, each answering
        a chat request with the training system prompt.
    python bench/vllm_gpu.py train OUTDIR --backend unsloth|trl [--engines vllm,hf] [--steps 5] [--completion 128]
                                   [--deadline-s 560]
    python bench/vllm_gpu.py report OUTDIR... (the ratios, from the runs of one call or of several)
        the tutorial's settings at the Qwen3-8B shape (random weights, a 151,936-token vocabulary, LoRA r32 on
        the seven projections, 4 completions per prompt, lr 5e-6, 8-bit AdamW; unsloth: 4-bit base, its
        gradient checkpointing; trl: 16-bit base): one run with --generation vllm, one with --generation hf,
        fixed completion length (random weights never stop early). Timing from `bench/steptimer.py`'s tick
        reward: steady s/step is the median spacing of steps 2..N, the first step the trainer's wall time minus
        the steady ones; generated tokens/s = completions x length / steady s/step; peak memory from
        nvidia-smi (the process and vLLM's reservation) and torch (the trainer's allocations).

Raw results: OUTDIR/*.json and each run's log; bench/vllm_gpu.md records what was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from gpulib import QWEN3_SHAPES, GpuSampler, log_tail, run_logged, versions, write_json  # noqa: E402
from steptimer import generation_times, step_times  # noqa: E402

WORK = Path(os.environ.get("VLLM_BENCH_WORK", "/root/vw"))


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_USE_FLASHINFER_SAMPLER": "0", **extra}


def grpoctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpoctl", *map(str, args)]


# --- models --------------------------------------------------------------------------------------------------

def wide_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level tokenizer with ``vocab_size`` entries (ChatML specials, <think>, the fixture's chat
    template): the 8B shape's vocabulary is Qwen3's 151,936 rows, and vLLM decodes every id it samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tinymodels import CHAT_TEMPLATE, SPECIALS

    out.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i in range(len(vocab), vocab_size - len(SPECIALS)):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def build_model(dest: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A random bf16 Qwen3 of ``shape`` with ``tokenizer_dir``'s tokenizer, built on the GPU in a child process."""
    if (dest / "config.json").is_file():
        return dest
    code = f"""
import shutil, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3Config
dest, tokdir = Path({str(dest)!r}), Path({str(tokenizer_dir)!r})
tmp = dest.with_name(dest.name + ".partial"); shutil.rmtree(tmp, ignore_errors=True)
shutil.copytree(tokdir, tmp)
tok = AutoTokenizer.from_pretrained(tmp)
eos = tok.convert_tokens_to_ids("<|im_end|>")
config = Qwen3Config(**{shape!r}, rms_norm_eps=1e-6, initializer_range=0.02, eos_token_id=eos,
                     pad_token_id=tok.pad_token_id, bos_token_id=None)
torch.manual_seed(0)
with torch.device({os.environ.get("VLLM_BENCH_DEVICE", "cuda")!r}):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
model.save_pretrained(tmp)
tmp.rename(dest)
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=env())
    return dest


TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, max_position_embeddings=2048)


def tiny_model() -> Path:
    from tests.tinymodels import build_tokenizer

    tok = WORK / "tiny-tok"
    if not (tok / "tokenizer.json").is_file():
        build_tokenizer(tok)
    from transformers import AutoTokenizer

    shape = {**TINY, "vocab_size": len(AutoTokenizer.from_pretrained(tok))}
    return build_model(WORK / "tiny", shape, tok)


# --- serve -------------------------------------------------------------------------------------------------

def wait_health(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                return time.time() - t
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("no /health")


def chat(base: str, model: str, system: str, question: str) -> dict:
    body = {"model": model, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def parse_with_vllm(argv_sets: dict[str, list[str]]) -> dict[str, str]:
    """Each argv through vLLM's own `vllm serve` parser (FlexibleArgumentParser + make_arg_parser)."""
    code = """
import json, sys
from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = {}
for name, argv in json.load(open(sys.argv[1])).items():
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
        out[name] = "ok: model=%s served=%s lora=%s reasoning=%s" % (
            args.model_tag if hasattr(args, "model_tag") else args.model, args.served_model_name,
            getattr(args, "lora_modules", None), getattr(args, "reasoning_parser", None))
    except SystemExit as e:
        out[name] = "FAILED: exit %s" % e.code
    except Exception as e:
        out[name] = "FAILED: %s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""
    spec = WORK / "argv.json"
    spec.write_text(json.dumps(argv_sets))
    r = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, env=env(),
                       timeout=300)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"parser": f"FAILED to run: {r.stderr[-1500:]}"}


def manifest_argvs(export: Path) -> dict[str, list[str]]:
    """Every `vllm serve` argv the manifests wrote: recorded (serve.sh's), Compose's command, Kubernetes' args."""
    import yaml

    art = json.loads((export / "artifacts.json").read_text())
    sets = {}
    for m in art["manifests"]["vllm"]["modes"]:
        sets[f"{m['mode']}:serve.sh"] = [a.replace("$EXPORT_DIR", str(export)).replace("$HERE", str(export / "vllm"))
                                         for a in m["argv"]]
        suffix = "" if m["mode"] == art["manifests"]["vllm"]["modes"][0]["mode"] else f"-{m['mode']}"
        compose = yaml.safe_load((export / "vllm" / f"docker-compose{suffix}.yml").read_text())
        sets[f"{m['mode']}:compose"] = [a.replace("$$", "$") for a in compose["services"]["vllm"]["command"]]
        docs = [d for d in yaml.safe_load_all((export / "vllm" / f"k8s{suffix}.yaml").read_text()) if d]
        deploy = next(d for d in docs if d["kind"] == "Deployment")
        sets[f"{m['mode']}:k8s"] = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return sets


def run_script(script: Path, port: int, log: Path, model: str, system: str, timeout: float) -> dict:
    """Start serve.sh as written (vLLM found on PATH as `vllm`), wait for /health, one chat, stop."""
    bindir = WORK / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "vllm"  # the GPU machine has vLLM as a package without its console script
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m vllm.entrypoints.cli.main \"$@\"\n")
    shim.chmod(0o755)
    e = env(PORT=str(port), HOST="127.0.0.1", PATH=f"{bindir}:{os.environ['PATH']}")
    t = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(script)], stdout=fh, stderr=subprocess.STDOUT, env=e,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_health(base, proc, timeout)
        resp = chat(base, model, system, "What is 9 + 5?")
        msg = resp["choices"][0]["message"]
        return {"ok": True, "ready_s": round(ready, 1), "answer": msg.get("content"),
                "reasoning": msg.get("reasoning_content") or msg.get("reasoning"),
                "finish": resp["choices"][0].get("finish_reason"), "wall_s": round(time.time() - t, 1)}
    except Exception as ex:  # noqa: BLE001 - recorded, the next step still runs
        return {"ok": False, "error": f"{type(ex).__name__}: {ex}", "log_tail": log.read_text()[-2500:]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def cmd_serve(out: Path, deadline: float, modes: list[str], scripts_only: set[str]) -> None:
    from tests.conftest import make_run

    start = time.time()
    left = lambda: deadline - (time.time() - start)  # noqa: E731
    results: dict = {"versions": versions()}
    model = tiny_model()
    run = WORK / "serve-run"
    shutil.rmtree(run, ignore_errors=True)
    make_run(run, model)
    results["export"] = run_logged("export", grpoctl("export", run, "--merged", "16bit", "--lora"), out,
                                   min(240, left()), env=env())
    export = run / "export"
    if results["export"]["rc"] != 0:
        results["export"]["log"] = log_tail(out, "export")
        write_json(out / "serve.json", results)
        return
    results["argv_parsed_by_vllm"] = parse_with_vllm(manifest_argvs(export))
    write_json(out / "serve.json", results)
    system = json.loads((run / "run.json").read_text())["config"]["data"]["system_prompt"]
    argvs = {m["mode"]: m["argv"] for m in json.loads((export / "artifacts.json").read_text())
             ["manifests"]["vllm"]["modes"]}
    # each mode's `grpoctl serve` then its script as written, so a short deadline still covers the first mode
    for mode in modes:
        name = f"grpoctl_serve_{mode}"
        if mode in scripts_only:
            results[name] = {"rc": "not run: --scripts-only"}
        elif left() < 60:
            results[name] = {"rc": "not run: no time left"}
        else:
            results[name] = run_logged(name, grpoctl("serve", run, "--engine", "vllm", "--vllm-mode", mode,
                                                     "--port", 0, "--smoke", "--parity"), out, min(300, left()),
                                       env=env())
            results[name]["output"] = log_tail(out, name, 3000)
        write_json(out / "serve.json", results)
        script = "serve.sh" if mode == "merged" else f"serve-{mode}.sh"
        if left() < 60:
            results[f"script_{mode}"] = {"ok": False, "error": "no time left"}
            continue
        argv = argvs[mode]
        served = argv[argv.index("--lora-modules") + 1].split("=")[0] if mode == "lora" else \
            argv[argv.index("--served-model-name") + 1]
        results[f"script_{mode}"] = run_script(export / "vllm" / script, 8123, out / f"script_{mode}.log", served,
                                               system, min(240, left() - 20))
        write_json(out / "serve.json", results)
    results["wall_s"] = round(time.time() - start, 1)
    write_json(out / "serve.json", results)


# --- train -------------------------------------------------------------------------------------------------

def cmd_train(out: Path, backend: str, steps: int, completion: int, deadline: float, engines: list[str]) -> None:
    start = time.time()
    tok = WORK / "wide-tok"
    if not (tok / "tokenizer.json").is_file():
        wide_tokenizer(tok, QWEN3_SHAPES["qwen3-8b"]["vocab_size"])
    shape = os.environ.get("VLLM_BENCH_SHAPE", "qwen3-8b")  # "tiny" rehearses the script on a CPU
    model = build_model(WORK / shape, QWEN3_SHAPES[shape], tok)
    results: dict = {"versions": versions(), "backend": backend, "steps": steps, "completion": completion,
                     "model_built_s": round(time.time() - start, 1), "runs": {}}
    for engine in engines:
        name = f"{backend}_{engine}"
        left = deadline - (time.time() - start)
        if left < 90:
            results["runs"][name] = {"rc": "not run: no time left"}
            continue
        rundir = WORK / "runs" / name
        shutil.rmtree(rundir, ignore_errors=True)
        ticks = out / f"{name}.ticks"
        ticks.unlink(missing_ok=True)
        gens = out / f"{name}.gen"
        gens.unlink(missing_ok=True)
        # completion 0: the tutorial's budget, max_seq_length minus the prompt budget (read back from run.json)
        length = ["--set", f"trainer.max_completion_length={completion}"] if completion else []
        args = ["train", "-m", model, "-o", rundir, "--backend", backend, "--generation", engine,
                "--max-steps", steps, *length,
                "--set", "trainer.save_steps=1000", "--set", "data.max_samples=64",
                "--set", "model.load_in_4bit=" + ("true" if backend == "unsloth" else "false"),
                # unsloth shares the weights with its vLLM engine; TRL's colocated vLLM holds a second copy
                "--set", "model.gpu_memory_utilization=" + ("0.7" if backend == "unsloth" else "0.5"),
                "--set", 'rewards.functions=["format_exact","format_approx","answer","numbers","language",'
                         '"steptimer:tick"]']
        # `grpoctl train` through bench/gentimer.py, which times each step's generation
        cmd = [sys.executable, str(HERE / "gentimer.py"), *map(str, args)]
        # every run starts cold, as a user's first run: its own HOME (vLLM's and Triton's caches), TMPDIR
        # (TorchInductor's) and working directory (Unsloth's generated modules)
        cold = WORK / "cold" / name
        shutil.rmtree(cold, ignore_errors=True)
        for d in ("home", "tmp", "cwd"):
            (cold / d).mkdir(parents=True)
        run_env = env(BENCH_TICKS=str(ticks), BENCH_GEN=str(gens), HOME=str(cold / "home"), TMPDIR=str(cold / "tmp"))
        with GpuSampler() as gpu:
            row = run_logged(name, cmd, out, left - 20, env=run_env, cwd=cold / "cwd")
        row["gpu"] = gpu.summary()
        summary = rundir / "summary.json"
        meta = rundir / "run.json"
        tokens = completion
        if meta.is_file():
            resolved = json.loads(meta.read_text())
            row["generation"] = resolved.get("generation")
            tokens = resolved["config"]["trainer"]["max_completion_length"]
            row["completion_tokens"] = tokens
        if summary.is_file():
            s = json.loads(summary.read_text())
            row.update(trainer_wall_s=s["wall_time_s"], peak_allocated_mib=s["peak_gpu_memory_mb"])
            row.update(step_times(str(ticks), s["wall_time_s"], steps))
            row.update(generation_times(str(gens)))
            if row.get("steady_s_per_step"):
                row["generated_tokens_per_s"] = round(4 * tokens / row["steady_s_per_step"], 1)
                if row.get("steady_generation_s"):
                    row["steady_rest_s"] = round(row["steady_s_per_step"] - row["steady_generation_s"], 3)
        metrics = rundir / "metrics.jsonl"
        if metrics.is_file():
            row["metrics"] = [json.loads(x) for x in metrics.read_text().splitlines()]
        row["log_tail"] = log_tail(out, name, 2000)
        results["runs"][name] = row
        write_json(out / f"train_{backend}.json", results)
    results["wall_s"] = round(time.time() - start, 1)
    write_json(out / f"train_{backend}.json", results)
    report([out])


def report(outs: list[Path]) -> dict:
    """The vLLM / HF ratios per backend, from the runs in ``outs`` (one call's runs or several calls')."""
    runs: dict = {}
    for o in outs:
        for f in sorted(Path(o).glob("train_*.json")):
            runs.update(json.loads(f.read_text())["runs"])
    ratios = {}
    for backend in ("unsloth", "trl"):
        v, h = runs.get(f"{backend}_vllm", {}), runs.get(f"{backend}_hf", {})
        if not (v.get("steady_s_per_step") and h.get("steady_s_per_step")):
            continue
        ratios[backend] = {
            "steady_s_per_step": round(v["steady_s_per_step"] / h["steady_s_per_step"], 3),
            "first_step_s": round(v["first_step_s"] / h["first_step_s"], 3),
            "generated_tokens_per_s": round(v["generated_tokens_per_s"] / h["generated_tokens_per_s"], 3),
            "process_wall_s": round(v["process_wall_s"] / h["process_wall_s"], 3),
            "peak_nvidia_smi_mib": round(max(v["gpu"]["peak_mib"].values()) / max(h["gpu"]["peak_mib"].values()), 3),
        }
        if v.get("steady_generation_s") and h.get("steady_generation_s"):  # runs timed by bench/gentimer.py
            ratios[backend]["steady_generation_s"] = round(v["steady_generation_s"] / h["steady_generation_s"], 3)
        print(f"{backend}: vLLM / HF generate: {json.dumps(ratios[backend])}")
    for name, r in runs.items():
        print(f"{name}: steady {r.get('steady_s_per_step')} s/step (generation {r.get('steady_generation_s')} s, "
              f"the rest {r.get('steady_rest_s')} s), first step {r.get('first_step_s')} s, "
              f"{r.get('generated_tokens_per_s')} tok/s, peak {r.get('gpu', {}).get('peak_mib')} MiB (nvidia-smi), "
              f"{r.get('peak_allocated_mib')} MiB (torch), process {r.get('process_wall_s')} s, rc {r.get('rc')}")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["models", "serve", "train", "report"])
    ap.add_argument("out", type=Path, nargs="+")
    ap.add_argument("--backend", choices=["unsloth", "trl"], default="unsloth")
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--completion", type=int, default=128,
                    help="tokens per completion; 0 = the tutorial's max_seq_length minus the prompt budget")
    ap.add_argument("--deadline-s", type=float, default=560)
    ap.add_argument("--modes", default="merged,lora", help="serve: the vLLM modes to run, in this order")
    ap.add_argument("--scripts-only", default="", help="serve: modes whose `grpoctl serve` is skipped, "
                    "their script still started (a mode whose `grpoctl serve` ran in an earlier call)")
    a = ap.parse_args()
    if a.what == "report":
        report(a.out)
        return
    out = a.out[0]
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.what == "models":  # build the models ahead, in a call that has time to spare; the others reuse them
        shape = os.environ.get("VLLM_BENCH_SHAPE", "qwen3-8b")
        t = time.time()
        tok = wide_tokenizer(WORK / "wide-tok", QWEN3_SHAPES[shape]["vocab_size"])
        build_model(WORK / shape, QWEN3_SHAPES[shape], tok)
        write_json(out / "models.json", {"shape": shape, "tiny": str(tiny_model()),
                                         "built_s": round(time.time() - t, 1)})
    elif a.what == "serve":
        cmd_serve(out, a.deadline_s, a.modes.split(","), set(filter(None, a.scripts_only.split(","))))
    else:
        cmd_train(out, a.backend, a.steps, a.completion, a.deadline_s, a.engines.split(","))


if __name__ == "__main__":
    main()
