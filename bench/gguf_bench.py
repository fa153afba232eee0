"""GGUF export speed and memory: grpoctl's fused export vs the by-hand route, on a synthetic ~1.1B Llama.

    python bench/gguf_bench.py [--work /tmp/grpoctl-gguf-bench] [--types f16,q8_0,q4_k_m,q5_k_m]

(a) grpoctl: base + LoRA adapter -> GGUF in one streaming converter pass (each adapted tensor merged as
    the converter reads it), then llama.cpp's quantizer per type from that one 16-bit file;
    a1 = merge -> f16 GGUF only, a2 = the whole set of types.
(b) by hand: PEFT merge_and_unload + save_pretrained, then llama.cpp's convert_hf_to_gguf.py to f16,
    then one quantization per type (llama_model_quantize, what llama-quantize does).

Every step runs in its own subprocess; wall time and peak RSS (of the step and its children) are
measured around it. Parity is not part of the timing (it runs a model forward, not an export cost).
The synthetic model has TinyLlama's shape (hidden 2048, 22 layers, GQA 32/4, MLP 5632), random bf16
weights in 3 safetensors shards, and the SmolLM2 tokenizer, so llama.cpp's converter accepts it; the
adapter is rank 32 on every projection with non-zero B, as after training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from synthetic import llama_tensor_shapes

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048)
SHARD_BYTES = 1000 * 1000 * 1000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(dest: Path) -> Path:
    """Random bf16 Llama of TinyLlama's shape, written tensor by tensor into ~1 GB shards."""
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from grpoctl.models import embedded_model_dir

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir() / f, tmp / f)
    shapes = llama_tensor_shapes(SHAPE)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    tmp.rename(dest)
    return dest


def build_adapter(model: Path, dest: Path, r: int = 32) -> Path:
    """A PEFT-format rank-``r`` LoRA on every projection (A and B random, B non-zero as after training)."""
    if (dest / "adapter_model.safetensors").is_file():
        return dest
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, fname in index.items():
        module = name.rsplit(".", 1)[0]
        if module.split(".")[-1] not in TARGETS:
            continue
        with safe_open(model / fname, framework="pt") as f:
            out_f, in_f = f.get_slice(name).get_shape()
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.01).to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": TARGETS, "base_model_name_or_path": str(model), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True}))
    return dest


