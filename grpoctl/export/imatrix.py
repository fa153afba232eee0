"""Quants calibrated on the run's own task: an importance matrix from the training data, proven on held-out probes.

    the run's training prompts, rendered with its chat template and system prompt,
    + a completion sampled from the trained model for each         -> <name>-calibration.txt
      (no parity probe text in it: the probes stay held out)
    llama.cpp's llama-imatrix on the 16-bit GGUF intermediate      -> <name>-imatrix.gguf
      (one forward pass over the calibration text)
    llama.cpp's llama-quantize --imatrix, for every type that reads one
    + the plain quant of the same type, measured on the same probes -> parity.json "imatrix": the gain

Completions are sampled from the trained model rather than taken from the dataset's solutions: GRPO never
trains on the solutions, while the deployed model reads its own output (its format, reasoning markers and
language) as it writes; those activations are what the matrix should weigh. ``--calibration FILE`` replaces
the whole text, ``--imatrix FILE`` the whole computation (llama.cpp's GGUF imatrix format or the legacy
.dat, both read by llama.cpp's own loader).

The plain quants stay in-process (``llama_model_quantize``, no build needed); a matrix goes through
``llama-quantize``, whose loader reads it (both write byte-identical files when no matrix is given).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.artifacts import (
    Artifacts,
    CalibrationRecord,
    ImatrixComparison,
    ImatrixGain,
    ImatrixSection,
    ImatrixTypeComparison,
    ParityResult,
    QuantFigures,
)
from grpoctl.errors import ConversionError, DataError, InputNotFoundError, UsageError
from grpoctl.export.quantize import fallback_note, quantize
from grpoctl.gguftypes import TYPES
from grpoctl.rundir import RunDir
from grpoctl.threads import default_threads

AUTO = "auto"
MATRIX_SUFFIX = "-imatrix.gguf"
CALIBRATION_SUFFIX = "-calibration.txt"
CHUNK_SIZES = (512, 256, 128, 64, 32)  # llama-imatrix's default n_ctx first; it needs two chunks at least
# llama.cpp may tokenize the text a little differently from transformers: keep this much spare
_TOKEN_MARGIN = 1.15
_MIN_PROBE_LINE = 40  # probe lines at least this long count as probe text on their own
_TICK_S = 30.0
Say = Callable[[str], None]  # the export's one output channel (silent under --quiet)


# --- what may be asked ---------------------------------------------------------------------------------

def check_types(types: list[str], with_matrix: bool) -> None:
    """Types llama.cpp makes badly without an importance matrix are refused without one; a matrix that
    changes none of the types asked for is refused too (both before any work)."""
    need = [t for t in types if TYPES[t].needs_imatrix]
    if need and not with_matrix:
        raise UsageError(f"{', '.join(need)} need{'s' * (len(need) == 1)} an importance matrix (llama.cpp's IQ and "
                         "Q2_K types lose too much without one); add --imatrix auto (computed from the run's "
                         "training data) or --imatrix FILE")
    if with_matrix and not any(TYPES[t].reads_imatrix for t in types):
        raise UsageError(f"an importance matrix changes none of {', '.join(types)} (f16, bf16, f32 and q8_0 ignore "
                         "it); add a quantized type such as q4_k_m, or leave out --imatrix")


@dataclass(frozen=True)
class ImatrixRequest:
    """How the importance matrix is obtained: a user's ``matrix``, else computed over the user's
    ``calibration`` text, else over text built from ``run`` (its prompts + sampled completions)."""

    matrix: Path | None = None
    calibration: Path | None = None
    run: RunDir | None = None
    samples: int = 64  # training prompts in the calibration text
    max_new_tokens: int = 128  # completion length cap (the run's own budget when shorter)
    seed: int = 3407
    completions: str = "sampled"  # "sampled" from the trained model | "solutions" from the dataset
    compare: bool = True  # also make the plain quant of each type and measure both on the probes

    @classmethod
    def from_options(cls, imatrix: str | None, calibration: Path | None, run: RunDir | None) -> ImatrixRequest | None:
        """``--imatrix auto|FILE`` and ``--calibration FILE`` as the CLI gives them; None when neither is set."""
        if imatrix is None and calibration is None:
            return None
        if imatrix is not None and imatrix != AUTO and calibration is not None:
            raise UsageError("--calibration computes a matrix, --imatrix FILE brings one: give one of them")
        if imatrix not in (None, AUTO):
            return cls(matrix=Path(imatrix))
        if calibration is None and run is None:
            raise UsageError("--imatrix auto builds its calibration text from the training run, and the source is an "
                             "adapter folder without one; give the run directory, or --calibration FILE")
        return cls(calibration=Path(calibration) if calibration else None, run=run)

    def describe(self) -> str:
        if self.matrix is not None:
            return f"the importance matrix {self.matrix}"
        if self.calibration is not None:
            return f"llama-imatrix over {self.calibration}"
        return (f"llama-imatrix over {self.samples} training prompts + completions "
                f"{'sampled from the trained model' if self.completions == 'sampled' else 'from the dataset'}")


def check_request(request: ImatrixRequest) -> None:
    """Everything that can be checked before the export starts: files exist and read, the tools are there
    (built now if they never were: minutes, once)."""
    from grpoctl.llamacpp_tools import tool

    if request.matrix is not None:
        if not request.matrix.is_file():
            raise InputNotFoundError(f"importance matrix {request.matrix} does not exist")
        matrix_entries(request.matrix)
    else:
        if request.calibration is not None:
            read_calibration(request.calibration)
        tool("llama-imatrix")
    tool("llama-quantize")


# --- held-out probes ---------------------------------------------------------------------------------

def probe_texts() -> list[str]:
    """The parity probes' own text: each whole text, each chat turn and each long line of them."""
    from grpoctl.export.parity import probes

    texts = [*probes.PROSE, *probes.MATH, *probes.CODE, probes.GREEDY_QUESTION]
    texts += [turn for chat in probes.CHATS for turn in chat]
    lines = [ln.strip() for t in texts for ln in t.splitlines() if len(ln.strip()) >= _MIN_PROBE_LINE]
    return list(dict.fromkeys(texts + lines))


