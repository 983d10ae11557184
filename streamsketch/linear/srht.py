"""Subsampled randomised Hadamard transform that streams an unbounded row count.

The textbook SRHT ``S = sqrt(n/m) P H_n D`` needs the number of rows ``n``
(a power of two) up front. Here the Hadamard matrix is the infinite Sylvester
matrix, so ``S`` has shape ``(m, infinity)`` and never needs ``n``.

Construction
------------
``S = (1/sqrt(m)) P H D`` where

- ``D = diag(d_0, d_1, ...)``, ``d_i = +-1`` hashed from ``(seed, i)``;
- ``H[r, i] = (-1)^popcount(r & i)`` for ``r, i >= 0``. Its top-left
  ``2^b x 2^b`` corner is the Sylvester matrix ``H_{2^b}`` for every ``b``
  (unnormalised, entries +-1), so one matrix serves every stream length;
- ``P`` picks rows ``r_1 .. r_m`` of ``H`` uniformly, with replacement, from
  ``[0, 2^62)``; they are drawn once, at construction, from the seed.

Unbiasedness. For positions ``i != j`` below ``2^62``, ``i ^ j`` has some bit
``b < 62`` set, and flipping bit ``b`` of ``r`` is a bijection of
``[0, 2^62)`` that flips the sign of ``H[r, i] H[r, j] = (-1)^popcount(r & (i ^ j))``,
so ``E_r[H[r, i] H[r, j]] = 0``; for ``i == j`` it is 1. Hence
``E[S^T S] = (1/m) sum_t E[H[r_t, :]^T H[r_t, :]] = I`` on every finite set of
positions, whatever the signs ``D``.

Link to the textbook SRHT. If every position used is below ``N = 2^b``,
``H[r, i]`` depends only on ``r mod N`` (the higher bits of ``r`` meet zero
bits of ``i``), and ``r_t mod N`` is uniform on ``[0, N)``. So ``S`` acting on
those positions is exactly the SRHT of the zero-padded length-``N`` stream
with rows sampled with replacement, and the usual guarantees hold with
``n = N <= 2^62``.

Fast path. For an aligned block of ``k = 2^b`` positions starting at ``s``
(``s`` a multiple of ``k``), ``s + j = s | j`` for ``j < k``, so
``popcount(r & (s + j)) = popcount(r & s) + popcount((r mod k) & j)`` and
``H[r, s + j] = (-1)^popcount(r & s) H_k[r mod k, j]``. The block's
contribution to row ``t`` of ``S X`` is therefore
``(-1)^popcount(r_t & s) (H_k D_block X_block)[r_t mod k] / sqrt(m)``: one fast
Walsh–Hadamard transform of the block (O(k log k) per column) and a gather
of ``m`` of its rows, instead of ``O(m k)`` per column. Any range of positions
splits into maximal aligned power-of-two blocks (the dyadic decomposition),
so every ``start_index`` takes the fast path and gives exactly the dense
definition (to rounding).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from .._parallel import njit, num_threads, run_chunks
from .._random import SeedLike, derive_key, hashed_signs, key_generator
from ._rowsketch import LinearRowSketch

__all__ = ["SRHT"]

# Sub-keys of the sketch's key: the signs D and the sampled Hadamard rows P.
_SIGN_KEY_PATH = 1
_ROWS_KEY_PATH = 2
_ROW_RANGE = 2**62

# Largest aligned block handed to one Walsh–Hadamard transform. Per row and
# column a block of k rows costs log2(k) butterflies plus m/k for the gather,
# minimised near k = m ln 2; the cap is m rounded up to a power of two (which
# measured as fast as any other choice), bounded so the (k, d) buffer stays
# in cache.
_MIN_CAP = 8
_MAX_CAP = 4096
# Positions per unit of work handed to a thread: a multiple of _MAX_CAP, and
# units start at multiples of it, so the block decomposition and the order of
# the partial sums are the same for every thread count.
_UNIT = 16384
# Columns processed together; wider inputs (``transform`` of many rows) are
# split so the (k, columns) workspace stays small.
_COL_TILE = 256


@njit(nogil=True, cache=True)
def _parity(x: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    x ^= x >> np.uint64(32)
    x ^= x >> np.uint64(16)
    x ^= x >> np.uint64(8)
    x ^= x >> np.uint64(4)
    x ^= x >> np.uint64(2)
    x ^= x >> np.uint64(1)
    x &= np.uint64(1)  # in place, like the lines above: keeps the uint64 type (see _mix64)
    return x


@njit(nogil=True, cache=True)
def _fwht(W: np.ndarray, k: int) -> None:  # pragma: no cover - compiled
    """In-place unnormalised Walsh–Hadamard transform of ``W[:k]`` along axis 0."""
    ncols = W.shape[1]
    h = 1
    while h < k:
        for i in range(0, k, 2 * h):
            for j in range(i, i + h):
                a = W[j]
                b = W[j + h]
                for c in range(ncols):
                    x = a[c]
                    y = b[c]
                    a[c] = x + y
                    b[c] = x - y
        h *= 2


@njit(nogil=True, cache=True)
def _srht_accumulate(  # pragma: no cover - compiled
    X: np.ndarray,
    lo: int,
    hi: int,
    start: int,
    sign_key: int,
    rows: npt.NDArray[np.int64],
    cap: int,
    out: np.ndarray,
) -> None:
    """``out += (H D X)[rows]`` over rows ``lo <= i < hi`` of ``X`` (position ``start + i``).

    Unscaled (no ``1/sqrt(m)``); ``out`` has shape ``(len(rows), X.shape[1])``.
    """
    ncols = X.shape[1]
    m = rows.shape[0]
    W = np.empty((cap, ncols), X.dtype)
    signs = np.empty(cap, X.dtype)
    i = lo
    while i < hi:
        g = start + i
        k = cap
        while (g & (k - 1)) != 0 or i + k > hi:
            k >>= 1
        hashed_signs(sign_key, g, k, signs)
        for j in range(k):
            s = signs[j]
            for c in range(ncols):
                W[j, c] = s * X[i + j, c]
        _fwht(W, k)
        gu = np.uint64(g)
        mask = np.uint64(k - 1)
        for t in range(m):
            r = np.uint64(rows[t])
            src = W[np.int64(r & mask)]
            dst = out[t]
            if _parity(r & gu):
                for c in range(ncols):
                    dst[c] -= src[c]
            else:
                for c in range(ncols):
                    dst[c] += src[c]
        i += k


def _cap_for(m: int) -> int:
    cap = _MIN_CAP
    while cap < m and cap < _MAX_CAP:
        cap *= 2
    return cap


class SRHT(LinearRowSketch):
    """Streaming subsampled randomised Hadamard transform: ``result() = S·A``.

    ``S = (1/sqrt(m)) P H D`` with the infinite Sylvester Hadamard matrix
    ``H[r, i] = (-1)^popcount(r & i)``, random signs ``D`` hashed per global
    position and ``m`` rows ``P`` sampled uniformly with replacement from
    ``[0, 2^62)`` (see the module docstring for the derivation). The number of
    rows of the stream is never needed.

    Parameters
    ----------
    n_features : int
        Width ``d`` of each row.
    sketch_size : int
        Rows ``m`` of the sketch.
    dtype : {numpy.float64, numpy.float32}, default float64
        State dtype; inputs are converted to it.
    seed : int, numpy.random.Generator or None
        Fixes ``D`` and ``P``; sketches merge only when built with the same
        seed.

    Notes
    -----
    Guarantee: ``E[S^T S] = I`` on every finite set of positions. If all
    positions are below ``N = 2^b`` (``N <= 2^62``), ``S`` restricted to them
    is the SRHT of the zero-padded length-``N`` stream with rows sampled with
    replacement, so (Tropp 2011; Boutsidis & Gittens 2013) it is a
    ``(1 +- eps)`` subspace embedding of a rank-``d`` matrix with probability
    ``1 - delta`` once ``m = O((d + log(N / delta)) log(d / delta) / eps^2)``;
    ``log N <= 62 log 2`` for every stream. For a single vector,
    ``m = O(eps^-2 log(1/delta) log(N/delta))`` suffices.

    Cost: ``extend`` of ``k`` rows starting at position ``s`` splits
    ``[s, s + k)`` into maximal aligned power-of-two blocks of at most ``c``
    positions (``c`` = ``m`` rounded up to a power of two, clamped to
    ``[8, 4096]``); a block of size ``b`` costs ``O(b log b d)`` for its
    Walsh–Hadamard transform plus ``O(m d)`` for the gather, so a long
    ``extend`` is ``O(k d (log c + m / c))``, i.e. ``O(k d log m)`` for
    ``m <= 4096``, against
    ``O(k d m)`` for a dense sketch. Blocks near the ends of an unaligned
    range are smaller, adding at most ``O(m d log c)``; ``update`` is
    ``O(m d)``. Units of 16384 positions run on a thread pool, each with an
    ``(c, d)`` transform buffer and an ``(m, d)`` partial sum, added in a
    fixed order (the state does not depend on the thread count). Workspace
    held by the sketch: the ``(m, d)`` state and the ``m`` sampled rows,
    ``nbytes = m * d * itemsize + 8 m``.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.linear.srht import SRHT
    >>> A = np.random.default_rng(0).standard_normal((1000, 8))
    >>> sk = SRHT(8, 64, seed=1).extend(A[:600])
    >>> sk.extend(A[600:], start_index=600).result().shape
    (64, 8)
    """

    def __init__(
        self,
        n_features: int,
        sketch_size: int,
        *,
        dtype: Any = np.float64,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(n_features, sketch_size, dtype=dtype, seed=seed)
        self._sign_key = derive_key(self._key, _SIGN_KEY_PATH)
        gen = key_generator(derive_key(self._key, _ROWS_KEY_PATH))
        self._rows: npt.NDArray[np.int64] = gen.integers(
            0, _ROW_RANGE, size=self.sketch_size, dtype=np.int64
        )
        self._cap = _cap_for(self.sketch_size)

    @property
    def hadamard_rows(self) -> np.ndarray:
        """The sampled Hadamard row indices ``r_1, ..., r_m``, shape ``(m,)``, int64 (a copy)."""
        rows: npt.NDArray[np.int64] = self._rows.copy()
        return rows

    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        return super()._predicted_nbytes(params) + 8 * int(params["sketch_size"])

    def _workspace_arrays(self) -> list[np.ndarray]:
        return [self._rows]

    def _apply(self, X: np.ndarray, start: int) -> np.ndarray:
        m = self.sketch_size
        n, ncols = X.shape
        # Units are aligned to global positions so that the block
        # decomposition is the one of the whole range, whatever the threads.
        cuts = [0]
        nxt = (start // _UNIT + 1) * _UNIT - start
        while nxt < n:
            cuts.append(nxt)
            nxt += _UNIT
        cuts.append(n)
        units = list(pairwise(cuts))
        out = np.zeros((m, ncols), dtype=self.dtype)

        def add_units(Xt: np.ndarray, acc: np.ndarray, todo: list[tuple[int, int]]) -> None:
            # Overflow and NaN surface as non-finite entries of the result,
            # which the caller checks before touching the state. (errstate is
            # per thread, hence set here, where the sums run.)
            parts = run_chunks(
                lambda lo, hi: self._unit(Xt, start, lo, hi),
                todo,
            )
            with np.errstate(over="ignore", invalid="ignore"):
                for p in parts:
                    acc += p

        # Partial sums are always added unit by unit in stream order, so the
        # bits of the result depend neither on the thread count nor on which
        # of the two ways of splitting the work below is taken.
        if ncols <= _COL_TILE:
            wave = max(1, num_threads())
            for w in range(0, len(units), wave):
                add_units(X, out, units[w : w + wave])
        else:
            # Wide input (``transform`` of many rows): threads take column
            # tiles, which keeps the (block, columns) buffers small.
            def tile(c0: int, c1: int) -> None:
                Xt = np.ascontiguousarray(X[:, c0:c1])
                for unit in units:
                    add_units(Xt, out[:, c0:c1], [unit])

            run_chunks(tile, [(c, min(c + _COL_TILE, ncols)) for c in range(0, ncols, _COL_TILE)])
        out *= self.dtype.type(1.0 / np.sqrt(m))
        return out

    def _unit(self, X: np.ndarray, start: int, lo: int, hi: int) -> np.ndarray:
        acc = np.zeros((self.sketch_size, X.shape[1]), dtype=self.dtype)
        _srht_accumulate(X, lo, hi, start, self._sign_key, self._rows, self._cap, acc)
        return acc
