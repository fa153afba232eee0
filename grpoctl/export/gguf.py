"""GGUF export: one conversion pass from base + adapter, every quant from it, and a parity report.

    base (16-bit safetensors) + LoRA adapter
        -> llama.cpp converter, each adapted tensor merged as it streams   (no merged copy on disk)
        -> one 16-bit GGUF (kept when f16/bf16 is asked for, else a temporary intermediate)
        -> llama_cpp.llama_model_quantize per requested type (q8_0, q4_k_m, q5_k_m, ...)
        -> every file loaded in llama.cpp and compared with base + adapter applied by PEFT in transformers
        -> EXPORT/gguf/<Name>-<QUANT>.gguf, parity.json, artifacts.json entries

Files appear under their final names only after they loaded in llama.cpp and passed the parity gate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpoctl import quiet
from grpoctl.artifacts import Artifacts, ParityResult
from grpoctl.errors import ConversionError, DiskFullError, GrpoctlError, InputNotFoundError, ParityError, UsageError
from grpoctl.export import pretokenizer, reference_cache
from grpoctl.export.converter import Converter, find_converter
from grpoctl.export.imatrix import Imatrix, ImatrixRequest, check_types, format_comparison
from grpoctl.export.parity.llamacpp import open_gguf
from grpoctl.export.parity.measure import measure
from grpoctl.export.parity.reference import prepare_reference, reference_plan
from grpoctl.export.parity.report import format_table, report, write_report
from grpoctl.export.parity.scoring import ENV_FLOORS, FALLBACK_FLOOR, Floor, parse_floors
from grpoctl.export.quantize import quantize
from grpoctl.export.recipe import RecipeRequest
from grpoctl.export.taskparity import TaskParity, TaskRequest
from grpoctl.export.taskparity import format_rows as format_task_rows
from grpoctl.exportlayout import PARITY_FILE
from grpoctl.fsutil import DISK_FULL, check_free_space, disk_full_cause, no_space_left, scratch_dir
from grpoctl.gguftypes import SIXTEEN_BIT, TYPES, estimate_gguf_bytes
from grpoctl.models import TOKENIZER_FILES, config_dtype, has_tokenizer, tokenizer_bytes
from grpoctl.procs import run_child
from grpoctl.rundir import RunDir
from grpoctl.threads import default_threads

# where progress lines and the parity table go: the export's one output channel (silent under --quiet)
Say = Callable[[str], None]


def gguf_filename(name: str, type_name: str) -> str:
    """Hub convention: ``SmolLM2-135M-Instruct-grpo-Q4_K_M.gguf``."""
    return f"{name}-{TYPES[type_name].label}.gguf"


def export_gguf(model_dir: Path, adapter_dir: Path | None, out_dir: Path, types: list[str], *, name: str,
                artifacts: Artifacts, merged_dir: Path | None = None, llama_cpp_dir: Path | None = None,
                parity_gate: bool = True, system_prompt: str | None = None,
                floors: dict[str, Floor] | None = None, imatrix: ImatrixRequest | None = None,
                refused_report: Path | None = None, task: TaskRequest | None = None, run: RunDir | None = None,
                recipe: RecipeRequest | None = None, parity_device: str | None = None,
                parity_reference: str | None = None, pre_tokenizer: str | None = None, parity_cache: bool | None = None,
                say: Say = print) -> list[Path]:
    """Write ``<name>-<QUANT>.gguf`` for every type into ``out_dir`` plus ``parity.json``; record them in
    ``artifacts`` (kind ``gguf:<type>``, section ``parity``). The caller saves the artifacts. ``types`` are
    canonical names (``ExportOptions`` parses what the user typed).

    ``imatrix``: quantize with an importance matrix (``grpoctl.export.imatrix``); the matrix and its
    calibration text are written beside the files, and parity.json compares each type with its plain quant.
    ``recipe``: also search per-tensor types for each of those types (``grpoctl.export.recipe``); a searched
    file that beats the importance-matrix quant on the calibration text ships in its place, with its recipe.

    ``task``: task parity's options (``grpoctl.export.taskparity``; None: its defaults) on ``run``'s held-out
    prompts and rewards: after the KL parity each file answers them and is scored with the run's rewards.

    ``merged_dir``, when the merged 16-bit folder was written anyway, is converted instead of merging
    again. The parity reference is always the base plus the adapter applied by PEFT (never grpoctl's merge,
    nor that folder). Raises ParityError when a file is below its floor and ``parity_gate`` is on (failing
    files are not kept; parity.json says why, and a copy goes to ``refused_report`` when given: where the report
    outlives an ``out_dir`` that the refusal removes, as a staged export's).

    ``floors``, ``parity_device``, ``parity_reference`` ("memory" | "stream"), ``parity_cache`` and ``pre_tokenizer``
    are ``grpoctl export``'s options of those names; None: their environment variables, else the defaults.
    """
    if unknown := [t for t in types if t not in TYPES]:
        raise UsageError(f"unknown GGUF type {unknown[0]!r}; valid types: {', '.join(TYPES)}")
    check_types(types, with_matrix=imatrix is not None)
    if recipe is not None:
        from grpoctl.export import recipe as recipes

        recipes.check_request(recipe.method, imatrix is not None and imatrix.matrix is None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if merged_dir is not None:
        source, adapter = Path(merged_dir), None
    else:
        source, adapter = model_dir, (Path(adapter_dir) if adapter_dir else None)
    if not (source / "config.json").is_file():
        raise InputNotFoundError(f"model folder {source} has no config.json")
    converter = find_converter(fetch=True, llama_cpp_dir=llama_cpp_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_disk_space(source, types, out_dir)
    # types written now replace their earlier files; the export's other GGUFs and their parity records stay
    kept = {n: f for n, f in (artifacts.parity.files if artifacts.parity else {}).items()
            if any(Path(e.path).name == n for q, e in artifacts.ggufs().items() if q not in types)}
    floors = floors if floors is not None else parse_floors(os.environ.get(ENV_FLOORS))

    with tempfile.TemporaryDirectory(prefix=".gguf-work-", dir=out_dir) as work_str:
        work = Path(work_str)
        view = model_view(source, adapter_dir, work / "model")
        plan = Imatrix.prepare(imatrix, source, adapter, view, end_of_turn_ids(view), work / "imatrix", name, say) \
            if imatrix is not None else None
        built = convert_all(converter, view, adapter, work, types, name=name, say=say, pre_tokenizer=pre_tokenizer,
                            metadata=gguf_metadata(name, model_dir, Path(adapter_dir) if adapter_dir else None),
                            imatrix=plan, keep_intermediate=recipe is not None)
        eot_ids = built["_info"]["eot_token_ids"]
        searched: dict[str, Any] = {}
        if recipe is not None and plan is not None:
            calib, searched = recipes.search_types(built, plan, types, work / "recipe", name, recipe, say=say)
            for t, found in searched.items():
                if found.record.shipped:  # the importance-matrix quant becomes a measured comparison, like plain
                    built[f"imatrix:{t}"], built[t] = built[t], found.path
            if built["_intermediate"] not in [built.get(t) for t in types]:
                built["_intermediate"].unlink(missing_ok=True)

        for t in types:  # a file llama.cpp cannot load fails the export before anything else is spent on it
            open_gguf(built[t], 64).close()

        what = "base + adapter applied by PEFT" if adapter_dir else "the model"
        ref_plan = reference_plan(model_dir, Path(adapter_dir) if adapter_dir else None, parity_device,
                                  parity_reference)
        how = "weights streamed layer by layer" if ref_plan[1] else "in memory"
        say(f"parity: running {what} in transformers (float32 reference on {ref_plan[0]}, {how}; bf16 noise floor; "
            "a bar per pass)")
        tasks = TaskParity.prepare(task, run, view, streamed=ref_plan[1], device=ref_plan[0])
        with reference_cache.switched(parity_cache):
            ref = prepare_reference(model_dir, Path(adapter_dir) if adapter_dir else None, view, system_prompt,
                                    eot_ids, plan=ref_plan, work=tasks.reference_work() if tasks else None)
        if ref.reused:
            say("parity: the reference's results (and its noise floor) kept from an earlier export of the same base, "
                "adapter and probes")
        if tasks is not None and tasks.ref_kept:
            say("task parity: the reference's answers kept from an earlier export of the same base, adapter and "
                "prompts (scored again with the run's rewards)")
        files: dict[str, ParityResult] = {}
        for i, t in enumerate(types, 1):
            fname = gguf_filename(name, t)
            say(f"parity: {fname} in llama.cpp (file {i}/{len(types)}, {len(ref.probes)} probes)")
            files[fname] = measure(built[t], t, ref, floors.get(t, FALLBACK_FLOOR))
        if tasks is not None:
            tasks.measure(files, {gguf_filename(name, t): built[t] for t in types}, say)
        rep = report(ref, files)
        if tasks is not None:
            rep.task = tasks.section()
        conversion = built.get("_info", {})
        say("\n".join([format_table(rep), *format_task_rows(rep)]))
        if plan is not None:
            def probe(path: Path, t: str) -> ParityResult:
                return measure(path, t, ref, FALLBACK_FLOOR)

            matrix_files = {**files, **{gguf_filename(name, t): probe(built[f"imatrix:{t}"], t)
                                        for t in types if f"imatrix:{t}" in built}}
            comparison = plan.compare(built, matrix_files, {t: gguf_filename(name, t) for t in types}, probe)
            rep.imatrix = comparison
            say(format_comparison(comparison, ref.noise["positions"]))
            if searched:
                for t, found in searched.items():
                    fname = gguf_filename(name, t)
                    mine = files[fname] if found.record.shipped else probe(found.path, t)
                    if found.record.shipped and not recipes.confirm_held_out(
                            found.record, mine.kl, matrix_files[fname].kl):
                        built[t] = built.pop(f"imatrix:{t}")  # the importance-matrix quant ships after all
                        files[fname] = rep.files[fname] = measure(built[t], t, ref, floors.get(t, FALLBACK_FLOOR))
                        say(f"quant recipe {TYPES[t].label}: not shipped, {found.record.reason}")
                    shipped = found.record.shipped
                    rows = [recipes.row("imatrix", built[f"imatrix:{t}"] if shipped else built[t],
                                        matrix_files[fname], not shipped),
                            recipes.row("searched", found.path, mine, shipped)]
                    if f"plain:{t}" in built:
                        rows.insert(0, recipes.row("plain", built[f"plain:{t}"], probe(built[f"plain:{t}"], t), False))
                    found.record.rows = rows
                recipe_section = recipes.section({t: f.record for t, f in searched.items()}, calib,
                                                 plan.calibration_record.file, gguf_filename(
                                                     name, built["_info"]["intermediate"]), recipe)
                say(recipes.format_table(recipe_section, ref.noise["positions"]))
        elif artifacts.parity is not None and artifacts.parity.imatrix is not None:
            rep.imatrix = artifacts.parity.imatrix  # the kept matrix quants' comparison stays with them
        rep.files = {**kept, **rep.files}
        rep.passed = all(f.passed for f in rep.files.values())

        written: list[tuple[Path, str]] = []
        for t in types:
            fname = gguf_filename(name, t)
            if parity_gate and not files[fname].passed:
                continue  # a file that fails its gate is not left looking like a finished artifact
            final = out_dir / fname
            os.replace(built[t], final)
            written.append((final, t))
        if plan is not None:  # the matrix and its calibration text go with the files made from them
            plan.publish(out_dir, artifacts, [t for _, t in written])
        recipe_files = {}
        for t, found in searched.items():  # a recipe goes with the file made from it
            if found.record.shipped and any(t == w for _, w in written):
                final = out_dir / found.recipe.name
                os.replace(found.recipe, final)
                found.record.sha256 = artifacts.add_file(final, "recipe").sha256
                recipe_files[t] = final.name
    write_report(rep, out_dir / PARITY_FILE, conversion)

    artifacts.files = [f for f in artifacts.files if f.kind not in {f"gguf:{t}" for t in types}]
    for path, t in written:
        f = files[path.name]
        artifacts.add_file(path, f"gguf:{t}", top1=f.top1, kl=f.kl, passed=f.passed,
                           imatrix=plan.matrix_name if plan is not None and t in plan.quants else None,
                           recipe=recipe_files.get(t))
    artifacts.files = [f for f in artifacts.files if not (f.kind == "recipe" and not any(
        g.recipe == Path(f.path).name for g in artifacts.by_kind("gguf")))]  # a recipe whose file was remade
    kept_recipes = {t: r for t, r in (artifacts.quant_recipe.types if artifacts.quant_recipe else {}).items()
                    if t not in types}
    if searched:
        artifacts.quant_recipe = recipe_section
        artifacts.quant_recipe.types = {**kept_recipes, **artifacts.quant_recipe.types}
    elif artifacts.quant_recipe is not None:
        artifacts.quant_recipe.types = kept_recipes
        if not kept_recipes:
            artifacts.quant_recipe = None
    artifacts.add_file(out_dir / PARITY_FILE, "report")
    artifacts.parity = rep

    failed = [n for n, f in files.items() if not f.passed]
    if failed and parity_gate:
        kept_at = out_dir / PARITY_FILE
        if refused_report is not None:
            kept_at = write_report(rep, Path(refused_report), conversion)
        raise ParityError(f"{', '.join(failed)} below the parity floor ({_why(files[failed[0]])}); see "
                          f"{kept_at}; pass --no-parity-gate to keep such files anyway")
    return [p for p, _ in written]


def _why(f: ParityResult) -> str:
    tok = f.tokenizer
    if not tok.get("ok", True):
        bad = [k for k in ("bos_once", "chat_ids_match", "template_matches") if tok.get(k) is False]
        template = tok.get("template") if isinstance(tok.get("template"), dict) else {}
        bad += [f"chat template departs on {d['name']!r}" for d in template.get("departures", [])]
        bad += [f"{t} not end-of-generation" for t, ok in tok.get("eog", {}).items() if not ok]
        return "tokenizer: " + ", ".join(bad)
    fl, task = f.floor, f.task
    below = (fl.top1 is not None and f.top1 < fl.top1) or (fl.kl is not None and f.kl > fl.kl)
    if task and not task.passed and not below:
        d = task.difference
        return (f"task parity: mean reward {task.mean_reward:.3f}, {d.mean:+.3f} against the reference "
                f"(95% interval {d.low:+.3f} to {d.high:+.3f})")
    return (f"top-1 {f.top1 * 100:.1f}%" + (f" vs >= {fl.top1 * 100:.1f}%" if fl.top1 is not None else "")
            + f", mean KL {f.kl:.4f}" + (f" vs <= {fl.kl:g}" if fl.kl is not None else ""))


# --- conversion ----------------------------------------------------------------------------------

def convert_all(converter: Converter, view: Path, adapter: Path | None, work: Path, types: list[str], *, name: str,
                metadata: dict[str, Any], eot_ids: list[int] | None = None, threads: int | None = None,
                imatrix: Imatrix | None = None, keep_intermediate: bool = False, pre_tokenizer: str | None = None,
                say: Say = print) -> dict[str, Any]:
    """Convert once, quantize the rest; returns {type: path in ``work``} (+ ``_info``). With ``imatrix``, the
    types that read a matrix are made with it, and their plain quants (``plain:<type>``) beside for comparison.
    ``keep_intermediate``: the 16-bit intermediate stays (``_intermediate``) for the caller to remove."""
    direct = [t for t in types if TYPES[t].source == "convert"]
    rest = [t for t in types if TYPES[t].source != "convert"]
    built: dict[str, Any] = {}
    if len(types) == 1 and direct:
        intermediate_type, keep = direct[0], True  # one converter-native type: a single pass, no intermediate
    else:
        asked16 = [t for t in types if t in SIXTEEN_BIT]
        intermediate_type = asked16[0] if asked16 else source_16bit_type(view)
        keep = bool(asked16)
    inter = work / gguf_filename(name, intermediate_type)
    start = time.perf_counter()
    what = "base + adapter, merged per tensor" if adapter else "model"
    say(f"converting {what} -> {intermediate_type.upper()} with llama.cpp's converter")
    info = convert(converter, view, adapter, inter, intermediate_type, name=name, eot_ids=eot_ids, metadata=metadata,
                   pre_tokenizer=pre_tokenizer)
    info["convert_s"] = round(time.perf_counter() - start, 2)
    if keep:
        built[intermediate_type] = inter
    for t in [t for t in direct if t != intermediate_type] + rest:
        dst = work / gguf_filename(name, t)
        with_matrix = imatrix is not None and TYPES[t].reads_imatrix
        if with_matrix and "imatrix_s" not in info:
            start = time.perf_counter()
            imatrix.matrix_for(inter, threads)
            info["imatrix_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        say(f"quantizing -> {dst.name} (llama.cpp{', importance matrix' if with_matrix else ''}, "
            f"{threads or default_threads()} threads)")
        if with_matrix:
            imatrix.quantize(inter, dst, t, threads)
        else:
            quantize(inter, dst, t, threads, say=say)
        info[f"quantize_{t}_s"] = round(time.perf_counter() - start, 2)
        say(f"  {dst.name}: {dst.stat().st_size / 2**20:.0f} MiB in {info[f'quantize_{t}_s']:.1f} s")
        built[t] = dst
        if with_matrix and (plain := imatrix.plain(inter, t, threads)) is not None:
            built[f"plain:{t}"] = plain  # measured beside it, never shipped
    if keep or keep_intermediate:
        built["_intermediate"] = inter
    else:
        inter.unlink(missing_ok=True)
    info["intermediate"] = intermediate_type
    built["_info"] = info
    return built


def convert(converter: Converter, model_dir: Path, adapter_dir: Path | None, outfile: Path, outtype: str, *,
            name: str, eot_ids: list[int] | None = None, metadata: dict[str, Any] | None = None,
            verbose: bool = False, pre_tokenizer: str | None = None) -> dict[str, Any]:
    """Run llama.cpp's converter (with grpoctl's hooks) in a subprocess; raise ConversionError on failure.

    ``eot_ids`` None: the end-of-turn tokens are worked out from the model's template in the subprocess.
    ``pre_tokenizer``: the llama.cpp pre-tokenizer type to write (None: $GRPOCTL_GGUF_PRE_TOKENIZER, else the
    one recognised). Under ``grpoctl.quiet`` the converter's stderr is held, and shown only when it fails.
    """
    with scratch_dir("convert") as tmp:
        tmp_path = Path(tmp)
        meta_file = None
        if metadata:
            meta_file = tmp_path / "metadata.json"
            meta_file.write_text(json.dumps(metadata))
        spec = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
                "outfile": str(outfile), "outtype": outtype, "model_name": name, "eot_token_ids": eot_ids,
                "metadata_file": str(meta_file) if meta_file else None, "result_file": str(tmp_path / "result.json"),
                "verbose": verbose}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": converter.python_path(), "NO_LOCAL_GGUF": "1"}
        if pre_tokenizer:
            env[pretokenizer.ENV_OVERRIDE] = pre_tokenizer  # how the child takes it (the env var is its fallback)
        stderr = _HeldTraceback(hold_all=quiet.active())
        try:
            code = run_child([sys.executable, "-m", "grpoctl.export.convert_worker", str(tmp_path / "spec.json")],
                             env=env, stderr=subprocess.PIPE, while_running=stderr.forward)
        except BaseException:
            outfile.unlink(missing_ok=True)  # the child is gone (run_child waits), so nothing rewrites it
            raise
        result_file = tmp_path / "result.json"
        try:
            result = json.loads(result_file.read_text()) if result_file.is_file() else None
        except ValueError:
            result = None
    if code != 0 or not result or not result.get("ok"):
        detail = result["message"] if result else f"exit code {code}"
        # numpy's short tofile() carries no errno: a full file system (checked before the partial file goes) says it
        full = _disk_full(detail + stderr.held) or no_space_left(outfile.parent)
        outfile.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"disk full while llama.cpp's converter wrote {outfile.parent}: {detail}") \
                from disk_full_cause(outfile)
        stderr.release()
        if result and result.get("kind") in ("arch", "pretokenizer", "adapter"):
            cls = UsageError if result["kind"] == "arch" else ConversionError
            raise cls(result["message"])
        raise ConversionError(f"llama.cpp's converter failed on {model_dir}: {detail} (its messages are above)")
    return result


def _disk_full(text: str) -> bool:
    return any(f"[Errno {n}]" in text or os.strerror(n) in text for n in DISK_FULL)


class _HeldTraceback:
    """Passes a child's stderr through as it comes (the converter's warnings and progress) except a Python
    traceback, which is held until the caller knows whether it is worth showing: a full disk is one line.
    ``hold_all`` (quiet output): everything is held, shown only by :meth:`release` when the child failed."""

    MARK = b"Traceback (most recent call last):"

    def __init__(self, hold_all: bool = False) -> None:
        self._held = bytearray()
        self._hold_all = hold_all

    @property
    def held(self) -> str:
        return self._held.decode(errors="replace")

    def forward(self, proc: subprocess.Popen) -> None:
        pending = b""  # a tail that may be the start of MARK, written once the next bytes show it is not
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            if self._held or self._hold_all:
                self._held += chunk
                continue
            buf, pending = pending + chunk, b""
            at = buf.find(self.MARK)
            if at >= 0:
                _write_stderr(buf[:at])
                self._held += buf[at:]
                continue
            keep = next((n for n in range(min(len(buf), len(self.MARK) - 1), 0, -1)
                         if self.MARK.startswith(buf[-n:])), 0)
            _write_stderr(buf[:len(buf) - keep])
            pending = buf[len(buf) - keep:]
        _write_stderr(pending)
        proc.stderr.close()

    def release(self) -> None:
        _write_stderr(bytes(self._held))
        self._held.clear()


def _write_stderr(data: bytes) -> None:
    if data:
        sys.stderr.flush()
        os.write(2, data)


def source_16bit_type(model_dir: Path) -> str:
    """bf16 when the weights are bf16 (no rounding at all), else f16."""
    return "bf16" if "bfloat16" in (config_dtype(model_dir) or "") else "f16"


def model_view(model_dir: Path, adapter_dir: Path | None, dest: Path) -> Path:
    """A folder of symlinks to the model's files, with the run's tokenizer files (if any) in place of the base's.

    The converter reads config, weights and tokenizer from one folder; the trained run may carry its own
    tokenizer/chat template next to the adapter. Links cost nothing, so the base is never copied.
    """
    dest.mkdir(parents=True)
    # tokenizer files a training run may have changed (added tokens, chat template) override the base's
    overlay = has_tokenizer(adapter_dir)
    for p in Path(model_dir).iterdir():
        if p.is_file() and not (overlay and p.name in TOKENIZER_FILES):
            (dest / p.name).symlink_to(p.resolve())
    if overlay:
        for f in TOKENIZER_FILES:
            if (Path(adapter_dir) / f).is_file():
                shutil.copy2(Path(adapter_dir) / f, dest / f)
    return dest


def end_of_turn_ids(model_dir: Path) -> list[int]:
    """Tokens that end a turn: what the chat template puts right after an assistant message, plus the EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    if getattr(tok, "chat_template", None):
        marker = "ZQXJ marker"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False)
        except Exception:
            text = ""
        if marker in text:
            tail = tok(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
            for t in tail[:2]:
                if t in special:
                    ids.append(t)
                    break
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def gguf_metadata(name: str, model_dir: Path, adapter_dir: Path | None) -> dict[str, Any]:
    """general.* keys for the converter's metadata override: name, license, base model."""
    from gguf.constants import Keys

    meta: dict[str, Any] = {Keys.General.NAME: name}
    base_id, license_ = _base_identity(model_dir, adapter_dir)
    if license_:
        meta[Keys.General.LICENSE] = license_
    if base_id:
        entry: dict[str, Any] = {"name": base_id.split("/")[-1]}
        if base_id.count("/") == 1 and not base_id.startswith(("/", ".")):
            entry["organization"] = base_id.split("/")[0]
            entry["repo_url"] = f"https://huggingface.co/{base_id}"
        meta["general.base_models"] = [entry]  # the override file's own key (gguf.Metadata.load), not a GGUF key
    return meta


def _base_identity(model_dir: Path, adapter_dir: Path | None) -> tuple[str | None, str | None]:
    """The base's Hub id and license as ``grpoctl.models.identify`` works them out, else the base the adapter
    names (by its folder name when that is a path)."""
    from grpoctl.models import identify
    from grpoctl.rundir import BaseModelRef

    ref = identify(BaseModelRef(id=str(model_dir), path=str(model_dir)))
    base_id = ref.hub_id
    if base_id is None and adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
        base_id = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base_id and Path(base_id).is_absolute():
        base_id = Path(base_id).name
    return base_id, ref.license


def check_disk_space(source: Path, types: list[str], out_dir: Path) -> None:
    """Refuse to start when the files (and the intermediate) cannot fit on the output's disk: the export's own
    estimate (``grpoctl.gguftypes.estimate_gguf_bytes`` of the 16-bit weights and the tokenizer files)."""
    from grpoctl.export.merge import estimate_bytes
    from grpoctl.export.tensors import ModelWeights

    try:
        weights = ModelWeights(source)
    except GrpoctlError:  # unreadable weights fail later with their own message
        return
    need = estimate_gguf_bytes(estimate_bytes(weights, "BF16"), types, vocab_bytes=tokenizer_bytes(source))
    check_free_space(out_dir, need, f"GGUF export of {', '.join(types)}")