def probe_hits(text: str) -> list[str]:
    """Probe texts found in ``text``; a calibration set must have none, or the gain is not measured held out."""
    return [p for p in probe_texts() if p in text]


def read_calibration(path: Path) -> str:
    """A user's calibration text, refused when unreadable, empty or holding parity probe text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputNotFoundError(f"calibration file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"calibration file {path} is not readable UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"calibration file {path} is empty")
    if hits := probe_hits(text):
        raise UsageError(f"calibration file {path} contains parity probe text ({hits[0][:60]!r}); the probes must stay "
                         "out of the calibration set or the gain is not measured on held-out text: remove it")
    return text


# --- calibration text from the run ---------------------------------------------------------------------

def training_rows(run: RunDir) -> Any:
    """The run's training rows as training mapped them (prompt messages with the system prompt, solution)."""
    from grpoctl.train.data import load_source, map_rows

    cfg = run.data_config()
    return map_rows(load_source(cfg.dataset, cfg.subset, cfg.split), cfg)


def build_calibration(request: ImatrixRequest, model_dir: Path, adapter_dir: Path | None, tokenizer: Any,
                      eot_ids: list[int], dest: Path) -> dict[str, Any]:
    """Write the calibration text built from the run to ``dest``; returns what it holds (``CalibrationRecord``'s
    fields that say where it came from)."""
    assert request.run is not None
    rows = training_rows(request.run)
    total = len(rows)
    # a training row holding probe text would put the probe into the calibration set
    rows = rows.filter(lambda r: not probe_hits(r["prompt"][-1]["content"] + "\n" + (r["solution"] or "")))
    dropped = total - len(rows)
    rows = rows.shuffle(seed=request.seed).select(range(min(request.samples, len(rows))))
    if len(rows) == 0:
        raise DataError("no training prompt is left for the calibration text (every row holds parity probe text); "
                        "pass --calibration FILE")
    prompts = [render_prompt(tokenizer, list(r["prompt"])) for r in rows]
    trained_budget = request.run.section("trainer").get("max_completion_length")
    max_new = min(int(trained_budget or request.max_new_tokens), request.max_new_tokens)
    if request.completions == "sampled":
        completions = sample_completions(model_dir, adapter_dir, tokenizer, prompts, eot_ids,
                                         sampling=request.run.sampling, max_new_tokens=max_new, seed=request.seed)
    else:
        end = tokenizer.convert_ids_to_tokens(eot_ids[0]) if eot_ids else ""
        completions = [r["solution"] + end for r in rows]
    docs = [p + c for p, c in zip(prompts, completions, strict=True)]
    kept = [d for d in docs if not probe_hits(d)]  # a sampled completion could, however unlikely, write one
    text = "\n".join(kept) + "\n"
    dest.write_text(text, encoding="utf-8")
    return {"source": "run", "dataset": request.run.dataset or "shipped arith_gsm.jsonl",
            "documents": len(kept), "rows": total, "rows_with_probe_text": dropped,
            "completions": ("sampled from the trained model" if request.completions == "sampled"
                            else "the dataset's solutions"),
            "max_new_tokens": max_new, "sampling": request.run.sampling, "seed": request.seed,
            "system_prompt": request.run.system_prompt}


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt exactly as the model reads it in training and serving: chat template + generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sample_completions(model_dir: Path, adapter_dir: Path | None, tokenizer: Any, prompts: list[str],
                       eot_ids: list[int], *, sampling: dict[str, float], max_new_tokens: int, seed: int,
                       batch_size: int = 64) -> list[str]:
    """One completion per prompt from the trained model in transformers, with the run's sampling settings,
    each up to and including its end-of-turn token, special tokens written out as the model produced them."""
    import torch
    from tqdm.auto import tqdm

    from grpoctl.export.parity.reference import load_reference

    model = load_reference(model_dir, adapter_dir)
    model = model.to("cuda") if torch.cuda.is_available() else model.float()  # CPU matmuls are fastest in f32
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot_ids or [0])[0]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation continues at the right
    gen: dict[str, Any] = {"do_sample": True, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
                           "eos_token_id": eot_ids or None}
    gen.update({k: v for k, v in sampling.items() if k in ("temperature", "top_p", "min_p")})
    if sampling.get("top_k"):
        gen["top_k"] = int(sampling["top_k"])
    torch.manual_seed(seed)
    out: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="calibration: sampling completions", unit="batch",
                      leave=False):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                ids = model.generate(**enc, **gen)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                end = next((j for j, t in enumerate(row) if t in eot_ids), None)
                out.append(tokenizer.decode(row if end is None else row[:end + 1], skip_special_tokens=False))
    finally:
        tokenizer.padding_side = side
    del model
    return out


# --- llama.cpp's tools ---------------------------------------------------------------------------------

def chunk_size(tokens: int) -> int:
    """llama-imatrix cuts the text into chunks of n_ctx tokens and needs two at least: its default 512,
    smaller for a short text."""
    for n in CHUNK_SIZES:
        if tokens >= 2 * n * _TOKEN_MARGIN:
            return n
    raise DataError(f"the calibration text is {tokens} tokens long; llama-imatrix needs at least "
                    f"{int(2 * CHUNK_SIZES[-1] * _TOKEN_MARGIN) + 1}: give a longer text")


def compute_matrix(model_gguf: Path, calibration: Path, out: Path, tokens: int, threads: int | None = None,
                   say: Say = print) -> dict[str, Any]:
    """Run llama-imatrix over ``calibration`` on ``model_gguf``: one forward pass, the matrix in ``out``.

    The calibration file and the matrix are named relative to their folder, so the matrix records the
    calibration's file name (not a temporary path) and the quants record the matrix's.
    """
    from grpoctl.llamacpp_tools import last_error, run_tool

    n_ctx = chunk_size(tokens)
    chunks = tokens // n_ctx  # what llama.cpp will count, give or take its own tokenization
    threads = threads or default_threads()
    say(f"importance matrix: llama-imatrix over {calibration.name} (~{tokens} tokens, about {chunks} chunks of "
        f"{n_ctx}, {threads} threads)")
    args = ["-m", str(model_gguf.resolve()), "-f", _relative(calibration, out.parent), "-o", out.name,
            "--parse-special", "--no-ppl", "-c", str(n_ctx), "-t", str(threads),
            "--output-frequency", "1000000"]  # one write at the end: never a half-computed matrix under that name
    start = time.monotonic()
    ticker = _Ticker(start, say)
    rc, lines = run_tool("llama-imatrix", args, out.parent, ticker.line)
    seconds = time.monotonic() - start
    if rc != 0 or not out.is_file():
        out.unlink(missing_ok=True)
        raise ConversionError(f"llama-imatrix failed (exit {rc}): {last_error(lines)}")
    say(f"  {out.name}: {seconds:.1f} s")
    return {"tool": "llama-imatrix", "chunk_tokens": n_ctx, **matrix_metadata(out), "seconds": round(seconds, 2),
            "threads": threads}


