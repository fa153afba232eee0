"""Command-line options declared once: on the options dataclass of the command.

Each field that is a command-line option carries its help text, flag spelling, choices and metavar in its
metadata (:func:`option`); its default is the field's own default, and its type hint gives the click type
(``Path``, ``int``, ``Annotated[int, Range(0, 65535)]`` ...). :func:`click_options` generates the click options
from the dataclass and :func:`build` turns what click parsed back into the dataclass, so a command never
restates a field, a default or a help text. A field's flag is its name (``parity_gate`` -> ``--parity-gate``);
older spellings stay accepted as aliases that ``--help`` does not show.

Fields that stand for a training-config key (``config_key="trainer.max_steps"``) default to None, meaning
"whatever the config says"; their help shows the config's default, read from the config dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from grpoctl.argtypes import Range

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

KEY = "grpoctl.option"


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one dataclass field appears on the command line."""

    help: str
    flag: str | None = None  # the flag's spelling (default: --field-name)
    short: str | None = None  # e.g. "-o"
    aliases: tuple[str, ...] = ()  # older spellings, still accepted, not shown by --help
    off: str | None = None  # a bool's second flag, that sets it False (e.g. "--no-parity-gate", "--quiet")
    off_short: str | None = None  # a short form of ``off`` (e.g. "-q" for --quiet)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    multiple: bool = False  # repeatable; the field holds a tuple of the values
    click_type: Any = None  # a click type where the hint's is not enough (e.g. a file, not a folder)
    config_key: str | None = None  # "section.key" of TrainConfig this option sets (None: not a config key)
    default_text: str | None = None  # the default as --help shows it, where the field's default is None
    show_default: bool = True


def option(default: Any = None, *, help: str, default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field that is also a command-line option, defaulting to ``default`` (or ``default_factory()``;
    ``dataclasses.MISSING``: a required option); see :class:`Spec` for ``spec``."""
    if default_factory is not dataclasses.MISSING:
        default = dataclasses.MISSING
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: Spec(help=help, **spec)})


def spec_of(f: dataclasses.Field) -> Spec | None:
    return f.metadata.get(KEY)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options: its own in declaration order, then the inherited ones
    (``TrainOptions``' flags before the column flags it shares with ``EvalOptions``)."""
    fields = [f for f in dataclasses.fields(cls) if spec_of(f) is not None]
    own = set(vars(cls).get("__annotations__", {}))
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _plain(hint: Any) -> tuple[Any, Range | None]:
    """The type a value of ``hint`` has on the command line (Optional and list-or-str unwrapped) and its bounds."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        ranges = [m for m in hint.__metadata__ if isinstance(m, Range)]
        return _plain(args[0])[0], (ranges[0] if ranges else None)
    if origin in (types.UnionType, typing.Union):
        arms = [a for a in args if a is not type(None)]
        return _plain(arms[0])  # the first arm is the one the command line gives (``str | list[str]``: str)
    if origin in (tuple, list):
        return _plain(args[0])
    return hint, None


def _click_type(spec: Spec, hint: Any) -> Any:
    if spec.click_type is not None:
        return spec.click_type
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    plain, bounds = _plain(hint)
    if bounds is not None:
        rng = click.IntRange if plain is int else click.FloatRange
        return rng(min=bounds.lo, max=bounds.hi)
    if plain is Path:
        return click.Path(path_type=Path)
    return plain if plain in (int, float, str) else None


class _Option(click.Option):
    """A click option whose aliases are accepted but left out of --help (which shows one spelling)."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [o for o in shown if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def config_default(config_class: type, key: str) -> Any:
    """The config's default for ``section.key``: ``config_class`` is the options class's ``config_class`` (the
    training config for train's and eval's options), passed in so that this module imports no stage."""
    value: Any = config_class()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def click_option(f: dataclasses.Field, hint: Any, config_class: type | None = None) -> Callable[[F], F]:
    """The click option generated from one field."""
    spec = spec_of(f)
    assert spec is not None, f.name
    flag = spec.flag or "--" + f.name.replace("_", "-")
    default = field_default(f)
    decls = [flag, *spec.aliases, *([spec.short] if spec.short else [])]
    kwargs: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar, "cls": _Option,
                              "hidden_aliases": tuple(spec.aliases), "required": _required(f)}
    if _plain(hint)[0] is bool and not spec.multiple:
        if spec.off:
            decls[0] = f"{flag}/{spec.off}"
            if spec.off_short:
                decls.append(f" /{spec.off_short}")
        shown = spec.default_text
        if shown is None and spec.config_key is not None and spec.off:  # e.g. [default: on] from the config
            shown = "on" if config_default(_config(config_class, f), spec.config_key) else "off"
        kwargs.update(is_flag=True, default=default, show_default=False)
    else:
        kwargs.update(type=_click_type(spec, hint), multiple=spec.multiple,
                      default=None if spec.multiple or default in (None, [], ()) else default)
        shown = spec.default_text
        if shown is None and spec.config_key is not None:
            cfg = config_default(_config(config_class, f), spec.config_key)
            shown = None if cfg is None else str(cfg)
        kwargs["show_default"] = shown is None and spec.show_default and kwargs["default"] is not None
    if shown is not None and spec.show_default:  # as click shows a default, without its parentheses
        kwargs["help"] = f"{spec.help}  [default: {shown}]"
    return click.option(*decls, f.name, **kwargs)


def _config(config_class: type | None, f: dataclasses.Field) -> type:
    if config_class is None:
        raise TypeError(f"option {f.name} names a config key but its class declares no config_class")
    return config_class


def click_options(cls: type) -> Callable[[F], F]:
    """A decorator adding one click option per option field of the dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)

    def decorate(fn: F) -> F:
        for f in reversed(cli_fields(cls)):
            fn = click_option(f, hints[f.name], getattr(cls, "config_class", None))(fn)
        return fn

    return decorate


def build(cls: type[T], params: dict[str, Any], **given: Any) -> T:
    """``cls`` from what click parsed: every option field of ``cls`` taken out of ``params`` (a flag not given
    keeps the dataclass default), plus ``given`` (fields that are arguments, not options)."""
    kwargs = dict(given)
    for f in cli_fields(cls):
        if f.name not in params:
            continue
        value = params.pop(f.name)
        if spec_of(f).multiple:
            value = tuple(value or ())
        if value is None and field_default(f) is not None:
            continue
        kwargs[f.name] = value
    return cls(**kwargs)


def config_flags(options: Any) -> dict[str, Any]:
    """The training-config keys the options set, nested as the TOML file nests them: {"trainer": {...}}."""
    flags: dict[str, Any] = {}
    for f in cli_fields(type(options)):
        key, value = spec_of(f).config_key, getattr(options, f.name)
        if key is None or value is None or (value is False and field_default(f) is False):
            continue  # not given: the config file's value (or the config's default) stays
        *sections, name = key.split(".")
        at = flags
        for s in sections:
            at = at.setdefault(s, {})
        at[name] = str(value) if isinstance(value, Path) else value
    return flags
