"""Process set-up shared by the demo and the benchmarks: how many torch threads to use, quiet library logs."""
from __future__ import annotations

import logging
import os
import time
import warnings


def free_cores(window: float = 0.5) -> int:
    """Cores not taken by other processes right now, at least 1.

    Two threads on a two-core machine where another process keeps one core busy run several
    times slower than one thread (the threads wait for each other at every operation). The busy
    share is sampled from /proc/stat over `window` seconds: the 1-minute load average would still
    count, say, the pip install that `make demo` ran just before.
    """
    cores = os.cpu_count() or 1

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is None:
        try:
            return max(1, min(cores, round(cores - os.getloadavg()[0])))
        except OSError:
            return cores
    time.sleep(window)
    second = sample()
    total, idle = second[0] - first[0], second[1] - first[1]  # type: ignore[index]
    busy = cores * (1 - idle / total) if total > 0 else 0.0
    return max(1, min(cores, round(cores - busy)))


def quiet_libraries() -> None:
    """Keep the console to progress bars and the demo's (or benchmark's) own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")
