"""Row-parallel execution of GIL-free numba kernels on a small thread pool.

Kernels are compiled ``nogil=True`` and *serial*; parallelism comes from
running them on disjoint row ranges in Python threads, each with its own
output buffer, then summing the buffers. Unlike numba's ``prange`` this works
under every numba threading layer and stays safe when several user threads
drive different sketches at once.

``STREAMSKETCH_NUM_THREADS`` caps the thread count (default: CPU count).

The kernels are compiled through :func:`njit`, which is ``numba.njit`` typed
for mypy (numba ships no type information).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numba

__all__ = ["fixed_chunks", "njit", "num_threads", "run_chunks", "split_rows"]

_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def njit(**options: Any) -> Callable[[_F], _F]:
    """``numba.njit(**options)``, typed as keeping the decorated function's signature.

    numba ships no type information, so under a bare ``@numba.njit`` a kernel
    is ``Any`` to mypy and no call to it is checked. The dispatcher numba
    returns takes the arguments the Python function declares, so the kernels
    annotate their parameters as Python code (which is also what runs under
    ``NUMBA_DISABLE_JIT=1``) and their callers are checked against them. One
    difference the annotations do not show: called from Python, compiled code
    returns numpy scalars boxed as Python ``int``/``float``; the kernels that
    Python calls return ``None`` or such scalars and are annotated with the
    Python type. Runtime behaviour is exactly ``numba.njit``'s.
    """
    decorator: Callable[[_F], _F] = numba.njit(**options)
    return decorator


def num_threads() -> int:
    """Worker threads used for large blocks."""
    env = os.environ.get("STREAMSKETCH_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


def _forget_pool_in_child() -> None:
    # A forked child inherits the executor object but not its threads; using
    # it would wait forever. Start afresh.
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="streamsketch")
        return _POOL


def split_rows(n: int, min_rows: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``num_threads()`` ranges of >= ``min_rows`` rows.

    For work whose rows are independent (feature maps): the split may vary
    with the thread count. Reductions use :func:`fixed_chunks`.
    """
    parts = max(1, min(num_threads(), n // max(1, min_rows)))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def fixed_chunks(n: int, min_rows: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ranges of ``min_rows`` to ``2 * min_rows`` rows.

    The split depends only on ``n`` and ``min_rows``, never on the thread
    count, so a reduction that adds the ranges' partial results in list order
    gives the same bits on every machine.
    """
    parts = max(1, n // max(1, min_rows))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def run_chunks(fn: Callable[[int, int], _R], ranges: list[tuple[int, int]]) -> list[_R]:
    """Call ``fn(lo, hi)`` for every range, in parallel when there are several."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    futures = [_pool().submit(fn, lo, hi) for lo, hi in ranges]
    return [f.result() for f in futures]
