"""Training data: load any ``datasets`` source or local file, map fields, render with the chat template,
drop the longest prompts and derive prompt/completion lengths the way the seed does."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from grpoctl.config import DataConfig
from grpoctl.errors import DataError, InputNotFoundError, OfflineError
from grpoctl.models import looks_like_hub_id

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes of data files: a name ending in one is a file the user meant, never a Hub dataset id.
_DATA_SUFFIXES = (*_FILE_BUILDERS, ".tsv", ".txt", ".arrow", ".gz", ".zst", ".xz", ".bz2")
# Column names datasets commonly use for each role, for the hint when the mapped ones are missing.
_LIKELY_COLUMNS = {
    "prompt": ("question", "problem", "prompt", "query", "instruction", "input"),
    "solution": ("answer", "solution", "response", "output", "completion"),
}


def shipped_dataset() -> Path:
    """The GSM8K-style arithmetic set that ships with grpoctl (``question`` / ``answer`` with ``#### N``)."""
    return Path(str(resources.files("grpoctl") / "data" / "arith_gsm.jsonl"))


def load_source(spec: str | None, subset: str | None = None, split: str = "train") -> Any:
    """A ``datasets.Dataset`` from nothing (the shipped set), a local file or folder, or a ``datasets`` name."""
    import datasets

    datasets.disable_progress_bars()
    if spec is None:
        spec = str(shipped_dataset())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
            try:
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as e:
                raise DataError(f"{path} could not be read as {builder}: {type(e).__name__}: {e}") from None
        try:
            saved = path / "dataset_info.json"
            if saved.is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return datasets.load_dataset(str(path), subset, split=split)
        except Exception as e:
            raise DataError(f"{path} could not be loaded as a dataset: {type(e).__name__}: {e}") from None
    check_source(spec)
    return _load_by_name(spec, subset, split)


def check_source(spec: str | None) -> None:
    """Fail at once on a dataset named like a local path that is not there, instead of asking the Hub for it."""
    if spec is None:
        return
    path = Path(spec).expanduser()
    if not path.exists() and looks_like_local_path(spec):
        raise InputNotFoundError(f"dataset file {spec} does not exist{_did_you_mean(path)}")


def looks_like_local_path(spec: str) -> bool:
    """What the user typed is a path on this machine, not a ``datasets`` Hub id: it is not shaped like
    ``owner/name``, ends in a data file suffix, or its first folder exists here (``data/problem.jsonl``)."""
    if spec.startswith((".", "~")) or ("/" in spec and not looks_like_hub_id(spec)) or "\\" in spec:
        return True
    if spec.lower().endswith(_DATA_SUFFIXES):
        return True
    return "/" in spec and Path(spec.split("/", 1)[0]).expanduser().is_dir()


def _did_you_mean(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return f" (no folder {folder})"
    close = difflib.get_close_matches(path.name, [p.name for p in folder.iterdir()], n=1, cutoff=0.6)
    return f"; did you mean {folder / close[0]}?" if close else ""


def _load_by_name(name: str, subset: str | None, split: str) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, subset, split=split)
    except DatasetNotFoundError as e:
        text = str(e)
        if "offline" in text.lower() or "connect" in text.lower():
            raise OfflineError(f"dataset {name} is not in the local cache and the Hugging Face Hub cannot be "
                               "reached; load it once while online or pass a local jsonl/csv/parquet file") from None
        raise InputNotFoundError(f"dataset {name} was not found on the Hub: {text}") from None
    except (ConnectionError, TimeoutError, OSError) as e:
        raise OfflineError(f"dataset {name} could not be fetched ({type(e).__name__}: {e}); the Hugging Face "
                           "Hub seems unreachable: load it once while online or pass a local file") from None
    except ValueError as e:  # unknown split or subset
        raise DataError(f"dataset {name}: {e}") from None


def extract_hash_answer(text: str) -> str | None:
    """GSM8K keeps the final answer after ``####``; None when the marker is missing."""
    if "####" not in text:
        return None
    return text.split("####", 1)[1].strip()


@dataclass(frozen=True)
class Markers:
    start: str
    end: str
    source: str  # "tokenizer" (added vocabulary) or "config" (text fallback)
    prefilled_start: bool  # the generation prompt already ends with the start marker


def find_reasoning_markers(tokenizer: Any, fallback_start: str, fallback_end: str) -> Markers:
    """The seed's rule: an added token containing "think" and "/" closes reasoning, one with "think" opens it."""
    start = end = None
    for token in tokenizer.get_added_vocab():
        if "think" in token and "/" in token:
            end = token
        elif "think" in token:
            start = token
    source = "tokenizer"
    if not (start and end):
        start, end, source = fallback_start, fallback_end, "config"
    prefilled = False
    if getattr(tokenizer, "chat_template", None):
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                              add_generation_prompt=True)
        prefilled = str(probe).rstrip().endswith(start)
    return Markers(start=start, end=end, source=source, prefilled_start=prefilled)


