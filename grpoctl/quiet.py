"""Quiet output (``grpoctl export -q``, ``ExportOptions(progress=False)``): nothing but what the command prints.

The libraries a stage drives write to stderr on their own: tqdm bars (transformers' "Loading weights", grpoctl's
parity bars), transformers and huggingface_hub log records, Python warnings (FutureWarning from transformers),
and llama.cpp's converter in its child process. :func:`quiet` silences all of them for its duration; a child
process that a stage runs asks :func:`active` whether to hold its stderr (shown only when the child fails).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

_depth = 0


def active() -> bool:
    """Whether output is quiet now: children's stderr is held, shown only when they fail."""
    return _depth > 0


class _Discard(io.TextIOBase):
    """Where stderr goes while quiet: tqdm, warnings and stray prints write here and are dropped."""

    def write(self, s: str) -> int:
        return len(s)

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence the libraries' progress bars, log records and warnings while the block runs (``enabled`` False:
    change nothing). The levels and stderr are restored after, so a script calling the API keeps its own."""
    global _depth
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "accelerate", "peft", "datasets")]
    levels = [lg.level for lg in loggers]
    with contextlib.ExitStack() as stack:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        stack.callback(lambda: [lg.setLevel(lv) for lg, lv in zip(loggers, levels, strict=True)])
        _library_switches(stack)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        # a bar created inside resolves sys.stderr then; the handlers of already configured loggers keep theirs
        stack.enter_context(contextlib.redirect_stderr(_Discard()))
        _depth += 1
        stack.callback(_leave)
        yield


def _leave() -> None:
    global _depth
    _depth -= 1


def _library_switches(stack: contextlib.ExitStack) -> None:
    """transformers' and huggingface_hub's own progress-bar switches, configured before stderr is redirected so
    that transformers' log handler binds the real stderr (not the discarding one) when it is first set up."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_off = are_progress_bars_disabled()
    disable_progress_bars()
    if not hub_off:
        stack.callback(enable_progress_bars)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    stack.callback(hf_logging.set_verbosity, verbosity)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bars:
        stack.callback(hf_logging.enable_progress_bar)

