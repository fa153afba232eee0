"""Every error grpoctl raises on purpose, as one typed hierarchy.

Each class inherits from the builtin it resembles, so library users can catch either, and carries an
exit code so the CLI can turn it into one clean line. Messages say what happened and what to do next.
"""

from __future__ import annotations


class GrpoctlError(Exception):
    """Base class: a problem the user can act on. The CLI prints ``str(err)`` and exits ``exit_code``."""

    exit_code: int = 1


class UsageError(GrpoctlError, ValueError):
    """The command line or the config asks for something invalid."""

    exit_code = 2


class ConfigError(UsageError):
    """A TOML config file or a ``--set`` override is malformed or names an unknown key."""


class InputNotFoundError(GrpoctlError, FileNotFoundError):
    """A model, dataset, adapter, run directory or GGUF file the user named does not exist."""

    exit_code = 3


class DataError(GrpoctlError, ValueError):
    """Input data is not what it should be: a dataset that is unreadable, lacks the mapped columns or keeps no
    usable rows, or a file another tool or stage wrote (``adapter_config.json``, a base ``config.json``,
    ``run.json``, ``artifacts.json``, safetensors) that is corrupt, not JSON or holds values of the wrong type."""

    exit_code = 4


class OutputExistsError(GrpoctlError, FileExistsError):
    """The output directory exists and is not empty; ``--force`` replaces it."""

    exit_code = 5


class DiskFullError(GrpoctlError, OSError):
    """The disk filled up while writing an output (or would, by the space check before starting); the partial
    output was removed."""

    exit_code = 13


class OutputBusyError(GrpoctlError, BlockingIOError):
    """Another grpoctl process is writing the same output folder right now (its lock is held)."""

    exit_code = 14


class OutputNotWritableError(GrpoctlError, PermissionError):
    """Nothing can be written where the output goes: no permission, a read-only file system, or a place where no
    folder can be made (``/proc``)."""

    exit_code = 15


class RunBusyError(GrpoctlError, BlockingIOError):
    """A training process holds the run right now (``grpoctl train``, ``--resume`` included): its adapter may be
    replaced at any moment, so an export of it would not know which adapter it holds."""

    exit_code = 16


class DependencyError(GrpoctlError, ImportError):
    """An optional engine (unsloth, vLLM, bitsandbytes, a GPU, the GGUF converter) is missing."""

    exit_code = 6


class ToolBuildError(DependencyError):
    """Building llama.cpp's C++ tools from source failed; the message ends with the build log's last lines."""


class VerificationError(GrpoctlError):
    """An adapter failed verification (never trained, NaN/Inf, shapes that do not fit the base)."""

    exit_code = 7


class ParityError(GrpoctlError):
    """An exported artifact does not behave like the trained model (below its parity floor)."""

    exit_code = 8


class ConversionError(GrpoctlError):
    """GGUF conversion or quantization failed, or the result does not load in llama.cpp."""

    exit_code = 9


class OfflineError(GrpoctlError, ConnectionError):
    """Something needs the network (Hub push, first-time fetch from PyPI) and there is none."""

    exit_code = 10


class ServeError(GrpoctlError):
    """A server could not be started, did not answer, or the serving engine is not reachable."""

    exit_code = 11


class HubError(GrpoctlError):
    """A Hugging Face Hub operation failed (auth, permissions, missing revision, invalid repo id)."""

    exit_code = 12

