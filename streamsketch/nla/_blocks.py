"""Input plumbing shared by the nla drivers: sketch names, row blocks, progress bars.

A matrix reaches the drivers in one of four forms, all read as a sequence of
dense ``float64`` row blocks:

- a numpy array (read in blocks of about 32 MiB, converted block by block);
- a ``numpy.memmap`` (for instance ``numpy.load(path, mmap_mode="r")``): the
  same, and after each block of a *read-only* map its pages are handed back
  with ``madvise(MADV_DONTNEED)``, so the process's resident memory stays at a
  few blocks however large the file is (the data stay in the OS page cache;
  read-only maps cannot hold changes, so nothing is lost);
- a ``scipy.sparse`` matrix (densified one block of rows at a time);
- any iterable of 2-D row blocks (a generator, a list of memmap slices...),
  validated block by block; released like memmaps when they are slices of a
  read-only one.
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import scipy.sparse

from .._random import SeedKey, hashed_buckets_signs
from .._validation import _refuse_foreign_tensor, as_float_matrix, check_finite
from ..linear import SRHT, CountSketch, GaussianSketch
from ..linear._rowsketch import LinearRowSketch

__all__ = [
    "SKETCHES",
    "RowSource",
    "check_sketch",
    "make_sketch",
    "progress_bar",
    "release_pages",
    "require_tqdm",
    "sketch_columns",
]

#: The oblivious sketches the drivers can use, by name.
SKETCHES: dict[str, type[LinearRowSketch]] = {
    "countsketch": CountSketch,
    "gaussian": GaussianSketch,
    "srht": SRHT,
}

# Dense bytes per row block: large enough for efficient BLAS calls and for the
# sketches' thread pools, small enough that a few blocks are negligible next
# to the workspace of the algorithms.
_BLOCK_BYTES = 1 << 25


def block_rows(n_features: int) -> int:
    """Rows per block for ``n_features`` float64 columns (about 32 MiB, >= 256 rows)."""
    return max(256, _BLOCK_BYTES // (8 * max(1, n_features)))


def check_sketch(sketch: Any, name: str = "sketch") -> str:
    """Validate a sketch name: one of ``"countsketch"``, ``"gaussian"``, ``"srht"``."""
    if not isinstance(sketch, str):
        raise TypeError(f"{name} must be a string, got {type(sketch).__name__}")
    if sketch not in SKETCHES:
        raise ValueError(f"{name} must be one of {sorted(SKETCHES)}, got {sketch!r}")
    return sketch


def make_sketch(kind: str, n_features: int, sketch_size: int, key: int) -> LinearRowSketch:
    """A float64 sketch of the named kind; equal keys give the same ``S``."""
    return SKETCHES[kind](n_features, sketch_size, seed=SeedKey(key))


def require_tqdm() -> Any:
    """The ``tqdm`` class, or a clear ImportError (tqdm is an optional dependency)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs the optional package tqdm (pip install tqdm)"
        ) from None
    return tqdm


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "rows") -> Any:
    """A tqdm bar (counting rows by default), or ``None`` when disabled."""
    if not enabled:
        return None
    return require_tqdm()(total=total, desc=desc, unit=unit, unit_scale=unit == "rows")


# numpy 2 moved byte_bounds out of the main namespace.
_byte_bounds: Callable[[Any], tuple[int, int]] | None = getattr(
    getattr(np.lib, "array_utils", None), "byte_bounds", None
) or getattr(np, "byte_bounds", None)


