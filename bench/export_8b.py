"""Export at the tutorial's size: ``grpoctl export`` of a random r32 adapter on a synthetic Qwen3-8B, with the
by-hand route beside it (PEFT merge + save, llama.cpp's convert_hf_to_gguf.py, one quantization per type).

    python bench/export_8b.py WORK [--shape qwen3-8b] [--types q8_0,q4_k_m,q5_k_m] [--merged]
                              [--by-hand [--skip-grpoctl]] [--no-parity-gate] [--tokenizer DIR] [--keep]

Builds the base tensor by tensor into ~4 GB safetensors shards (the real Qwen3-8B config, 151,936-row
vocabulary, random bf16 weights; about 16.4 GB) and a PEFT adapter of rank 32 on the seven projections with
non-zero B, then runs ``grpoctl export ADAPTER --base BASE --gguf TYPES [--merged 16bit]`` as one process.
Its output lines are timestamped as they arrive, so each step (merge, conversion, each quantization, parity)
gets its wall time; the memory of the process and its children is sampled every 0.25 s from /proc: peak RSS,
and within it the anonymous part (what the process allocated) apart from file pages it maps (safetensors
and GGUF files read through mmap, which the kernel can drop). ``--by-hand`` then runs the by-hand route, each
step in its own process, measured the same way. Parity on random weights is meaningless for K-quants (their
logits are flat, see docs/gguf.md): the gate applies to f16 and q8_0 floors unless ``--no-parity-gate``.
Ratios are grpoctl over by hand. Needs about 2.5x the model size of free disk (base, merged, GGUFs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from gpulib import QWEN3_SHAPES, TOKENIZER_FILES, default_tokenizer, versions  # noqa: E402
from synthetic import llama_tensor_shapes  # noqa: E402

SHARD_BYTES = 4 * 1000**3


def build_base(dest: Path, shape: str, tokenizer: Path) -> Path:
    """A random bf16 Qwen3 written tensor by tensor into shards (never more than one shard in memory)."""
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3Config

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, tmp / name)
    eos = AutoTokenizer.from_pretrained(tmp).convert_tokens_to_ids("<|im_end|>")
    sizes = QWEN3_SHAPES[shape]
    config = Qwen3Config(**sizes, rms_norm_eps=1e-6, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
                         dtype="bfloat16")
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    current: dict[str, torch.Tensor] = {}
    size, total, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal current, size
        fname = f"model-{len(shards):05d}.safetensors"
        save_file(current, tmp / fname, metadata={"format": "pt"})
        for name in current:
            weight_map[name] = fname
        current, size = {}, 0
        shards.append([])

    for name, shp in llama_tensor_shapes(dict(sizes, qk_norm=True)):
        t = torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES and current:
            flush()
        current[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    n = len(shards) - 1
    renamed = {}
    for k in range(1, n + 1):  # HF's naming needs the count, known only now
        new = f"model-{k:05d}-of-{n:05d}.safetensors"
        (tmp / f"model-{k:05d}.safetensors").rename(tmp / new)
        renamed[f"model-{k:05d}.safetensors"] = new
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}))
    tmp.rename(dest)
    return dest


def build_adapter(base: Path, dest: Path, r: int = 32) -> Path:
    """``gguf_bench``'s random rank-``r`` PEFT adapter on the seven projections, plus the trained tokenizer the
    adapter folder carries as ``grpoctl train`` writes it."""
    import gguf_bench

    gguf_bench.build_adapter(base, dest, r)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, dest / name)
    return dest


class TreeMemory:
    """Peak RSS (and its anonymous and file-backed parts) of a process and its descendants, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
        return pids

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = anon = file_ = 0
            for p in self._tree():
                try:
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        key, _, val = line.partition(":")
                        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                            kb = int(val.split()[0])
                            rss += kb if key == "VmRSS" else 0
                            anon += kb if key == "RssAnon" else 0
                            file_ += kb if key in ("RssFile", "RssShmem") else 0
                except OSError:
                    pass
            self.samples.append((time.monotonic(), rss / 1024, anon / 1024, file_ / 1024))
            self._stop.wait(0.25)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peaks(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        window = [s for s in self.samples if start <= s[0] <= end] or [(0, 0, 0, 0)]
        return {"peak_rss_mib": round(max(s[1] for s in window)), "peak_anon_mib": round(max(s[2] for s in window)),
                "peak_file_mib": round(max(s[3] for s in window))}


def run(label: str, cmd: list[str], log: Path, env: dict[str, str]) -> tuple[dict, list[tuple[float, str]]]:
    """One process, its lines timestamped as they arrive; wall, exit code and memory of its tree."""
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        with TreeMemory(proc.pid) as mem:
            for line in proc.stdout:
                fh.write(line)
                for part in line.replace("\r", "\n").splitlines():
                    if part.strip():
                        lines.append((time.monotonic(), part.strip()))
            rc = proc.wait()
    row = {"step": label, "rc": rc, "wall_s": round(time.monotonic() - start, 1), **mem.peaks()}
    row["_mem"] = mem
    row["_start"] = start
    print(f"  {label:46} rc={rc} {row['wall_s']:8.1f} s  peak RSS {row['peak_rss_mib']:6d} MiB "
          f"(anon {row['peak_anon_mib']}, file {row['peak_file_mib']})", flush=True)
    return row, lines


# grpoctl's progress lines that open each step of an export (grpoctl/export/*.py)
MARKERS = [("merge 16bit", "merging "), ("convert to a 16-bit GGUF", "converting "),
           ("quantize", "quantizing -> "), ("parity reference (transformers)", "parity: running"),
           ("parity (llama.cpp)", "parity: "), ("manifests", "wrote serving manifests")]


def grpoctl_steps(row: dict, lines: list[tuple[float, str]]) -> list[dict]:
    """Split one export's wall time and memory at the lines that open each step."""
    marks = []
    for t, text in lines:
        body = text.removeprefix("grpoctl: ")
        for label, prefix in MARKERS:
            if body.startswith(prefix):
                name = f"{label} {body.split('-> ')[-1].split()[0]}" if label == "quantize" else label
                if not marks or marks[-1][1] != name:
                    marks.append((t, name))
                break
    end = row["_start"] + row["wall_s"]
    steps = []
    for (t, name), nxt in zip(marks, [*marks[1:], (end, "")], strict=True):
        steps.append({"step": name, "wall_s": round(nxt[0] - t, 1), **row["_mem"].peaks(t, nxt[0])})
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--types", default="q8_0,q4_k_m,q5_k_m")
    ap.add_argument("--merged", action="store_true", help="also --merged 16bit")
    ap.add_argument("--by-hand", action="store_true")
    ap.add_argument("--skip-grpoctl", action="store_true", help="the by-hand route only (grpoctl's measured before)")
    ap.add_argument("--no-parity-gate", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model and outputs")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    info = versions()
    print(json.dumps(info), flush=True)
    t0 = time.monotonic()
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import export_8b as b; "
            f"b.build_adapter(b.build_base(Path({str(work / 'base')!r}), {args.shape!r}, "
            f"Path({str(args.tokenizer or default_tokenizer())!r})), Path({str(work / 'adapter')!r}))")
    subprocess.run([sys.executable, "-c", code], check=True)  # a child: this process never holds the model
    base, adapter = work / "base", work / "adapter"
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    print(f"model: {sum(p.stat().st_size for p in shards) / 1e9:.1f} GB bf16 in {len(shards)} shards, largest "
          f"{largest:.0f} MiB; built in {time.monotonic() - t0:.0f} s; {os.cpu_count()} cores; load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "grpoctl", "export", str(adapter), "--base", str(base), "--gguf", args.types,
           "-o", str(out)] + (["--merged", "16bit"] if args.merged else []) + \
          (["--no-parity-gate"] if args.no_parity_gate else [])
    a, a_steps, parity_table, parity_report = None, [], [], None
    if not args.skip_grpoctl:
        print("(a) " + " ".join(cmd[2:]), flush=True)
        a, lines = run("a grpoctl export", cmd, work / "grpoctl-export.log", env)
        a_steps = grpoctl_steps(a, lines)
        for s in a_steps:
            print(f"    {s['step']:42} {s['wall_s']:8.1f} s  peak RSS {s['peak_rss_mib']:6d} MiB "
                  f"(anon {s['peak_anon_mib']}, file {s['peak_file_mib']})", flush=True)
        parity = out / "gguf" / "parity.json"
        parity_report = json.loads(parity.read_text()) if parity.is_file() else None
        parity_table = [ln for _, ln in lines if "%" in ln and ("gguf" in ln.lower() or "noise floor" in ln)]
        for ln in parity_table:
            print("    " + ln, flush=True)
        if not args.keep:  # the by-hand route needs the disk
            shutil.rmtree(out, ignore_errors=True)

    b_rows: list[dict] = []
    if args.by_hand:
        from grpoctl.export.converter import find_converter

        conv = find_converter(fetch=False)
        hand = work / "by-hand"
        shutil.rmtree(hand, ignore_errors=True)
        hand.mkdir()
        merged, f16 = hand / "merged", hand / "merged-f16.gguf"
        steps = [("b1 PEFT merge_and_unload + save_pretrained", f"""
                    import torch
                    from peft import PeftModel
                    from transformers import AutoModelForCausalLM, AutoTokenizer
                    m = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16)
                    m = PeftModel.from_pretrained(m, {str(adapter)!r}).merge_and_unload()
                    m.save_pretrained({str(merged)!r})
                    AutoTokenizer.from_pretrained({str(adapter)!r}).save_pretrained({str(merged)!r})"""),
                 ("b2 convert_hf_to_gguf.py -> f16", f"""
                    import runpy, sys
                    sys.path.insert(0, {str(conv.root)!r})
                    sys.argv = ["convert_hf_to_gguf.py", {str(merged)!r}, "--outtype", "f16", "--outfile", {str(f16)!r}]
                    runpy.run_path({str(conv.script)!r}, run_name="__main__")""")]
        steps += [(f"b3 quantize {t}", f"""
                    from pathlib import Path
                    from grpoctl.export.quantize import quantize
                    quantize(Path({str(f16)!r}), Path({str(hand / f'merged-{t}.gguf')!r}), {t!r})""")
                  for t in args.types.split(",")]
        print("(b) by hand", flush=True)
        for label, body in steps:
            row, _ = run(label, [sys.executable, "-c", textwrap.dedent(body)], work / f"{label.split()[0]}.log", env)
            b_rows.append(row)
            if row["rc"] != 0:
                print((work / f"{label.split()[0]}.log").read_text()[-2000:], flush=True)
                break
        if not args.keep:
            shutil.rmtree(hand, ignore_errors=True)

    summary = {"env": info, "shape": args.shape, "types": args.types, "merged": args.merged,
               "largest_shard_mib": round(largest),
               "grpoctl": {k: v for k, v in (a or {}).items() if not k.startswith("_")},
               "grpoctl_steps": a_steps, "parity_lines": parity_table,
               "parity": parity_report,
               "by_hand": [{k: v for k, v in r.items() if not k.startswith("_")} for r in b_rows]}
    if a:
        print(f"\npeak RSS of the whole export {a['peak_rss_mib']} MiB = {a['peak_rss_mib'] / largest:.2f}x the "
              f"largest shard ({largest:.0f} MiB); anonymous {a['peak_anon_mib']} MiB = "
              f"{a['peak_anon_mib'] / largest:.2f}x")
    if a and b_rows and all(r["rc"] == 0 for r in b_rows):
        wall_b = sum(r["wall_s"] for r in b_rows)
        rss_b = max(r["peak_rss_mib"] for r in b_rows)
        print(f"grpoctl / by hand: wall {a['wall_s']:.0f} s / {wall_b:.0f} s = {a['wall_s'] / wall_b:.2f}x (grpoctl "
              f"includes parity, by hand has none); peak RSS {a['peak_rss_mib']} / {rss_b} MiB = "
              f"{a['peak_rss_mib'] / rss_b:.2f}x")
    name = "export_8b_by_hand.json" if args.skip_grpoctl else "export_8b.json"
    (work / name).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: summary[k] for k in ("grpoctl", "grpoctl_steps", "by_hand")}, default=str))
    if not args.keep:
        for d in ("base", "adapter", "export"):
            shutil.rmtree(work / d, ignore_errors=True)


if __name__ == "__main__":
    main()
