"""What machine a measurement ran on: CPU model, usable cores, load average (for benchmark
reports; figures from a shared machine are only meaningful next to its load)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the logical CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load average, None where the system has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def format_load(sep: str = " ") -> str:
    """The load average as text ("n/a" where unknown)."""
    load = load_average()
    return "n/a" if load is None else sep.join(f"{v:.2f}" for v in load)
