"""The JSON files grpoctl reads but did not just write (a PEFT ``adapter_config.json``, a base model's
``config.json``, ``run.json``, ``artifacts.json``): read once, shape-checked, and any problem reported as one
DataError line naming the file and the key, instead of a KeyError or AttributeError deep in a later stage."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from grpoctl.errors import DataError

T = TypeVar("T")

_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}

# Types PEFT writes for the keys grpoctl uses (peft.LoraConfig); absent or null keys take PEFT's defaults.
ADAPTER_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "peft_type": (str,),
    "target_modules": (list, str), "modules_to_save": (list,), "rank_pattern": (dict,), "alpha_pattern": (dict,),
    "use_rslora": (bool,), "use_dora": (bool,), "fan_in_fan_out": (bool,), "base_model_name_or_path": (str,),
    "inference_mode": (bool,), "bias": (str,), "task_type": (str,),
}


def _kind(value: Any) -> str:
    return next((name for t, name in _KINDS.items() if type(value) is t), type(value).__name__)


def read_json(path: Path, expect: type = dict) -> Any:
    """The parsed file; DataError when it is not UTF-8 JSON or its top level is not ``expect``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file (not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, expect):
        raise DataError(f"{path} holds {_kind(data)} where {_KINDS.get(expect, expect.__name__)} is expected")
    return data


def check_types(data: dict[str, Any], types: dict[str, tuple[type, ...]], path: Path, where: str = "") -> None:
    """DataError naming the first key whose value is not one of its types (null counts as absent)."""
    for key, allowed in types.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            want = " or ".join(_KINDS.get(t, t.__name__) for t in allowed)
            raise DataError(f"{path}: \"{where}{key}\" should be {want}, not {json.dumps(value)}")


def adapter_config(folder: Path) -> dict[str, Any]:
    """``folder/adapter_config.json``, checked for the types of every key grpoctl reads."""
    path = Path(folder) / "adapter_config.json"
    data = read_json(path)
    check_types(data, ADAPTER_TYPES, path)
    for key, allowed in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        check_types(data.get(key) or {}, {k: allowed for k in data.get(key) or {}}, path, where=f"{key}.")
    for key in ("target_modules", "modules_to_save"):
        if isinstance(data.get(key), list) and not all(isinstance(m, str) for m in data[key]):
            raise DataError(f"{path}: \"{key}\" should be a list of module names, not {json.dumps(data[key])}")
    if isinstance(data.get("r"), int) and data["r"] < 1:
        raise DataError(f"{path}: \"r\" should be a positive integer, not {data['r']}")
    return data


# --- typed records --------------------------------------------------------------------------------------
# The files one stage writes for the next (run.json, artifacts.json) are dataclasses; these read them back
# field by field against the type hints, so a value of the wrong type is one DataError naming the file and
# the key, and a reader never guesses at a shape. A key the record does not have is an error (artifacts.json:
# written and read by the same schema) or, with ``ignore_unknown``, skipped at every level (run.json: a run
# written by a newer grpoctl still reads).

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(hint: Any, value: Any, path: Path, where: str, ignore_unknown: bool = False) -> Any:
    """``value`` as ``hint`` says (nested dataclasses built), or DataError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _fits(arm, value, path, where, ignore_unknown)
            except DataError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, path, where, ignore_unknown=ignore_unknown)
    want = origin or hint
    if want is float and type(value) is int:
        return value
    if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
        raise DataError(f"{path}: \"{where}\" should be {_KINDS.get(want, want.__name__)}, not {json.dumps(value)}")
    if want is list and args:
        return [_fits(args[0], v, path, f"{where}[{i}]", ignore_unknown) for i, v in enumerate(value)]
    if want is dict and len(args) == 2:
        return {k: _fits(args[1], v, path, f"{where}.{k}", ignore_unknown) for k, v in value.items()}
    return value


def from_json(cls: type[T], data: Any, path: Path, where: str = "", *, ignore_unknown: bool = False) -> T:
    """``data`` (parsed JSON) as the dataclass ``cls``, every value checked against its field's type; a key
    ``cls`` does not have (unless ``ignore_unknown``: then it is skipped, here and in every nested record), a
    missing required key or a wrong type is a DataError naming ``path`` and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: \"{where or '(top level)'}\" should be an object, not {json.dumps(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if ignore_unknown:
        data = {k: v for k, v in data.items() if k in fields}
    elif unknown:
        raise DataError(f"{path}: \"{where + '.' if where else ''}{unknown[0]}\" is not a key grpoctl writes there; "
                        "the file was changed by hand or by another program")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DataError(f"{path}: {where or 'the file'} lacks {', '.join(missing)}; it was cut short or not "
                        "written by grpoctl")
    hints = _hints(cls)
    return cls(**{name: _fits(hints[name], value, path, f"{where}.{name}" if where else name, ignore_unknown)
                  for name, value in data.items()})


def to_json(value: Any, *, keep_none: bool = False) -> Any:
    """A dataclass (nested ones included) as JSON data; optional fields left at None are left out, unless
    ``keep_none`` (then they are written as null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), keep_none=keep_none) for f in dataclasses.fields(value)
                if f.init and (keep_none or not (getattr(value, f.name) is None and f.default is None))}
    if isinstance(value, dict):
        return {k: to_json(v, keep_none=keep_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, keep_none=keep_none) for v in value]
    return value
