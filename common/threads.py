"""How many threads a command's torch work uses: the cores it may use, less those other work keeps busy.

torch's own default is every physical core. On a machine where another job already keeps the
cores busy, that is the worst choice: OpenMP's threads wait at every barrier for one that is
descheduled, and fteval on a busy 2-core machine took 523 s with 2 threads against about a seventh
of that with 1 (issue 22; benchmarks/threads.py measures it side by side). So every command that
runs a model (fteval, ftclient, ftsim's and ftserver's coordinator) starts from
:func:`default_threads`, and ``--threads N`` overrides it where a command has the flag.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


PROC_STAT = Path("/proc/stat")


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat; None where it is not there."""
    try:
        fields = [int(x) for x in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])  # idle + iowait; without guest


def busy_cores(cores: int, window_s: float = 0.3) -> float:
    """How many of ``cores`` other work keeps busy now: the machine's busy share of CPU time over
    ``window_s`` (in a container the host's, so it is taken as a share) times ``cores``. Measured,
    not the load average, which lags a minute: it would still count a job that just ended."""
    first = _cpu_times()
    if first is None:
        try:
            return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)) * cores
        except (AttributeError, OSError):
            return 0.0
    time.sleep(window_s)
    second = _cpu_times()
    if second is None:
        return 0.0
    idle, total = second[0] - first[0], second[1] - first[1]
    return 0.0 if total <= 0 else min(1.0, max(0.0, 1 - idle / total)) * cores


def default_threads(cores: int | None = None, busy: float | None = None) -> int:
    """The usable cores less the busy ones (rounded), at least 1."""
    cores = usable_cores() if cores is None else cores
    busy = busy_cores(cores) if busy is None else busy
    return max(1, min(cores, round(cores - busy)))


def add_device_flags(parser, does: str) -> None:
    """``--device`` and ``--threads``, the same for every command that runs a model (``does``:
    what the model does there, e.g. 'trains')."""
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help=f"where the model {does} (default: %(default)s, a GPU when torch sees one)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads (default: the cores this process may use less those other work keeps busy when it "
        "starts, at least 1: fedtune.common.threads)",
    )


def set_threads(n: int | None = None) -> int:
    """torch's intra-op threads: ``n``, or :func:`default_threads` -> the number set."""
    import torch

    n = n or default_threads()
    torch.set_num_threads(n)
    return n