def release_pages(block: Any) -> None:
    """Drop the process's mapping of a read-only memmap block's pages (a no-op otherwise)."""
    mm = getattr(block, "_mmap", None)
    if not isinstance(mm, mmap.mmap) or getattr(block, "mode", None) != "r":
        return
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or block.size == 0:
        return
    if _byte_bounds is None:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        lo, hi = _byte_bounds(block)
        page = mmap.PAGESIZE
        start = ((lo - base) // page) * page
        stop = min(len(mm), -(-(hi - base) // page) * page)
        if 0 <= start < stop:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
    except (ValueError, OSError, AttributeError, TypeError):
        # A closed or unusual map: releasing is an optimisation, never needed.
        pass


class RowSource:
    """A matrix given as an array, a memmap, a sparse matrix or an iterable of row blocks.

    Parameters
    ----------
    A : array_like, scipy.sparse matrix or iterable of array_like
        The matrix, shape ``(n, d)``; an iterable yields blocks of shape
        ``(k_i, d)`` (at least one row in all).
    name : str
        Argument name for error messages.
    streams : bool
        Whether an iterable of blocks is accepted.

    Notes
    -----
    Construction checks the type, the shape and (for in-memory forms) the
    dtype; the values (NaN/Inf, dtype of streamed blocks) are checked block by
    block as they are read, so a bad block raises in the middle of a pass.
    """

    def __init__(self, A: Any, name: str, *, streams: bool = True) -> None:
        self.name = name
        self.sparse = False
        self.stream: Iterable[Any] | None = None
        self.array: Any = None
        _refuse_foreign_tensor(A, name)
        if scipy.sparse.issparse(A):
            if A.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {A.shape}")
            if A.dtype.kind not in "iu" and A.dtype not in (np.float32, np.float64):
                raise TypeError(
                    f"{name} must have a float32, float64 or integer dtype, got {A.dtype}"
                )
            A = scipy.sparse.csr_matrix(A, dtype=np.float64)
            check_finite(A.data, f"{name} (stored entries)")
            self.sparse = True
            self.array = A
        elif isinstance(A, np.ndarray) or not _is_stream(A):
            if not isinstance(A, np.ndarray):
                A = as_float_matrix(A, name, finite=False)
            elif A.ndim != 2:
                raise ValueError(f"{name} must be 2-D of shape (n, d), got shape {A.shape}")
            else:
                # Checks the dtype on an empty slice: no pass over a large memmap.
                as_float_matrix(A[:0], name, finite=False)
            self.array = A
        else:
            if not streams:
                raise TypeError(
                    f"{name} must be a numpy array or a scipy.sparse matrix, got {type(A).__name__}"
                )
            self.stream = A
        if self.array is not None:
            n, d = self.array.shape
            if n == 0 or d == 0:
                raise ValueError(f"{name} must have at least one row and one column")
            self.n_rows: int | None = int(n)
            self.n_features: int | None = int(d)
        else:
            self.n_rows = None
            self.n_features = None

    @property
    def reiterable(self) -> bool:
        """Whether the rows can be read more than once."""
        return self.stream is None or iter(self.stream) is not self.stream

    def blocks(self, n_features: int | None = None, rows: int | None = None) -> Iterator[Any]:
        """Yield ``(start, block)``: C-contiguous, finite float64 blocks, in row order.

        ``n_features`` fixes the width a stream's blocks must have (the width
        of the first block otherwise). Blocks of read-only memmaps are released
        once the consumer asks for the next one.
        """
        if self.stream is not None:
            yield from self._stream_blocks(n_features)
            return
        A, n, d = self.array, self.n_rows, self.n_features
        assert n is not None and d is not None
        step = rows or block_rows(d)
        for lo in range(0, n, step):
            raw = A[lo : lo + step]
            if self.sparse:
                block = raw.toarray()
            else:
                block = as_float_matrix(raw, self.name, dtype=np.float64, finite=False)
                check_finite(block, self.name, row_offset=lo)
            yield lo, block
            release_pages(raw)

    def _stream_blocks(self, n_features: int | None) -> Iterator[Any]:
        assert self.stream is not None
        start = 0
        width = n_features
        for i, raw in enumerate(self.stream):
            what = f"{self.name} block {i}"
            _refuse_foreign_tensor(raw, what)
            if scipy.sparse.issparse(raw):
                if raw.ndim != 2:
                    raise ValueError(f"{what} must be 2-D, got shape {raw.shape}")
                block = np.asarray(raw.toarray(), dtype=np.float64)
            else:
                block = as_float_matrix(raw, what, dtype=np.float64, finite=False)
            if width is None:
                width = block.shape[1]
                if width == 0:
                    raise ValueError(f"{what} must have at least one column")
            if block.shape[1] != width:
                raise ValueError(f"{what} has {block.shape[1]} columns, expected {width}")
            check_finite(block, what, row_offset=start)
            self.n_features = width
            yield start, block
            start += block.shape[0]
            release_pages(raw)
        if start == 0:
            raise ValueError(f"{self.name} yielded no rows")
        self.n_rows = start


def _is_stream(A: Any) -> bool:
    # Array-likes (pandas frames, ...) are matrices even though they iterate.
    if isinstance(A, (str, bytes, dict)) or hasattr(A, "__array__"):
        return False
    if isinstance(A, (list, tuple)):
        # A list of numbers or of equal-length rows is a matrix; a list of 2-D
        # blocks (arrays or nested lists) is a stream.
        return len(A) > 0 and all(np.ndim(a) == 2 for a in A)
    return isinstance(A, Iterable)


def countsketch_sparse(A: scipy.sparse.csr_matrix, sketch_size: int, key: int) -> np.ndarray:
    """``S·A`` for the CountSketch of ``key`` (the one ``CountSketch`` uses), in O(nnz(A))."""
    n = A.shape[0]
    buckets = np.empty(n, np.int64)
    signs = np.empty(n, np.float64)
    hashed_buckets_signs(key, 0, n, sketch_size, buckets, signs)
    # One entry per column: the CSC form needs no sorting.
    S = scipy.sparse.csc_matrix((signs, buckets, np.arange(n + 1)), shape=(sketch_size, n))
    return np.asarray((S @ A).toarray(), dtype=np.float64)


def sketch_columns(
    parts: list[RowSource],
    kind: str,
    sketch_size: int,
    key: int,
    bar: Any = None,
) -> list[np.ndarray]:
    """``[S·P for P in parts]`` with one shared ``S`` (``kind``, ``sketch_size``, ``key``).

    ``parts`` are in-memory sources (arrays or sparse) with the same number of
    rows. Cost: one pass over each part; CountSketch of sparse parts costs
    O(nnz). Dense parts with CountSketch or SRHT are sketched whole (the
    sketches' threaded fast path) after a finiteness check; otherwise row
    blocks of all parts are put side by side so that ``S`` is generated once
    (for a Gaussian sketch, generating ``S`` costs as much as applying it).
    """
    widths = [p.n_features for p in parts]
    n = parts[0].n_rows
    assert n is not None and all(w is not None for w in widths)
    if kind == "countsketch" and all(p.sparse for p in parts):
        out = [countsketch_sparse(p.array, sketch_size, key) for p in parts]
        if bar is not None:
            bar.update(n)
        return out
    # Memory maps go block by block so that their pages can be released.
    if kind != "gaussian" and not any(p.sparse or isinstance(p.array, np.memmap) for p in parts):
        out = []
        for p in parts:
            X = as_float_matrix(p.array, p.name, dtype=np.float64, finite=False)
            try:
                out.append(make_sketch(kind, X.shape[1], sketch_size, key).extend(X).result())
            except ValueError:
                # NaN/Inf always reach the (checked) sketch, so X is validated
                # without a pass of its own; find the culprit only on failure.
                check_finite(X, p.name, row_offset=0)
                raise ValueError(f"{p.name} is too large: its sketch overflows float64") from None
        if bar is not None:
            bar.update(n)
        return out
    total = int(sum(widths))  # type: ignore[arg-type]
    sk = make_sketch(kind, total, sketch_size, key)
    step = block_rows(total)
    iters = [p.blocks(rows=step) for p in parts]
    for lo in range(0, n, step):
        pieces = [next(it)[1] for it in iters]
        sk.extend(np.hstack(pieces) if len(pieces) > 1 else pieces[0], start_index=lo)
        if bar is not None:
            bar.update(pieces[0].shape[0])
    for it in iters:
        # Finish the generators so the last blocks' pages are released.
        for _ in it:
            pass
    SP = sk.result()
    cuts = np.cumsum([0, *widths])
    return [np.ascontiguousarray(SP[:, a:b]) for a, b in itertools.pairwise(cuts)]
