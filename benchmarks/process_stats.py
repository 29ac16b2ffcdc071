"""This process's peak memory and age; imports nothing heavy, so the naive loop's process stays lean."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which, unlike ru_maxrss, starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def seconds_since_start() -> float:
    """Seconds since this process started (its start after boot, from /proc, to 10 ms)."""
    after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    return float(Path("/proc/uptime").read_text().split()[0]) - started
