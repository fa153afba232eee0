"""A per-tensor quant recipe searched for the run: which tensor groups deserve more bits, and which can spare some.

    the importance-matrix quant of a type (its tensor types: the starting mix)
    + the 16-bit GGUF intermediate's next-token distributions on the calibration text (never the probes)
    for each tensor group (token embedding, output head, attention and MLP of each band of layers):
        the mix with only that group one step higher, then one step lower on its type ladder, and its KL
        on the calibration text (llama.cpp); its tensors come from two llama-quantize --imatrix
        --tensor-type-file runs (every group higher / every group lower), spliced into the
        importance-matrix quant by gguf-py
    each measurement paired with the importance-matrix quant's position by position: the change in mean KL and
    its standard error (over blocks of positions; the KL is heavy-tailed and a few positions move it)
    trades, each measured as the whole mix it makes (one more llama.cpp pass per step): the upgrades, most KL
    saved per byte first, each added to the current mix and measured there; when the bytes would pass the
    budget, payments (downgrades split into parts: an MLP band's up, gate and down tensors apart) added one at
    a time, cheapest per byte as measured alone first, each kept only while what it costs in the mix is less
    than the upgrade saves for the bytes it covers; the trade taken when the whole mix beats the one before it
    by more than a standard error
      -> <name>-<QUANT>.recipe.txt: one PATTERN=TYPE line per tensor (llama-quantize --tensor-type-file)
      -> the file made from it, checked tensor by tensor against the recipe, shipped as <name>-<QUANT>.gguf
         when its calibration KL is lower than the importance-matrix quant's by more than a standard
         error, it is no larger than the plain or the importance-matrix quant of the type, and its KL on the
         held-out parity probes is lower too (``confirm_held_out``: the probes never steer the search, they
         refuse a file that fitted the calibration text)

A change smaller than its standard error is not taken as a gain: on 512 positions of SmolLM2 a downgrade
"lowered" the KL by noise and an upgrade "saved" 23%, and a recipe built on those fitted the text it was
measured on (probe KL 1.21x the importance-matrix quant's). Fewer bits are never counted as free. Nor do single
measurements add up: two MLP bands lowered measured free one at a time and cost 1.54x on the probes together
with the upgrades they paid for; so a trade is judged by the mix it makes, never by a sum.

Every step of a group is one step on the ladder of each of its tensors: the K-quants for rows that are a
multiple of 256 wide, the 32-wide block types otherwise (llama.cpp would fall back to those anyway, so the
types written are exactly the recipe's). Layers are banded (``RecipeRequest.bands`` bands) so that a search
costs a bounded amount on a small CPU: three llama-quantize runs per type (every group higher, every group
lower, the recipe found) and at most ``2 x (2 x bands + 2)`` llama.cpp passes over ``positions``
calibration tokens for the single measurements (one per group and direction), and as many again at most for
the trades' mixes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl.artifacts import ParityResult, QuantRecipeSection, QuantRow, RecipeGroup, RecipeTrade, RecipeType
from grpoctl.errors import ConversionError, UsageError
from grpoctl.gguftypes import TYPES
from grpoctl.threads import default_threads

SEARCH = "search"
METHODS = (SEARCH,)
RECIPE_SUFFIX = ".recipe.txt"
Say = Callable[[str], None]
# the two type ladders, cheapest first (ggml type names as llama-quantize spells them)
K_LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")  # rows a multiple of 256 wide
BLOCK32_LADDER = ("q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0")  # other rows a multiple of 32 wide
_MAX_LOGPROB_FLOATS = 128 * 2**20  # the reference's log-probabilities kept in memory: 512 MiB of float32
# how many standard errors of its paired difference a measured change must clear to count as a gain (an
# upgrade's) or be charged as a cost (a downgrade's, at the upper end)
MARGIN_SE = 1.0
SE_BLOCK = 64  # positions per block for the standard error: neighbouring positions of a text are not independent


def check_request(method: str | None, with_calibration_text: bool) -> None:
    """Before any work: a known method, and the calibration text it measures on."""
    if method is None:
        return
    if method not in METHODS:
        raise UsageError(f"--quant-recipe {method} is not one of {', '.join(METHODS)}")
    if not with_calibration_text:
        raise UsageError("--quant-recipe search measures each tensor group on the importance matrix's calibration "
                         "text: add --imatrix auto (the run's data) or --calibration FILE")


@dataclass(frozen=True)
class RecipeRequest:
    method: str = SEARCH
    bands: int = 8  # layers are searched in at most this many bands of consecutive layers
    # calibration tokens the KL is measured on (four chunks of llama-imatrix's size): on 512 the per-group
    # changes were mostly noise (bench/recipe.md)
    positions: int = 2048


# --- the tensors of a file ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    name: str
    elements: int
    row: int  # elements per row (ne0): what a type's block size must divide
    type: str  # ggml type name, lower case

    def bytes(self, type_name: str | None = None, alignment: int = 32) -> int:
        """Bytes of the tensor's data at ``type_name`` (default its own), padded as GGUF aligns tensor data."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[_ggml(type_name or self.type)]
        return -(-(self.elements // block * size) // alignment) * alignment


def _ggml(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def read_tensors(path: Path) -> tuple[list[Tensor], int]:
    """The tensors of a GGUF (name, shape, type), read by llama.cpp's gguf-py, and the file's data alignment."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = [Tensor(name=t.name, elements=int(t.n_elements), row=int(t.shape[0]), type=t.tensor_type.name.lower())
               for t in reader.tensors]
    return tensors, int(reader.alignment)


def _bpw(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_ggml(type_name)]
    return size * 8 / block


def ladder(tensor: Tensor) -> list[str]:
    """The types a tensor may step through, cheapest first, its own among them; empty for a tensor that is not
    quantized (norms, 16-bit leftovers) or whose rows fit no block."""
    if not _quantized(tensor.type):
        return []
    if tensor.row % 256 == 0:
        steps = list(K_LADDER)
    elif tensor.row % 32 == 0:
        steps = list(BLOCK32_LADDER)
    else:
        return []
    if tensor.type not in steps:  # e.g. q4_1: placed by its bits per weight
        at = next((i for i, s in enumerate(steps) if _bpw(s) >= _bpw(tensor.type)), len(steps))
        steps.insert(at, tensor.type)
    return steps


def _quantized(type_name: str) -> bool:
    return type_name not in ("f32", "f16", "bf16", "f64", "i8", "i16", "i32", "i64")


def step(tensor: Tensor, direction: int) -> str | None:
    """The type one step higher (+1) or lower (-1) on the tensor's ladder; None at either end."""
    steps = ladder(tensor)
    if not steps:
        return None
    at = steps.index(tensor.type) + direction
    return steps[at] if 0 <= at < len(steps) else None


def direction(tensor: Tensor, type_name: str) -> int:
    """+1 when ``type_name`` is up the tensor's ladder from its own type, -1 when down: read off the ladder, not
    from bits per weight (Q4_0 -> IQ4_NL is a step up of the same size)."""
    steps = ladder(tensor)
    return 1 if steps.index(type_name) > steps.index(tensor.type) else -1


# --- groups ---------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^blk\.(\d+)\.(attn|ffn)_")


@dataclass
class Group:
    name: str
    tensors: list[Tensor]

    def types(self, direction: int) -> dict[str, str] | None:
        """Each tensor's type one step that way; None when no tensor of the group can move."""
        moved = {t.name: step(t, direction) or t.type for t in self.tensors}
        return moved if any(moved[t.name] != t.type for t in self.tensors) else None


def groups(tensors: list[Tensor], bands: int) -> list[Group]:
    """Token embedding, output head, and attention / MLP of each band of consecutive layers (at most ``bands``)."""
    layers = sorted({int(m.group(1)) for t in tensors if (m := _BLOCK.match(t.name))})
    per_band = max(1, math.ceil(len(layers) / max(1, bands)))
    found: dict[str, Group] = {}
    for t in tensors:
        if not ladder(t):
            continue
        if m := _BLOCK.match(t.name):
            i = layers.index(int(m.group(1))) // per_band
            first, last = layers[i * per_band], layers[min((i + 1) * per_band, len(layers)) - 1]
            band = f"{first}" if first == last else f"{first}-{last}"
            name = f"blk.{band}.{m.group(2)}"
        elif t.name.startswith("token_embd"):
            name = "token_embd"
        elif t.name.startswith("output"):
            name = "output"
        else:
            continue
        found.setdefault(name, Group(name, [])).tensors.append(t)
    return list(found.values())


def parts(group: Group) -> list[Group]:
    """The payment units of a group: an MLP group's tensors split by kind (``blk.12-15.ffn_up``, ``_gate``,
    ``_down``), any other group whole. On SmolLM2 two whole MLP bands lowered together cost far more in the mix
    than each measured alone (bench/recipe.md); a smaller unit pays for less and is refused on its own."""
    if not group.name.endswith(".ffn"):
        return [group]
    by_kind: dict[str, Group] = {}
    for t in group.tensors:
        kind = t.name.split(".")[2]  # blk.<i>.<kind>.weight
        by_kind.setdefault(kind, Group(f"{group.name[:-len('.ffn')]}.{kind}", [])).tensors.append(t)
    return list(by_kind.values())


# --- the recipe file ------------------------------------------------------------------------------------

def recipe_lines(types: dict[str, str]) -> list[str]:
    """``PATTERN=TYPE`` lines for llama-quantize's --tensor-type-file: one anchored pattern per tensor, so that
    every quantized tensor's type is the recipe's and none is left to the type's default mix."""
    return [f"^{re.escape(name)}$={t}" for name, t in types.items()]


def write_recipe(path: Path, types: dict[str, str]) -> Path:
    # llama-quantize reads the file as whitespace-separated PATTERN=TYPE words: no comments, no blanks inside
    path.write_text("\n".join(recipe_lines(types)) + "\n", encoding="utf-8")
    return path


def read_recipe(path: Path) -> list[tuple[str, str]]:
    """(pattern, type) pairs as llama-quantize reads them: whitespace-separated words, split at the first '='."""
    out = []
    for word in Path(path).read_text(encoding="utf-8").split():
        pattern, sep, type_name = word.partition("=")
        if not sep or not pattern or not type_name:
            raise ConversionError(f"{Path(path).name}: {word!r} is not PATTERN=TYPE")
        out.append((pattern.lower(), type_name.lower()))
    return out


def check_file(gguf_path: Path, recipe: Path) -> None:
    """The file has every type its recipe claims: each tensor the recipe names (the first pattern that matches,
    as llama.cpp applies them) has that type in the file, read by gguf-py; every pattern names a tensor."""
    rules = [(re.compile(p), p, t) for p, t in read_recipe(recipe)]
    tensors, _ = read_tensors(gguf_path)
    used: set[str] = set()
    wrong: list[str] = []
    for tensor in tensors:
        for rx, pattern, type_name in rules:
            if rx.search(tensor.name):
                used.add(pattern)
                if tensor.type != type_name:
                    wrong.append(f"{tensor.name} is {tensor.type}, the recipe says {type_name}")
                break
    unused = [p for _, p, _ in rules if p not in used]
    if wrong or unused:
        what = wrong[0] if wrong else f"the pattern {unused[0]} names no tensor of the file"
        more = len(wrong) + len(unused) - 1
        raise ConversionError(f"{gguf_path.name} does not follow its recipe {recipe.name}: {what}"
                              + (f" (and {more} more)" if more else ""))


def quantize_recipe(src: Path, dst: Path, type_name: str, matrix: Path, recipe: Path,
                    threads: int | None = None) -> None:
    """llama-quantize --imatrix MATRIX --tensor-type-file RECIPE SRC DST TYPE, run in the matrix's folder so the
    file records the matrix by its name (as ``grpoctl.export.imatrix.quantize_with_matrix`` does)."""
    from grpoctl.llamacpp_tools import last_error, run_tool

    rc, lines = run_tool("llama-quantize", ["--imatrix", matrix.name, "--tensor-type-file", str(recipe.resolve()),
                                            str(src.resolve()), str(dst.resolve()), TYPES[type_name].label,
                                            str(threads or default_threads())], matrix.parent)
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise ConversionError(f"llama-quantize failed to make {TYPES[type_name].label} from the recipe "
                              f"{recipe.name} (exit {rc}): {last_error(lines)}")


def splice(base: Path, taken: dict[str, Path], dst: Path) -> None:
    """``base`` with each tensor of ``taken`` (type and data) from its donor, another quant of the same model;
    written by llama.cpp's gguf-py, metadata copied as gguf-py's own gguf_new_metadata copies it."""
    import gguf

    reader = gguf.GGUFReader(base)
    donors = {d: {t.name: t for t in gguf.GGUFReader(d).tensors} for d in set(taken.values())}
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    if (align := reader.fields.get(gguf.Keys.General.ALIGNMENT)) is not None:
        writer.data_alignment = int(align.contents())
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = f.types[0]
        writer.add_key_value(f.name, f.contents(), kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    tensors = [donors[taken[t.name]][t.name] if t.name in taken else t for t in reader.tensors]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


# --- KL on the calibration text -------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    kl: float
    kl_p99: float
    top1: float
    kls: Any = field(default=None, repr=False, compare=False)  # the KL at each position, for paired differences


def paired(base: Figures, other: Figures, block: int = SE_BLOCK) -> tuple[float, float]:
    """``other``'s mean KL minus ``base``'s on the same positions, and the standard error of that difference over
    blocks of ``block`` consecutive positions (0 when there are fewer than two blocks)."""
    import numpy as np

    diff = np.asarray(other.kls, dtype=np.float64) - np.asarray(base.kls, dtype=np.float64)
    n = len(diff) // block
    if n < 2:
        return float(diff.mean()), 0.0
    means = diff[: n * block].reshape(n, block).mean(-1)
    return float(diff.mean()), float(means.std(ddof=1) / math.sqrt(n))


class CalibrationKL:
    """Next-token distributions of the 16-bit GGUF on the calibration text (llama.cpp), and any file's KL to them.

    The text is cut into chunks of ``n_ctx`` tokens, each evaluated from an empty context (as llama-imatrix and
    llama-perplexity do); at most ``positions`` tokens, fewer for a vocabulary whose log-probabilities would not
    fit ``_MAX_LOGPROB_FLOATS``."""

    def __init__(self, reference: Path, text: str, positions: int, n_ctx: int = 512) -> None:
        from grpoctl.export.parity.llamacpp import open_gguf

        llm = open_gguf(reference, n_ctx)
        try:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            limit = min(positions, len(ids), max(n_ctx, _MAX_LOGPROB_FLOATS // llm.n_vocab()))
            self.chunks = [ids[i:i + n_ctx] for i in range(0, limit, n_ctx)]
            self.chunks = [c for c in self.chunks if len(c) >= 2]
            self.n_ctx = n_ctx
            self.reference = [self._logprobs(llm, c) for c in self.chunks]
        finally:
            llm.close()
        self.positions = sum(len(c) for c in self.chunks)

    @staticmethod
    def _logprobs(llm: Any, chunk: list[int]) -> Any:
        import numpy as np

        llm.reset()
        llm.eval(chunk)
        scores = np.array(llm.scores[: len(chunk)], dtype=np.float32)
        scores -= scores.max(-1, keepdims=True)
        return scores - np.log(np.exp(scores).sum(-1, keepdims=True))

    def measure(self, path: Path) -> Figures:
        """``path``'s KL to the reference at every position, one chunk in memory at a time."""
        import numpy as np

        from grpoctl.export.parity.llamacpp import open_gguf

        llm = open_gguf(path, self.n_ctx)
        kls, agree = [], 0
        try:
            for r, chunk in zip(self.reference, self.chunks, strict=True):
                t = self._logprobs(llm, chunk)
                kls.append(np.clip((np.exp(r) * (r - t)).sum(-1), 0, None))
                agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        finally:
            llm.close()
        kl = np.concatenate(kls)
        return Figures(kl=float(kl.mean()), kl_p99=float(np.quantile(kl, 0.99)), top1=agree / len(kl), kls=kl)


# --- the search -----------------------------------------------------------------------------------------

@dataclass
class _Move:
    group: Group
    direction: int  # +1 higher, -1 lower
    types: dict[str, str]
    delta_bytes: int  # bytes added (negative: saved)
    kl: float | None = None
    se: float = 0.0  # standard error of the change in mean KL, paired with the importance-matrix quant

    @property
    def changes(self) -> dict[str, str]:
        """tensor -> type for the tensors whose type the move changes (a tensor already at the end of its ladder
        keeps its own)."""
        return {t.name: self.types[t.name] for t in self.group.tensors if self.types[t.name] != t.type}

    def gain(self, base_kl: float) -> float:
        """KL an upgrade saves, counted only beyond ``MARGIN_SE`` standard errors (never negative)."""
        return max(0.0, base_kl - self.kl - MARGIN_SE * self.se)

    def cost(self, base_kl: float) -> float:
        """KL a downgrade adds, charged at ``MARGIN_SE`` standard errors above the measurement (never negative:
        fewer bits are not a gain, whatever one measurement says)."""
        return max(0.0, self.kl - base_kl + MARGIN_SE * self.se)


@dataclass
class _Payment:
    """A downgrade that may pay for an upgrade: part of a group (``parts``), one step lower."""

    part: Group
    types: dict[str, str]
    delta_bytes: int  # negative: the bytes it frees
    per_byte: float  # KL per byte freed its whole group cost when measured alone: the order payments are tried in
    alone: float  # its share of that measured change, by bytes (what the sum of measurements predicts)


@dataclass
class SearchResult:
    """What the search found for one type; ``path`` is the searched file in the work folder."""

    record: RecipeType
    path: Path
    recipe: Path


class _Clock:
    """The ETA of a run of llama.cpp passes, from the mean time of those done so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.began = total, 0, time.monotonic()

    def tick(self) -> str:
        self.done += 1
        left = (time.monotonic() - self.began) / self.done * max(0, self.total - self.done)
        return f"{self.done}/{self.total}, ETA {_clock(left)}"


def search(intermediate: Path, base_file: Path, type_name: str, matrix: Path, calib: CalibrationKL, work: Path,
           name: str, budget: int, request: RecipeRequest, threads: int | None = None,
           say: Say = print) -> SearchResult:
    """Search the per-tensor types of ``type_name`` starting from ``base_file`` (its importance-matrix quant);
    returns the searched file, its recipe and the record. ``budget``: the file may not be larger."""
    start = time.monotonic()
    label = TYPES[type_name].label
    tensors, alignment = read_tensors(base_file)
    base_types = {t.name: t.type for t in tensors if _quantized(t.type)}
    tensor_bytes = sum(t.bytes(alignment=alignment) for t in tensors)
    overhead = base_file.stat().st_size - tensor_bytes  # metadata: the same in every file made with the matrix
    room = budget - overhead - tensor_bytes  # bytes the recipe may add (negative: it must save them first)
    found = groups(tensors, request.bands)
    moves: list[_Move] = []
    for g in found:
        for way in (1, -1):
            if (moved := g.types(way)) is not None:
                delta = sum(t.bytes(moved[t.name], alignment) - t.bytes(alignment=alignment) for t in g.tensors)
                moves.append(_Move(g, way, moved, delta))
    base = calib.measure(base_file)
    # the trades measure at most as many mixes again as there are single moves: the search costs at most twice
    # the single measurements
    passes = len(moves)
    say(f"quant recipe {label}: {len(found)} tensor groups, {len(moves)} files to measure one group at a time and "
        f"at most {passes} mixes, on {calib.positions} calibration positions (base mean KL {base.kl:.5f})")
    work.mkdir(parents=True, exist_ok=True)
    # every group one step higher in one file and one step lower in another (llama-quantize, the matrix); a
    # variant or a mix is the importance-matrix quant with some tensors taken from them (per-tensor quantization
    # depends on nothing but the tensor and its matrix entry: the same bytes llama-quantize writes)
    donors: dict[int, Path] = {}
    for way in (1, -1):
        if any(m.direction == way for m in moves):
            moved = {**base_types, **{k: v for m in moves if m.direction == way for k, v in m.types.items()}}
            donors[way] = work / f"all-{'higher' if way > 0 else 'lower'}-{type_name}.gguf"
            quantize_recipe(intermediate, donors[way], type_name, matrix,
                            write_recipe(work / f"all-{way}{RECIPE_SUFFIX}", moved), threads)
    variant = work / f"variant-{type_name}.gguf"
    by_name = {t.name: t for t in tensors}

    def measure(changes: dict[str, str]) -> Figures:
        """The starting file with ``changes`` (tensor -> type, each one step from its own) on the text."""
        splice(base_file, {n: donors[direction(by_name[n], t)] for n, t in changes.items()}, variant)
        try:
            return calib.measure(variant)
        finally:
            variant.unlink()

    clock = _Clock(len(moves) + passes)
    for move in moves:
        delta, move.se = paired(base, measure(move.changes))
        move.kl = base.kl + delta
        say(f"  {move.group.name} {'higher' if move.direction > 0 else 'lower'} "
            f"({move.delta_bytes / 2**10:+.0f} KiB): mean KL {move.kl:.5f} ({delta:+.5f} +- {move.se:.5f}); "
            f"{clock.tick()}")

    ups, payments = candidates(moves, base.kl, alignment)
    changes, now, trades, used = trade(ups, payments, base, measure, room, passes, say, clock)
    for donor in donors.values():
        donor.unlink()
    final_types = {**base_types, **changes}
    recipe = write_recipe(work / f"{name}-{label}{RECIPE_SUFFIX}", final_types)
    out = work / f"searched-{type_name}.gguf"
    quantize_recipe(intermediate, out, type_name, matrix, recipe, threads)
    check_file(out, recipe)
    mine = calib.measure(out)
    size = out.stat().st_size
    delta, se = paired(base, mine)
    if size > budget:
        shipped, reason = False, f"the searched file is {size - budget} bytes larger than the budget"
    elif not changes:
        shipped, reason = False, ("no trade lowered the calibration KL of the whole mix beyond its standard error: "
                                  "the importance-matrix quant stays")
    elif delta + MARGIN_SE * se >= 0:
        shipped, reason = False, (f"its calibration KL {mine.kl:.5f} is not below the importance-matrix quant's "
                                  f"{base.kl:.5f} by more than {MARGIN_SE:g} standard error ({se:.5f})")
    else:
        shipped, reason = True, (f"calibration KL {mine.kl:.5f} vs {base.kl:.5f} for the importance-matrix quant "
                                 f"({delta:+.5f} +- {se:.5f}), {size} bytes within {budget}")
    taken = [t for t in trades if t.taken]
    predicted = base.kl + sum(m.kl - base.kl for m in ups if m.group.name in {t.upgrade for t in taken}) + sum(
        p.alone for p in payments if p.part.name in {n for t in taken for n in t.paid_with})
    written: dict[str, int] = {}
    for t in final_types.values():
        written[t] = written.get(t, 0) + 1
    records = []
    for g in found:
        by_dir = {m.direction: m for m in moves if m.group is g}
        up, down = by_dir.get(1), by_dir.get(-1)
        records.append(RecipeGroup(
            name=g.name, tensors=len(g.tensors), bytes=sum(t.bytes(alignment=alignment) for t in g.tensors),
            chosen=_chosen(g, base_types, final_types),
            higher_bytes=up.delta_bytes if up else None, higher_kl=_r(up.kl) if up else None,
            higher_se=_r(up.se) if up else None,
            lower_bytes=down.delta_bytes if down else None, lower_kl=_r(down.kl) if down else None,
            lower_se=_r(down.se) if down else None))
    seconds = round(time.monotonic() - start, 1)
    changed = sum(final_types[n] != base_types[n] for n in base_types)
    say(f"quant recipe {label}: {len(taken)} of {len(trades)} trades taken, {changed} tensors changed, calibration "
        f"mean KL {mine.kl:.5f} (importance-matrix quant {base.kl:.5f}, the measurements one group at a time "
        f"predicted {predicted:.5f}), {size / 2**20:.2f} MiB (budget {budget / 2**20:.2f} MiB), {seconds:.0f} s; "
        f"{'shipped' if shipped else 'not shipped: ' + reason}")
    record = RecipeType(recipe=recipe.name, sha256="", shipped=shipped, reason=reason, budget_bytes=budget,
                        bytes=size, calibration_kl=_r(mine.kl), base_calibration_kl=_r(base.kl),
                        predicted_kl=_r(predicted), tensor_types=dict(sorted(written.items())), changed=changed,
                        groups=records, variants=len(moves) + used, seconds=seconds, trades=trades)
    return SearchResult(record=record, path=out, recipe=recipe)


def _chosen(group: Group, base: dict[str, str], final: dict[str, str]) -> str:
    """``base``, ``higher``, ``lower``, or the parts lowered (``lower: ffn_up, ffn_down``)."""
    moved = [t for t in group.tensors if final[t.name] != base[t.name]]
    if not moved:
        return "base"
    if direction(moved[0], final[moved[0].name]) > 0:
        return "higher"
    if len(moved) == sum(step(t, -1) is not None for t in group.tensors):  # all that can go lower
        return "lower"
    return "lower: " + ", ".join(dict.fromkeys(p.name.rsplit(".", 1)[1] for p in parts(group)
                                               if any(t in moved for t in p.tensors)))


def candidates(moves: list[_Move], base_kl: float, alignment: int = 32) -> tuple[list[_Move], list[_Payment]]:
    """The upgrades worth trying, best first: those whose gain alone clears its standard error, by KL saved per
    byte, then those that measured any gain (bytes left over may go to them). The payments, cheapest first:
    each downgrade's parts (``parts``), by the KL per byte freed their group cost alone, charged one standard
    error above the measurement; the larger part first among equals."""
    measured = [m for m in moves if m.kl is not None]
    sure = sorted((m for m in measured if m.direction > 0 and m.gain(base_kl) > 0),
                  key=lambda m: m.gain(base_kl) / max(m.delta_bytes, 1), reverse=True)
    maybe = sorted((m for m in measured if m.direction > 0 and m.kl < base_kl and m not in sure),
                   key=lambda m: (base_kl - m.kl) / max(m.delta_bytes, 1), reverse=True)
    payments = []
    for m in measured:
        if m.direction > 0 or m.delta_bytes >= 0:
            continue
        for part in parts(m.group):
            types = {t.name: m.types[t.name] for t in part.tensors if m.types[t.name] != t.type}
            freed = sum(t.bytes(types[t.name], alignment) - t.bytes(alignment=alignment) for t in part.tensors
                        if t.name in types)
            if freed < 0:
                payments.append(_Payment(part, types, freed, m.cost(base_kl) / -m.delta_bytes,
                                         (m.kl - base_kl) * freed / m.delta_bytes))
    payments.sort(key=lambda p: (p.per_byte, p.delta_bytes))
    return sure + maybe, payments


def trade(ups: list[_Move], payments: list[_Payment], base: Figures, measure: Callable[[dict[str, str]], Figures],
          room: int, passes: int, say: Say = print,
          clock: _Clock | None = None) -> tuple[dict[str, str], Figures, list[RecipeTrade], int]:
    """Trades, each measured as the whole mix it makes (``measure``: tensor -> type changes from the starting
    file, to the figures of that file on the calibration text), never as a sum of single measurements.

    For each upgrade, best first: the mix with it is measured; it counts only when the mix's KL falls beyond
    ``MARGIN_SE`` standard errors (paired with the mix before). When the bytes would pass the budget, payments
    are added one at a time, cheapest first, the mix measured after each: a payment is kept while what it costs
    in the mix (one standard error above the measurement) is less than the upgrade saves for the bytes it must
    cover; a payment refused once is not tried again. The trade is taken when the bytes fit and the whole mix
    is below the mix before it by more than a standard error; otherwise the mix stays as it was and its kept
    payments go back to the queue. At most ``passes`` mixes are measured. Returns the changes, the figures of
    the final mix, a record of each trade and the passes used."""
    mix: dict[str, str] = {}
    now = base
    queue = list(payments)
    trades: list[RecipeTrade] = []
    used = 0

    def run(changes: dict[str, str], what: str) -> Figures:
        nonlocal used
        used += 1
        got = measure(changes)
        say(f"  mix {what}: mean KL {got.kl:.5f}" + (f"; {clock.tick()}" if clock else ""))
        return got

    for up in ups:
        if used >= passes:
            break
        if any(n in mix for n in up.types):
            continue
        trial = {**mix, **up.changes}
        at = run(trial, f"+ {up.group.name} higher")
        delta, se = paired(now, at)
        gain = -delta - MARGIN_SE * se
        record = RecipeTrade(upgrade=up.group.name, bytes=up.delta_bytes, kl_before=_r(now.kl), kl_upgraded=_r(at.kl))
        trades.append(record)
        if gain <= 0:
            record.why = f"in the mix it saves {-delta:+.5f} +- {se:.5f}: no gain beyond the standard error"
            continue
        rate = gain / max(up.delta_bytes, 1)
        need = up.delta_bytes - room
        kept: list[_Payment] = []
        for pay in list(queue):
            if need <= 0 or used >= passes:
                break
            if any(n in trial for n in pay.types):
                continue
            queue.remove(pay)
            after = run({**trial, **pay.types}, f"+ {up.group.name} higher, {pay.part.name} lower")
            d, s = paired(at, after)
            cost = max(0.0, d + MARGIN_SE * s)
            if cost < rate * min(-pay.delta_bytes, need):
                kept.append(pay)
                trial, at, need = {**trial, **pay.types}, after, need + pay.delta_bytes
                record.paid_with.append(pay.part.name)
            else:
                record.refused.append(pay.part.name)
        delta, se = paired(now, at)
        record.kl_after, record.se = _r(at.kl), _r(se)
        if need > 0:
            record.why = f"{need} bytes over the budget with every payment tried"
        elif delta + MARGIN_SE * se >= 0:
            record.why = f"the whole mix moves {delta:+.5f} +- {se:.5f}: no gain beyond the standard error"
        else:
            record.taken, record.why = True, f"the whole mix moves {delta:+.5f} +- {se:.5f}"
            mix, now, room = trial, at, -need
            continue
        queue = sorted(queue + kept, key=lambda p: (p.per_byte, p.delta_bytes))
    return mix, now, trades, used


def confirm_held_out(record: RecipeType, searched_kl: float, matrix_kl: float) -> bool:
    """The last word on shipping: the searched file must also beat the importance-matrix quant on the held-out
    probes (mean KL). The search chose on the calibration text only; a file better there and worse on text it
    never saw has fitted that text, and the importance-matrix quant ships instead. Returns ``record.shipped``."""
    if record.shipped and searched_kl >= matrix_kl:
        record.shipped = False
        record.reason = (f"on the held-out probes its mean KL {searched_kl:.5f} is not below the importance-matrix "
                         f"quant's {matrix_kl:.5f} (calibration KL {record.calibration_kl:.5f} vs "
                         f"{record.base_calibration_kl:.5f})")
    return record.shipped


def _r(x: float | None) -> float | None:
    return round(x, 6) if x is not None else None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- the table ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One column of the per-type table: its header, width and how a row shows it (another measure of the same
    files adds a column here and its value to ``QuantRow.columns``)."""

    header: str
    width: int
    cell: Callable[[QuantRow], str]


COLUMNS: list[Column] = [
    Column("size MiB", 9, lambda r: f"{r.bytes / 2**20:.2f}"),
    Column("mean KL", 9, lambda r: f"{r.kl:.5f}"),
    Column("p99 KL", 8, lambda r: f"{r.kl_p99:.4f}" if r.kl_p99 is not None else "-"),
    Column("top-1", 7, lambda r: f"{r.top1 * 100:.1f}%"),
]


def extra_columns(rows: list[QuantRow]) -> list[Column]:
    """A column for each further measure the rows carry (``QuantRow.columns``), in the order first seen."""
    names = list(dict.fromkeys(k for r in rows for k in r.columns))
    return [Column(k, max(9, len(k)), lambda r, k=k: f"{r.columns[k]:.4g}" if k in r.columns else "-") for k in names]


def format_table(section: QuantRecipeSection, probe_positions: int) -> str:
    """One table per export: every searched type's plain, importance-matrix and searched files on the probes."""
    rows_all = [r for t in section.types.values() for r in t.rows]
    cols = COLUMNS + extra_columns(rows_all)
    lines = [f"quant recipe: plain vs importance matrix vs searched recipe, on the held-out probes "
             f"({probe_positions} positions; the search saw only {section.positions} positions of "
             f"{section.calibration})",
             f"{'type':8} {'file':9}" + "".join(f" {c.header:>{c.width}}" for c in cols) + "  shipped"]
    for t, rec in section.types.items():
        for r in rec.rows:
            lines.append(f"{TYPES[t].label:8} {r.variant:9}" + "".join(f" {c.cell(r):>{c.width}}" for c in cols)
                         + ("  *" if r.shipped else ""))
        lines.append(f"{'':8} recipe {rec.recipe}: {rec.changed} tensors changed, {rec.variants} files measured in "
                     f"{rec.seconds:.0f} s; {'shipped' if rec.shipped else 'not shipped'} ({rec.reason})")
    return "\n".join(lines)


def row(variant: str, path: Path, figures: ParityResult, shipped: bool) -> QuantRow:
    """A table row from parity's figures for one file (``grpoctl.export.parity.measure``)."""
    return QuantRow(variant=variant, bytes=path.stat().st_size, top1=figures.top1, kl=figures.kl,
                    kl_p99=figures.kl_p99, shipped=shipped)


def section(results: dict[str, RecipeType], calib: CalibrationKL, calibration_name: str, reference: str,
            request: RecipeRequest) -> QuantRecipeSection:
    return QuantRecipeSection(
        method=(f"trades over {request.bands} bands of layers (attention, MLP) + token embedding + output head, "
                "each group measured one type step higher and lower by llama-quantize --tensor-type-file with the "
                "importance matrix, then each upgrade and the downgrades paying for it (MLP tensors one kind at a "
                "time) measured in the whole mix they make; KL of llama.cpp's next-token distributions against the "
                f"16-bit GGUF, each change paired with the mix before it and counted net of {MARGIN_SE:g} standard "
                f"error over blocks of {SE_BLOCK} positions"),
        calibration=calibration_name, positions=calib.positions, reference=reference, types=results)


def search_types(built: dict[str, Any], plan: Any, types: list[str], work: Path, name: str, request: RecipeRequest,
                 threads: int | None = None, say: Say = print) -> tuple[CalibrationKL, dict[str, SearchResult]]:
    """The search for every type made with the importance matrix (``plan``: ``grpoctl.export.imatrix.Imatrix``),
    from ``built`` (``grpoctl.export.gguf.convert_all``'s files, the 16-bit intermediate kept)."""
    inter = built["_intermediate"]
    calib = CalibrationKL(inter, plan.calibration.read_text(encoding="utf-8"), request.positions)
    results: dict[str, SearchResult] = {}
    for t in types:
        if t not in plan.quants:
            continue
        sizes = [built[t].stat().st_size] + ([built[f"plain:{t}"].stat().st_size] if f"plain:{t}" in built else [])
        results[t] = search(inter, built[t], t, plan.matrix, calib, work, name, min(sizes), request, threads, say)
    return calib, results
