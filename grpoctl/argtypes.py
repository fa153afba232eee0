"""Values given to the Python API, checked against the type hints that declare them.

The command line hands every option over already typed (click); a script calling ``grpoctl.api`` may pass
anything, and a wrong type would surface as Python's own TypeError or AttributeError deep in a stage, or as a
server started on a port that cannot exist. The options dataclasses call :func:`check_fields` from
``__post_init__`` and the API functions are wrapped in :func:`checked`, so a wrong type is one UsageError
naming the option, from the same hints that document it. ``Annotated[int, Range(1, 65535)]`` adds bounds.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from grpoctl.errors import UsageError

F = TypeVar("F", bound=collections.abc.Callable[..., Any])

_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string", Path: "a path",
          list: "a list", dict: "a dict", tuple: "a tuple", type(None): "None"}


@dataclasses.dataclass(frozen=True)
class Range:
    """Inclusive bounds for a number (``lo``/``hi`` None: open on that side)."""

    lo: float | None = None
    hi: float | None = None

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"from {self.lo} to {self.hi}"
        return f"at least {self.lo}" if self.lo is not None else f"at most {self.hi}"


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        ranges = [m for m in hint.__metadata__ if isinstance(m, Range)]
        return describe(args[0]) + "".join(f" {r.describe()}" for r in ranges)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence) and args:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "a function"
    if hint is Any:
        return "anything"
    want = origin or hint
    return _NAMES.get(want, f"a {getattr(want, '__name__', str(want))}")


class _Mismatch(Exception):
    pass


def _fit(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` takes it (a str or os.PathLike for a Path becomes a Path, a tuple for a list a list);
    _Mismatch when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Annotated:
        value = _fit(value, args[0])
        for r in (m for m in hint.__metadata__ if isinstance(m, Range)):
            if (r.lo is not None and value < r.lo) or (r.hi is not None and value > r.hi):
                raise _Mismatch
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _fit(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        if callable(value):
            return value
        raise _Mismatch
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes) and str(value):
            return Path(value)
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint in (int, float):
        ok = isinstance(value, int) or (hint is float and isinstance(value, float))
        if not ok or isinstance(value, bool) or (isinstance(value, float) and value != value):
            raise _Mismatch
        return value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        fitted = [_fit(v, item) for v in value]
        return tuple(fitted) if origin is tuple else fitted
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        kt, vt = args or (Any, Any)
        return {_fit(k, kt): _fit(v, vt) for k, v in value.items()}
    want = origin or hint
    if isinstance(want, type) and isinstance(value, want):
        return value
    raise _Mismatch


def check_value(value: Any, hint: Any, what: str) -> Any:
    """``value`` fitted to ``hint``; UsageError "WHAT should be ..., not VALUE" when it does not fit."""
    try:
        return _fit(value, hint)
    except (_Mismatch, TypeError, ValueError):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UsageError(f"{what} should be {describe(hint)}, not {shown}") from None


def check_fields(obj: Any) -> None:
    """Check (and fit, e.g. str -> Path) every field of the dataclass instance ``obj`` against its type hint."""
    cls = type(obj)
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(obj):
        if f.init and f.name in hints:
            setattr(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], f"{cls.__name__}.{f.name}"))


def checked(fn: F) -> F:
    """Wrap a public function so its arguments are checked against its parameters' type hints first: a missing,
    unknown or wrong-typed argument is a UsageError instead of Python's TypeError."""
    sig = inspect.signature(fn)
    name = fn.__name__

    @functools.cache  # resolved at the first call, when every name the hints use is defined
    def hints() -> dict[str, Any]:
        # parameters only: a return hint may name a type that is imported for type checkers alone
        ns = {**vars(typing), **fn.__globals__}
        out = {}
        for p in sig.parameters.values():
            ann = p.annotation
            if ann is inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out[p.name] = eval(ann, ns) if isinstance(ann, str) else ann  # noqa: S307 -- our own annotations
        return out

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise UsageError(f"{name}(): {err}") from None
        for key, hint in hints().items():
            if key in bound.arguments:
                bound.arguments[key] = check_value(bound.arguments[key], hint, f"{name}() argument {key!r}")
        return fn(*bound.args, **bound.kwargs)

    return typing.cast(F, wrapper)