def matrix_entries(path: Path) -> int:
    """How many tensors a matrix file has entries for; a file llama.cpp's own loader cannot read (GGUF or
    legacy .dat) is one line, exit 4."""
    from grpoctl.llamacpp_tools import last_error, run_tool

    # --show-statistics loads only the matrix: the model argument is required by the parser but never opened.
    # Its exit code is the verdict; its log may be cut short when it exits this fast, so it only adds detail.
    rc, lines = run_tool("llama-imatrix", ["-m", os.devnull, "--in-file", str(Path(path).resolve()),
                                           "--show-statistics"], Path(path).resolve().parent)
    entries = _count_entries(Path(path)) if rc == 0 else 0
    if entries <= 0:
        detail = f" ({last_error(lines)})" if lines else ""
        raise DataError(f"{path} is not an importance matrix llama.cpp can read{detail}; give a file written by "
                        "llama-imatrix (GGUF, or the legacy .dat)")
    return entries


def matrix_metadata(path: Path) -> dict[str, Any]:
    """What a GGUF matrix says about itself: the chunks and chunk size it was computed on, its datasets."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    out: dict[str, Any] = {}
    for key, name in (("imatrix.chunk_count", "chunks"), ("imatrix.chunk_size", "chunk_tokens"),
                      ("imatrix.datasets", "datasets")):
        if key in fields:
            out[name] = fields[key].contents()
    return out


def _count_entries(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        from gguf import GGUFReader

        return sum(t.name.endswith(".in_sum2") for t in GGUFReader(path).tensors)
    return int.from_bytes(head, "little", signed=True) if len(head) == 4 else 0  # legacy: entry count first


def quantize_with_matrix(src: Path, dst: Path, type_name: str, matrix: Path, threads: int | None = None,
                         shown_as: str | None = None, say: Say = print) -> dict[str, Any]:
    """llama-quantize --imatrix: ``src`` into ``dst`` as ``type_name``; returns the tensor types written and the
    tensors the matrix had no entry for. A matrix that does not fit the model is one line, exit 4, naming the
    matrix as ``shown_as`` (the file the user gave) or by its name."""
    from grpoctl.llamacpp_tools import last_error, run_tool

    gtype = TYPES[type_name]
    rc, lines = run_tool("llama-quantize", ["--imatrix", matrix.name, str(src.resolve()), str(dst.resolve()),
                                            gtype.label, str(threads or default_threads())], matrix.parent)
    text = "\n".join(lines)
    shown_as = shown_as or matrix.name
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        why = last_error(lines)
        if "imatrix" in why:
            raise DataError(f"the importance matrix {shown_as} does not fit this model: {why}")
        raise ConversionError(f"llama-quantize failed to make {gtype.label} (exit {rc}): {why}")
    written: dict[str, int] = {}
    for t in re.findall(r"converting to (\w+) \.\.", text):
        written[t] = written.get(t, 0) + 1
    # llama-imatrix collects no data for the embeddings (a lookup, not a matrix product) nor, by default, the head
    missing = [n for n in re.findall(r"did not find weights for (\S+)", text)
               if n not in ("token_embd.weight", "output.weight")]
    with_data = sum(written.values()) - len(re.findall(r"did not find weights for", text))
    if missing and with_data <= 0:
        dst.unlink(missing_ok=True)
        raise DataError(f"the importance matrix {shown_as} has no entry for any tensor of this model (first: "
                        f"{missing[0]}); it was computed for another model")
    if missing:
        say(f"  warning: the importance matrix has no entry for {len(missing)} tensors (first: {missing[0]}); they "
            "are quantized without it")
    if note := fallback_note(lines, type_name):
        say(note)
    return {"tensor_types": written, "without_matrix": missing}


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


class _Ticker:
    """Progress for llama-imatrix, which reports only the time of its first pass: that line with its ETA, then
    the elapsed time against that estimate every 30 s while it runs."""

    def __init__(self, start: float, say: Say) -> None:
        self.start = start
        self.say = say
        self.eta: float | None = None
        self.last = start

    def line(self, line: str) -> None:
        if m := re.search(r"([\d.]+) seconds per pass - ETA (?:(\d+) hours )?([\d.]+) minutes", line):
            self.eta = (int(m.group(2) or 0) * 60 + float(m.group(3))) * 60
            self.say(f"  first pass {float(m.group(1)):.1f} s; ETA ~{_clock(self.eta)}")
        now = time.monotonic()
        if now - self.last >= _TICK_S:
            self.last = now
            left = f", ETA ~{_clock(max(self.eta - (now - self.start), 0))}" if self.eta else ""
            self.say(f"  importance matrix: {_clock(now - self.start)}{left}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- one export's matrix ---------------------------------------------------------------------------------

@dataclass
class Imatrix:
    """The matrix of one GGUF export: prepared before conversion, computed on its 16-bit intermediate, used for
    every type that reads it, compared with the plain quants, and finally published beside the GGUF files."""

    request: ImatrixRequest
    work: Path
    name: str
    say: Say = print
    tokens: int = 0
    matrix: Path | None = None  # in ``work`` once there
    calibration: Path | None = None  # in ``work``, when computed
    calibration_record: CalibrationRecord | None = None
    entries: int = 0  # tensors the matrix has an entry for
    computed: dict[str, Any] = field(default_factory=dict)  # llama-imatrix's run, when computed here
    quants: dict[str, dict[str, Any]] = field(default_factory=dict)  # type -> tensor types written, ...

    @property
    def matrix_name(self) -> str:
        return f"{self.name}{MATRIX_SUFFIX}" if self.request.matrix is None or self.request.matrix.suffix == ".gguf" \
            else f"{self.name}-imatrix{self.request.matrix.suffix}"

    @property
    def source(self) -> str:
        return "file" if self.request.matrix is not None else "computed"

    @property
    def held_out(self) -> bool | None:
        """Whether the gain is measured on text the matrix never saw: checked for a calibration text written here,
        unknown for a matrix given."""
        return None if self.request.matrix is not None else True

    @classmethod
    def prepare(cls, request: ImatrixRequest, model_dir: Path, adapter_dir: Path | None, tokenizer_dir: Path,
                eot_ids: list[int], work: Path, name: str, say: Say = print) -> Imatrix:
        """Everything before the conversion: the user's matrix copied in, or the calibration text written."""
        from transformers import AutoTokenizer

        work.mkdir(parents=True, exist_ok=True)
        plan = cls(request=request, work=work, name=name, say=say)
        if request.matrix is not None:
            plan.matrix = work / plan.matrix_name
            shutil.copyfile(request.matrix, plan.matrix)
            plan.entries = matrix_entries(plan.matrix)
            return plan
        plan.calibration = work / f"{name}{CALIBRATION_SUFFIX}"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if request.calibration is not None:
            plan.calibration.write_text(read_calibration(request.calibration), encoding="utf-8")
            origin: dict[str, Any] = {"source": "file", "given": str(request.calibration)}
        else:
            say(f"calibration text: {request.describe()}")
            origin = build_calibration(request, model_dir, adapter_dir, tokenizer, eot_ids, plan.calibration)
        text = plan.calibration.read_text(encoding="utf-8")
        if hits := probe_hits(text):  # the guarantee the report states, checked on what is written
            raise DataError(f"the calibration text holds parity probe text ({hits[0][:60]!r})")
        plan.tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        chunk_size(plan.tokens)  # too short is a one-line error now, not after the conversion
        plan.calibration_record = CalibrationRecord(file=plan.calibration.name, tokens=plan.tokens,
                                                    characters=len(text), **origin)
        return plan

    def matrix_for(self, intermediate: Path, threads: int | None = None) -> Path:
        """The matrix for the quantizer: computed on ``intermediate`` the first time, unless one was given."""
        if self.matrix is None:
            assert self.calibration is not None
            self.matrix = self.work / self.matrix_name
            self.computed = compute_matrix(intermediate, self.calibration, self.matrix, self.tokens, threads, self.say)
            self.entries = matrix_entries(self.matrix)
        return self.matrix

    def quantize(self, src: Path, dst: Path, type_name: str, threads: int | None = None) -> None:
        self.quants[type_name] = quantize_with_matrix(src, dst, type_name, self.matrix_for(src, threads), threads,
                                                      shown_as=str(self.request.matrix or self.matrix_name),
                                                      say=self.say)

    def plain(self, src: Path, type_name: str, threads: int | None = None) -> Path | None:
        """The same type without the matrix, for the comparison; None where llama.cpp refuses it without one."""
        if not self.request.compare:
            return None
        dst = self.work / f"plain-{type_name}.gguf"
        try:
            quantize(src, dst, type_name, threads, say=self.say)
        except ConversionError as e:
            if "requires an imatrix" in str(e) or "Missing importance matrix" in str(e):
                return None
            raise
        return dst

    def compare(self, built: dict[str, Any], files: dict[str, ParityResult], names: dict[str, str],
                measure: Callable[[Path, str], ParityResult]) -> ImatrixComparison:
        """Plain vs imatrix for every type made with the matrix, on the same held-out probes."""
        types: dict[str, ImatrixTypeComparison] = {}
        for t in self.quants:
            mine = _figures(files[names[t]])
            plain_path = built.get(f"plain:{t}")
            plain = _figures(measure(plain_path, t)) if plain_path is not None else None
            types[t] = ImatrixTypeComparison(
                imatrix=mine, plain=plain, tensor_types=self.quants[t]["tensor_types"],
                without_matrix=self.quants[t]["without_matrix"], gain=gains(plain, mine) if plain else None,
                plain_note=("llama.cpp refuses this type without an importance matrix"
                            if plain is None and self.request.compare else None))
        return ImatrixComparison(matrix=self.matrix_name, source=self.source, held_out=self.held_out,
                                 calibration=self.calibration_record.file if self.calibration_record else None,
                                 types=types)

    def publish(self, out_dir: Path, artifacts: Artifacts, written: list[str]) -> None:
        """Move the matrix and its calibration text beside the GGUF files (when a file made with them was
        ``written``) and record them (sha256) in ``artifacts``; its ``imatrix`` section says how they were made."""
        if self.matrix is None or not set(written) & set(self.quants):
            return
        artifacts.files = [f for f in artifacts.files if f.kind not in ("imatrix", "calibration")]
        final = out_dir / self.matrix.name
        os.replace(self.matrix, final)
        entry = artifacts.add_file(final, "imatrix")
        if self.calibration is not None:
            cal = out_dir / self.calibration.name
            os.replace(self.calibration, cal)
            artifacts.add_file(cal, "calibration")
        ran = self.computed
        artifacts.imatrix = ImatrixSection(
            file=final.name, sha256=entry.sha256, source=self.source, entries=self.entries,
            types=[t for t in written if t in self.quants], held_out=self.held_out,
            given=str(self.request.matrix) if self.request.matrix is not None else None,
            calibration=self.calibration_record, tool=ran.get("tool"), chunks=ran.get("chunks"),
            chunk_tokens=ran.get("chunk_tokens"), datasets=ran.get("datasets"), seconds=ran.get("seconds"),
            threads=ran.get("threads"))