def read_chat_template(path: str | Path) -> str:
    """The Jinja chat template in ``path`` (``model.chat_template``), read before any model loads."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputNotFoundError(f"chat template file {path} does not exist (--chat-template / model.chat_template)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"chat template file {path} is not a text file (not UTF-8)") from None
    if not text.strip():
        raise DataError(f"chat template file {path} is empty")
    return text


def use_chat_template(tokenizer: Any, template: str, path: str | Path) -> None:
    """Give ``tokenizer`` the chat template, checked on a system + user conversation with a generation prompt
    (what training renders), so a broken template fails here in one line rather than deep in the trainer."""
    tokenizer.chat_template = template
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja syntax errors, raise_exception(), missing keys: all mean "unusable"
        first = (str(err).splitlines() or [""])[0]
        raise DataError(f"chat template file {path} does not render a system + user conversation: "
                        f"{type(err).__name__}: {first}") from None
    if "1+1?" not in str(text):
        raise DataError(f"chat template file {path} leaves the user's message out of the prompt it renders")


@dataclass
class PreparedData:
    dataset: Any  # datasets.Dataset with prompt (messages), answer, solution
    max_prompt_length: int
    max_completion_length: int
    rows_total: int
    rows_kept: int
    length_cutoff: int


def to_messages(system_prompt: str | None, question: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def _default(name: str) -> Any:
    return next(f.default for f in fields(DataConfig) if f.name == name)


def _column_hint(cols: set[str], missing: list[str], cfg: DataConfig) -> str:
    """``--prompt-field problem``-style suggestions from the columns the dataset does have."""
    flags = []
    for role, flag in (("prompt", "--prompt-field"), ("solution", "--solution-field")):
        if getattr(cfg, f"{role}_field") not in missing:
            continue
        guess = next((c for c in _LIKELY_COLUMNS[role] if c in cols), None)
        if guess:
            flags.append(f"{flag} {guess}")
    return f", e.g. {' '.join(flags)}" if flags else ""


def map_rows(ds: Any, cfg: DataConfig) -> Any:
    """Map the configured fields to TRL's conversational ``prompt`` plus ``answer`` (and ``solution``).

    With ``answer_field`` the bare answer comes from that column and the solution column is optional
    (used when present); without it the answer is derived from the solution column.
    """
    cols = set(ds.column_names)
    has_solution = cfg.solution_field in cols
    # the default solution column is only needed when it is where the answer comes from
    solution_needed = not cfg.answer_field or cfg.solution_field != _default("solution_field")
    needed = [cfg.prompt_field] + [f for f in (cfg.solution_field if solution_needed else None, cfg.answer_field)
                                   if f]
    missing = [f for f in needed if f not in cols]
    if missing:
        raise DataError(f"dataset has no column {', '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(sorted(cols))}); map them with --prompt-field / --solution-field / "
                        f"--answer-field (data.prompt_field / data.solution_field / data.answer_field in a config)"
                        f"{_column_hint(cols, missing, cfg)}")
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        value = row[cfg.solution_field] if has_solution else None
        solution = "" if value is None else str(value)
        if cfg.answer_field:
            ans = row[cfg.answer_field]
            solution = solution or ("" if ans is None else str(ans))
        elif cfg.extract_hash_answer:
            ans = extract_hash_answer(solution)
        else:
            ans = solution
        return {"prompt": to_messages(cfg.system_prompt, str(row[cfg.prompt_field])),
                "answer": None if ans is None else str(ans).strip(),
                "solution": solution}

    mapped = ds.map(convert, remove_columns=ds.column_names)
    mapped = mapped.filter(lambda r: r["answer"] is not None)
    if len(mapped) == 0:
        hint = (" (no solution contains '####'; pass --no-extract-hash-answer, or --answer-field COLUMN for a "
                "column holding the bare answer)") if cfg.extract_hash_answer and not cfg.answer_field else ""
        raise DataError(f"no rows with an answer are left{hint}")
    return mapped


def prepare(ds: Any, tokenizer: Any, cfg: DataConfig, max_seq_length: int,
            max_prompt_length: int | None = None, max_completion_length: int | None = None) -> PreparedData:
    """Render prompts, keep those up to the length quantile and derive the lengths the trainer uses."""
    import numpy as np

    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so prompts cannot be rendered as the model will be "
                        "served; pass --chat-template FILE (a Jinja chat template; config key "
                        "model.chat_template), or use an instruct/chat model")
    mapped = map_rows(ds, cfg)
    lengths = np.array([len(_render_ids(tokenizer, p)) for p in mapped["prompt"]])
    total = len(mapped)
    if max_prompt_length is None:
        cutoff = int(np.quantile(lengths, cfg.length_quantile))
        max_prompt_length = cutoff + 1  # the seed's "+1 just in case"
    else:
        cutoff = max_prompt_length
    keep = np.where(lengths <= cutoff)[0]
    room = max_seq_length - max_prompt_length
    if len(keep) == 0 or room <= 0:
        raise DataError(f"every prompt is longer than the limit: prompts need {int(lengths.min())}-"
                        f"{int(lengths.max())} tokens but model.max_seq_length is {max_seq_length} "
                        f"(max prompt length {max_prompt_length}); raise model.max_seq_length or shorten the "
                        "system prompt")
    completion = room if max_completion_length is None else min(max_completion_length, room)
    kept = mapped.select(keep.tolist())
    return PreparedData(dataset=kept, max_prompt_length=max_prompt_length, max_completion_length=completion,
                        rows_total=total, rows_kept=len(kept), length_cutoff=cutoff)


def _render_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


HELD_OUT_SEED = 3407


def hold_out(dataset: Any, count: int) -> tuple[Any, Any]:
    """(rows to train on, rows kept out of training): ``count`` rows at most and never more than a tenth of them,
    chosen by a fixed seed so that a resumed run holds out the same ones."""
    import numpy as np

    n = min(max(count, 0), len(dataset) // 10)
    if n == 0:
        return dataset, dataset.select([])
    held = sorted(np.random.default_rng(HELD_OUT_SEED).choice(len(dataset), n, replace=False).tolist())
    chosen = set(held)
    return dataset.select([i for i in range(len(dataset)) if i not in chosen]), dataset.select(held)


def write_held_out(dataset: Any, path: Path) -> None:
    """The held-out rows as JSON lines (``prompt`` messages, ``answer`` and every other column), as
    ``grpoctl export`` reads them back for task parity."""
    import json

    from grpoctl.fsutil import staged_file

    with staged_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset))
