"""What every benchmark script shares: interleaved best-of timing and a line about the machine.

The scripts run as ``python benchmarks/bench_*.py``, so this folder is on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["best_times", "blas_info", "load_average", "machine"]


def best_times(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Warm up each callable once, then interleave ``repeats`` timed rounds.

    Interleaving makes background load hit every candidate alike. Returns the
    best wall time per name and the warm-up call's result per name.
    """
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, results


def blas_info() -> str:
    """Name and version of numpy's BLAS, or "unknown"."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # show_config's layout is not a stable API
        return "unknown"


def load_average() -> float:
    """The 1-minute load average (NaN where the OS does not report it)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> str:
    """Processor and CPU count, e.g. ``x86_64, 2 CPUs``."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