def step(label: str, code: str, results: list[dict]) -> dict:
    """Run ``code`` in a fresh Python; record wall seconds and peak RSS (MiB) of it and its children."""
    # the checkout first; a PYTHONPATH given to the bench stays behind it (a sitecustomize for the machine, say)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    # the step's chatter goes to a file: a pipe nobody reads until the end would block the step when full
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            sys.stderr.write(log.read()[-3000:])
            raise SystemExit(f"step {label!r} failed")
    # the 1-minute load average when the step ends: on a shared machine the ratios mean little without it
    row = {"step": label, "wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
           "load_avg": round(os.getloadavg()[0], 1)}
    results.append(row)
    print(f"  {label:44} {row['wall_s']:7.1f} s {row['peak_rss_mib']:7d} MiB   load {row['load_avg']:.1f}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/grpoctl-gguf-bench"))
    ap.add_argument("--types", default="f16,q8_0,q4_k_m,q5_k_m")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model and outputs")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.build_only:
        build_adapter(build_model(args.work / "base"), args.work / "adapter")
        return
    from grpoctl.export.converter import find_converter
    from grpoctl.gguftypes import parse_types

    types = parse_types(args.types)
    quants = [t for t in types if t != "f16"]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print("building the synthetic model and adapter (cached in the work dir) ...", flush=True)
    # in a child process: a step's peak RSS as the kernel reports it starts from this process's own
    # high-water mark (fork + exec inherit it), so this process must never hold the model
    subprocess.run([sys.executable, __file__, "--work", str(work), "--build-only"], check=True)
    model, adapter = work / "base", work / "adapter"
    shards = sorted(model.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    n_params = sum(p.stat().st_size for p in shards) / 2
    conv = find_converter(fetch=True)
    print(f"model: {n_params / 1e9:.2f}B params bf16, {len(shards)} shards, largest {largest:.0f} MiB; "
          f"adapter r=32 on {', '.join(TARGETS)}; types {','.join(types)}; {os.cpu_count()} cores")
    for d in ("a1", "a2", "b"):
        shutil.rmtree(work / d, ignore_errors=True)
        (work / d).mkdir()

    results: list[dict] = []
    fused = """
        from pathlib import Path
        from grpoctl.export.converter import find_converter
        from grpoctl.export.gguf import convert_all, gguf_metadata, model_view
        work = Path({out!r}); model = Path({model!r}); adapter = Path({adapter!r})
        view = model_view(model, adapter, work / "view")
        built = convert_all(find_converter(fetch=False), view, adapter, work, {types!r}, name="bench",
                            metadata=gguf_metadata("bench", model, adapter))
        """
    print("(a) grpoctl fused export", flush=True)
    a1 = step("a1 fused merge -> f16 GGUF", fused.format(out=str(work / "a1"), model=str(model),
                                                         adapter=str(adapter), types=["f16"]), results)
    a2 = step(f"a2 fused -> {','.join(types)}", fused.format(out=str(work / "a2"), model=str(model),
                                                             adapter=str(adapter), types=types), results)
    shutil.rmtree(work / "a1", ignore_errors=True)
    shutil.rmtree(work / "a2", ignore_errors=True)

    print("(b) by hand: PEFT merge + save, convert_hf_to_gguf.py, quantize per type", flush=True)
    merged = work / "b" / "merged"
    b1 = step("b1 PEFT merge_and_unload + save_pretrained", f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(model)!r}, dtype=torch.bfloat16)
        m = PeftModel.from_pretrained(m, {str(adapter)!r}).merge_and_unload()
        m.save_pretrained({str(merged)!r})
        AutoTokenizer.from_pretrained({str(model)!r}).save_pretrained({str(merged)!r})
        """, results)
    f16 = work / "b" / "merged-f16.gguf"
    b2 = step("b2 convert_hf_to_gguf.py -> f16", f"""
        import runpy, sys
        sys.path.insert(0, {str(conv.root)!r})
        sys.argv = ["convert_hf_to_gguf.py", {str(merged)!r}, "--outtype", "f16", "--outfile", {str(f16)!r}]
        runpy.run_path({str(conv.script)!r}, run_name="__main__")
        """, results)
    bq = []
    for t in quants:
        bq.append(step(f"b3 quantize {t}", f"""
            from pathlib import Path
            from grpoctl.export.quantize import quantize
            quantize(Path({str(f16)!r}), Path({str(work / 'b' / f'merged-{t}.gguf')!r}), {t!r})
            """, results))
    shutil.rmtree(work / "b", ignore_errors=True)

    ref_f16 = b1["wall_s"] + b2["wall_s"]
    ref_all = ref_f16 + sum(r["wall_s"] for r in bq)
    ref_rss = max(b1["peak_rss_mib"], b2["peak_rss_mib"])
    print("\nratios (grpoctl / by hand; targets from the issue)")
    print(f"  merge -> f16 GGUF wall   {a1['wall_s']:7.1f} s / {ref_f16:7.1f} s = {a1['wall_s'] / ref_f16:.2f}x "
          "(target <= 0.50x)")
    print(f"  merge -> f16 peak RSS    {a1['peak_rss_mib']:7d} MiB / {ref_rss:5d} MiB = "
          f"{a1['peak_rss_mib'] / ref_rss:.2f}x; vs largest shard {largest:.0f} MiB = "
          f"{a1['peak_rss_mib'] / largest:.2f}x (target <= 1.00x)")
    print(f"  all types wall           {a2['wall_s']:7.1f} s / {ref_all:7.1f} s = {a2['wall_s'] / ref_all:.2f}x "
          "(target <= 0.70x)")
    loads = [r["load_avg"] for r in results]
    print(f"  load average over the steps {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    print(json.dumps({"results": results, "largest_shard_mib": round(largest), "params": n_params}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