def _figures(f: ParityResult) -> QuantFigures:
    return QuantFigures(top1=f.top1, kl=f.kl, kl_p99=f.kl_p99)


def gains(plain: QuantFigures, mine: QuantFigures) -> ImatrixGain:
    """What the matrix bought: KL reductions as fractions of the plain quant's (positive = better), top-1 in points."""
    def reduction(before: float | None, after: float | None) -> float | None:
        return round((before - after) / before, 4) if before and after is not None else None

    return ImatrixGain(top1=round(mine.top1 - plain.top1, 5), kl=reduction(plain.kl, mine.kl),
                       kl_p99=reduction(plain.kl_p99, mine.kl_p99))


def format_comparison(section: ImatrixComparison, positions: int) -> str:
    """The plain vs imatrix table printed after the parity table."""
    if section.held_out:
        what = f"held-out probes ({positions} positions; no probe text in {section.calibration})"
    else:
        what = f"the parity probes ({positions} positions; the matrix was given, its calibration text is unknown)"
    lines = [f"importance matrix {section.matrix}: plain vs imatrix quant on {what}",
             f"{'type':8} {'plain: top-1':>13} {'mean KL':>9} {'p99 KL':>8}   {'imatrix: top-1':>15} {'mean KL':>9} "
             f"{'p99 KL':>8}   mean KL with the matrix"]
    for t, row in section.types.items():
        mine, plain = row.imatrix, row.plain
        left = (f"{plain.top1 * 100:12.1f}% {plain.kl:9.5f} {_p99(plain)}" if plain
                else f"{'-':>13} {'-':>9} {'-':>8}")
        if plain and row.gain and row.gain.kl is not None:
            change = f"{abs(row.gain.kl) * 100:.1f}% {'lower' if row.gain.kl >= 0 else 'HIGHER'}"
        else:
            change = row.plain_note or "-"
        lines.append(f"{TYPES[t].label:8} {left}   {mine.top1 * 100:14.1f}% {mine.kl:9.5f} {_p99(mine)}   {change}")
    return "\n".join(lines)


def _p99(f: QuantFigures) -> str:
    return f"{f.kl_p99:8.4f}" if f.kl_p99 is not None else f"{'-':>8}"
