"""How many CPU threads one engine process may use when several share the machine's cores.

torch's CPU kernels (oneDNN, OpenMP) start one thread per core by default. Two engine processes
on a 2-core machine then run 4 busy threads on 2 cores, and OpenMP's barriers stall whenever a
thread is descheduled: seen here in a training log, a step went from 1.4 s to 5 s that way. Each
process that shares the cores with N - 1 others therefore takes cores // N threads (at least 1).
"""

from __future__ import annotations

import os
import sys


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which containers and systemd's
    CPUAffinity set), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(sharing: int, cpus: int | None = None) -> int:
    """Threads for one of `sharing` engine processes on `cpus` cores (default: available)."""
    total = available_cpus() if cpus is None else cpus
    return max(1, total // max(1, sharing))


def share_cpus(sharing: int) -> int:
    """Limit torch in this process to its share of the cores (when torch is loaded: a
    linear-filter-only process never imports it). Returns the thread count."""
    threads = threads_per_process(sharing)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads
