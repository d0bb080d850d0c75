"""The CPU a measurement ran on, named once for every report and benchmark (no torch here,
so the serving benchmarks can use it too)."""

from __future__ import annotations

import platform
from pathlib import Path


def describe() -> str:
    """The machine line every serving benchmark prints: CPU, cores, kernel."""
    import os

    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo; platform.processor() (or "unknown CPU")
    where that file is missing or says nothing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
