"""Row-parallel execution of GIL-free numba kernels on a small thread pool.

Kernels are compiled ``nogil=True`` and *serial*; parallelism comes from
running them on disjoint row ranges in Python threads, each with its own
output buffer, then summing the buffers. Unlike numba's ``prange`` this works
under every numba threading layer and stays safe when several user threads
drive different sketches at once.

``STREAMSKETCH_NUM_THREADS`` caps the thread count (default: CPU count).

:func:`single_threaded_blas` runs a block with the BLAS libraries on one
thread, for loops of many small dense operations (Frequent Directions'
shrinks, OnlineRidgeLeverage's blocks), where BLAS threads cost more than
they give and, on a machine with other jobs, spin-wait against them:
measured 25 s against 0.8 s for 100 000 rows of width 64 with two threads
under a load of two.

The kernels are compiled through :func:`njit`, which is ``numba.njit`` typed
for mypy (numba ships no type information).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numba

__all__ = [
    "SINGLE_THREAD_BLAS_WORK",
    "fixed_chunks",
    "njit",
    "num_threads",
    "run_chunks",
    "single_threaded_blas",
    "split_rows",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()

# BLAS thread limit shared by every thread of the process: BLAS libraries keep
# one global thread count, so the first block to enter sets it and the last
# to leave restores it (per-thread save/restore would race and could leave
# BLAS on one thread for good).
_BLAS_LOCK = threading.Lock()
_BLAS_DEPTH = 0
_BLAS_LIMITER: Any = None
_BLAS_CONTROLLER: Any = None

#: Multiply-adds per dense product below which a loop of such products runs
#: faster on one BLAS thread, measured on two cores for Frequent Directions'
#: shrinks and OnlineRidgeLeverage's blocks (d <= 322 there).
SINGLE_THREAD_BLAS_WORK = 2**24


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


def _blas_controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded now (None without threadpoolctl)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER or None


@contextmanager
def single_threaded_blas(enabled: bool = True) -> Iterator[None]:
    """Run the block with every loaded BLAS library on one thread.

    Process-wide where the BLAS library's count is (other threads' BLAS calls
    during the block run on one thread too). Nested and concurrent blocks are
    counted, and the original limits come back when the last one leaves. A
    no-op when ``enabled`` is false or threadpoolctl is missing. Cost: about
    20 us to enter and leave.

    Measured limit: with OpenBLAS 0.3.30 (pthreads) a limit of one thread set
    from a thread other than the main one is not applied to that thread's
    calls, so the gain is for sketches updated from the main thread.
    """
    global _BLAS_DEPTH, _BLAS_LIMITER
    if not enabled:
        yield
        return
    with _BLAS_LOCK:
        if _BLAS_DEPTH == 0:
            controller = _blas_controller()
            _BLAS_LIMITER = (
                None if controller is None else controller.limit(limits=1, user_api="blas")
            )
        _BLAS_DEPTH += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_DEPTH -= 1
            if _BLAS_DEPTH == 0 and _BLAS_LIMITER is not None:
                _BLAS_LIMITER.restore_original_limits()
                _BLAS_LIMITER = None
