"""The number of CPU threads grpoctl's CPU work (quantizing, llama.cpp inference, building llama.cpp) uses where
none is given: the cores this process may run on, which a container or ``taskset`` may make fewer than the host's."""

from __future__ import annotations

import os


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux (macOS)
        return os.cpu_count() or 1
