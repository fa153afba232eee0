"""The JSON files grpoctl reads but did not just write (a PEFT ``adapter_config.json``, a base model's
``config.json``, ``run.json``, ``artifacts.json``): read once, shape-checked, and any problem reported as one
DataError line naming the file and the key, instead of a KeyError or AttributeError deep in a later stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpoctl.errors import DataError

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
