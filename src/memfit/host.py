"""The host's memory: how much a real step on the CPU may take before the kernel's out-of-memory killer does.

Real steps on the CPU (``memfit.measure``, ``find_batch_size``'s verification, a
Trainer's simulated device) allocate real memory. Before running them memfit
compares what they need with what the machine has available, and refuses with the
figures instead of letting the process be killed.

Known limitations: "available" is the kernel's estimate (``MemAvailable`` on
Linux; free physical pages elsewhere), read once before the run; other processes
may take memory meanwhile.
"""

from __future__ import annotations

import os

from memfit.errors import NotEnoughMemory
from memfit.units import format_bytes

__all__ = ["available_memory", "check_fits"]


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation now, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(needed: int, what: str, fix: str) -> None:
    """Refuse to run ``what`` if it needs more host memory than is available; ``fix`` says what to do instead."""
    available = available_memory()
    if available is not None and needed > available:
        raise NotEnoughMemory(f"{what} needs {format_bytes(needed)} of host memory and this machine has "
                         f"{format_bytes(available)} available; {fix}")
