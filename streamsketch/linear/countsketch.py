"""CountSketch (the sparse embedding of Clarkson & Woodruff, 2013).

``S`` has one non-zero per column: column ``i`` holds ``s(i) in {-1, +1}`` in
row ``h(i)``, both hashed from ``(seed, i)``. ``S·A`` costs O(nnz(A)) and
``E[(SA)^T (SA)] = A^T A``; ``sketch_size = O(d^2 / (eps^2 delta))`` gives a
(1 +- eps) subspace embedding of a rank-``d`` ``A`` with probability
``1 - delta``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from .._parallel import njit, num_threads, run_chunks, split_rows
from .._random import SeedLike, hash_index, hashed_buckets_signs
from .._validation import as_float_matrix, check_finite, check_int
from ._rowsketch import LinearRowSketch, _finite_features

__all__ = ["CountSketch", "countsketch"]

# Below this many rows a block is scattered straight into the state after an
# up-front finiteness check: cheaper than a fresh (m, d) buffer per row.
_DIRECT_ROWS = 64
_ROWS_PER_THREAD = 8192
# Rows per unit of work, cut at global positions (see _apply).
_UNIT = 16384


@njit(nogil=True, cache=True)
def _scatter_rows(  # pragma: no cover - compiled
    X: np.ndarray, key: int, start: int, lo: int, hi: int, out: np.ndarray
) -> None:
    """``out[h(i)] += s(i) * X[i]`` for ``lo <= i < hi`` (global index ``start + i``).

    Hashes inline (the formula of ``hashed_buckets_signs``, checked equal by
    the tests through ``sketch_matrix``) so the hot loop needs no index arrays.
    """
    m = np.uint64(out.shape[0])
    k = np.uint64(key)
    d = X.shape[1]
    for i in range(lo, hi):
        h = hash_index(k, np.uint64(start + i))
        row = out[np.int64(((h >> np.uint64(32)) * m) >> np.uint64(32))]
        if h & np.uint64(1):
            for j in range(d):
                row[j] += X[i, j]
        else:
            for j in range(d):
                row[j] -= X[i, j]


@njit(nogil=True, cache=True)
def _scatter_cols(  # pragma: no cover - compiled
    X: np.ndarray, key: int, lo: int, hi: int, out: np.ndarray
) -> None:
    """Feature map: ``out[i, h(f)] += s(f) * X[i, f]`` for rows ``lo <= i < hi``."""
    d = X.shape[1]
    buckets = np.empty(d, np.int64)
    signs = np.empty(d, X.dtype)
    hashed_buckets_signs(key, 0, d, out.shape[1], buckets, signs)
    for i in range(lo, hi):
        for f in range(d):
            out[i, buckets[f]] += signs[f] * X[i, f]


class CountSketch(LinearRowSketch):
    """Streaming CountSketch of a row stream: ``result() = S·A``.

    Parameters
    ----------
    n_features : int
        Width ``d`` of each row.
    sketch_size : int
        Rows ``m`` of the sketch.
    dtype : {numpy.float64, numpy.float32}, default float64
        State dtype; inputs are converted to it.
    seed : int, numpy.random.Generator or None
        Fixes the hash functions; equal seeds merge.

    Notes
    -----
    ``extend`` costs O(k d) for ``k`` rows (one read of the input, a numba
    kernel, split across threads for large blocks); ``update`` is O(d).
    Workspace: the ``(m, d)`` state, ``nbytes = m * d * itemsize``.
    Rows are hashed by their global stream position (``start_index``), so
    shards sketched on different workers with the same seed merge by addition
    into the sketch of the concatenated stream, bit-for-bit up to the order of
    floating-point additions.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch import CountSketch
    >>> A = np.random.default_rng(0).standard_normal((1000, 8))
    >>> sk = CountSketch(8, 64, seed=1).extend(A[:600])
    >>> sk.extend(A[600:]).result().shape
    (64, 8)
    """

    def _apply(self, X: np.ndarray, start: int) -> np.ndarray:
        # Rows are cut into units at global positions that are multiples of
        # _UNIT and the units' partial sketches are added in stream order, so
        # the rounding, hence the bits, do not depend on the thread count.
        key, d, n = self._key, X.shape[1], X.shape[0]
        first_cut = -(-start // _UNIT) * _UNIT
        cuts = [0, *(p - start for p in range(first_cut, start + n, _UNIT) if p > start), n]
        units = list(itertools.pairwise(cuts))

        def part(lo: int, hi: int) -> np.ndarray:
            out = np.zeros((self.sketch_size, d), dtype=self.dtype)
            _scatter_rows(X, key, start, lo, hi, out)
            return out

        total: np.ndarray | None = None
        wave = num_threads()
        for w in range(0, len(units), wave):
            for p in run_chunks(part, units[w : w + wave]):
                if total is None:
                    total = p
                else:
                    total += p
        assert total is not None
        return total

    def _accumulate(self, X: np.ndarray, start: int) -> None:
        if X.shape[0] > _DIRECT_ROWS:
            super()._accumulate(X, start)
            return
        # Few rows: update only the touched rows of the state, out of place,
        # so the cost is O(k d) rather than a fresh (m, d) buffer per row.
        check_finite(X, "X")
        k = X.shape[0]
        buckets = np.empty(k, np.int64)
        signs = np.empty(k, self.dtype)
        hashed_buckets_signs(self._key, start, k, self.sketch_size, buckets, signs)
        rows, pos = np.unique(buckets, return_inverse=True)
        new = self._SA[rows]
        np.add.at(new, pos, signs[:, None] * X)
        if not np.isfinite(new).all():
            raise ValueError("X is too large: its sketch overflows the dtype")
        self._SA[rows] = new

    def transform(self, X: Any) -> np.ndarray:
        """Feature map: CountSketch of each row's features, ``(n, d) -> (n, sketch_size)``.

        Uses the hashes of positions ``0 .. d-1``, i.e. ``X S[:, :d]^T``. O(n d).
        Raises ``ValueError`` when the features overflow the dtype.
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        out = np.zeros((X.shape[0], self.sketch_size), dtype=self.dtype)

        def part(lo: int, hi: int) -> None:
            _scatter_cols(X, self._key, lo, hi, out)

        run_chunks(part, split_rows(X.shape[0], _ROWS_PER_THREAD))
        return _finite_features(out)


def countsketch(A: Any, sketch_size: int, seed: SeedLike = None) -> np.ndarray:
    """One-shot CountSketch ``S·A`` of a matrix.

    Equal to ``CountSketch(A.shape[1], sketch_size, dtype=A.dtype, seed=seed).extend(A).result()``
    (float32 input stays float32, integers become float64).

    Parameters
    ----------
    A : array_like, shape (n, d)
    sketch_size : int
    seed : int, numpy.random.Generator or None

    Returns
    -------
    numpy.ndarray, shape (sketch_size, d)

    Raises
    ------
    ValueError, TypeError
        ``A`` not 2-D, without columns, of a non-numeric dtype, holding
        NaN/Inf, or so large that its sketch overflows; bad ``sketch_size``.
    """
    A = as_float_matrix(A, "A", finite=False)
    check_int(sketch_size, "sketch_size", minimum=1)
    if A.shape[1] == 0:
        raise ValueError("A must have at least one column")
    sketch = CountSketch(A.shape[1], sketch_size, dtype=A.dtype, seed=seed)
    try:
        return sketch.extend(A).result()
    except ValueError:
        # NaN/Inf reach the (checked) sketch, so A needs no separate pass;
        # name the argument the caller knows.
        check_finite(A, "A")
        raise ValueError("A is too large: its sketch overflows the dtype") from None
