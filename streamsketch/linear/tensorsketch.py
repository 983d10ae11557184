"""TensorSketch: a random feature map for the polynomial kernel ``<x, y>^p``.

Pham & Pagh (2013) sketch the tensor power ``x^{(x)p}`` without forming it:
with ``p`` independent CountSketches ``C_1 .. C_p`` of the features (bucket
hashes ``h_j``, sign hashes ``s_j``), the CountSketch of ``x^{(x)p}`` under the
combined hash ``H(i_1..i_p) = sum_j h_j(i_j) mod m`` and sign
``S = prod_j s_j(i_j)`` is the circular convolution ``C_1 x * ... * C_p x``,
i.e. ``irfft(prod_j rfft(C_j x))``. The cost per row is
``O(p (d + m log m))`` instead of ``O(d^p)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft

from .._parallel import njit, run_chunks, split_rows
from .._random import SeedLike, derive_key, hashed_buckets_signs, seed_to_key
from .._validation import as_float_matrix, check_dtype_arg, check_int
from ..base import FeatureMap

__all__ = ["TensorSketch"]

# Rows per FFT block: the (degree, rows, m) real buffer plus its spectra stay
# within a few MiB of cache. Batched rfft on cache-resident blocks ran about
# 1.7x faster than one rfft over the whole (degree, n, m) array, which streams
# from memory (d=64, p=4, m=1024: 32-row blocks were the sweet spot).
_BLOCK_BYTES = 1 << 21
_MIN_BLOCK_ROWS = 1
_MAX_BLOCK_ROWS = 1024

# numpy >= 2 computes float32 FFTs in float32 and writes into ``out=``: each
# thread then reuses one workspace for all its blocks. Fresh per-block arrays
# (scipy.fft has no ``out=``) cost page faults and unmaps that serialise the
# threads: on 2 cores the reused workspace scaled 1.9x, fresh arrays 1.2-1.7x.
_NUMPY_FFT_OUT = int(np.__version__.split(".")[0]) >= 2


@njit(nogil=True, cache=True)
def _scatter_degrees(  # pragma: no cover - compiled
    X: np.ndarray,
    lo: int,
    hi: int,
    buckets: npt.NDArray[np.int64],
    signs: np.ndarray,
    buf: np.ndarray,
) -> float:
    """``buf[j, i - lo]`` = CountSketch ``C_j`` of row ``X[i]``, for ``lo <= i < hi``.

    Returns the largest ``||X[i]||_1`` of the block (for the overflow bound).
    """
    p, d = buckets.shape
    m = buf.shape[2]
    l1max = 0.0
    for i in range(lo, hi):
        s = 0.0
        for f in range(d):
            s += abs(X[i, f])
        l1max = max(l1max, s)
    for j in range(p):
        for i in range(lo, hi):
            row = buf[j, i - lo]
            for k in range(m):
                row[k] = 0.0
            for f in range(d):
                row[buckets[j, f]] += signs[j, f] * X[i, f]
    return l1max


class TensorSketch(FeatureMap):
    """Pham–Pagh TensorSketch: ``E <phi(x), phi(y)> = <x, y>^degree``.

    Parameters
    ----------
    n_features : int
        Input width ``d``.
    degree : int
        Polynomial degree ``p >= 1`` (``p = 1`` is a plain CountSketch of the
        features).
    sketch_size : int
        Output width ``m`` (:attr:`n_components`).
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the output (and of the FFTs); inputs are converted to it.
    seed : int, numpy.random.Generator or None
        Fixes the ``degree`` pairs of hash functions. Degree ``j`` uses the
        hashes of the key ``derive_key(key, j)``, so the map is a pure
        function of ``(seed, n_features, degree, sketch_size)``.

    Notes
    -----
    **Guarantee.** For any ``x, y`` the estimate ``<phi(x), phi(y)>`` is
    exactly unbiased, ``E <phi(x), phi(y)> = <x, y>^p``, because the sign of
    a tensor coordinate is the product of ``p`` independent signs, and its
    variance is at most

    ``Var <phi(x), phi(y)> <= (2 + 3^p) / m * ||x||^(2p) ||y||^(2p)``

    (Avron, Nguyen & Woodruff 2014, the second-moment bound for TensorSketch;
    Pham & Pagh 2013). By Chebyshev, ``m >= (2 + 3^p) / (eps^2 delta)`` gives
    ``|<phi(x), phi(y)> - <x, y>^p| <= eps ||x||^p ||y||^p`` with probability
    ``1 - delta``. The variance falls like ``1/m``; for ``p >= 2`` the
    ``3^p`` factor comes from hash collisions that agree in some but not all
    of the ``p`` factors.

    **Cost.** ``transform`` of ``n`` rows: ``O(n p (d + m log m))`` time
    (``p`` forward real FFTs and one inverse per row dominate), in blocks of
    rows whose workspace (``p`` real buffers and their half-spectra, about
    ``2 p m`` floats per row, near 2 MiB) each thread allocates once and
    reuses; the blocks are spread over
    :func:`streamsketch._parallel.num_threads` threads (the numba scatter
    kernel and the FFTs release the GIL).
    Fixed workspace: the ``(p, d)`` bucket and sign arrays,
    ``nbytes = p d (8 + itemsize)``.

    There is no stream state: the object is a fixed random map and
    serialises by its parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.linear.tensorsketch import TensorSketch
    >>> X = np.random.default_rng(0).standard_normal((5, 16))
    >>> TensorSketch(16, 3, 256, seed=0).transform(X).shape
    (5, 256)
    """

    def __init__(
        self,
        n_features: int,
        degree: int,
        sketch_size: int,
        *,
        dtype: Any = np.float64,
        seed: SeedLike = None,
    ) -> None:
        self.n_features = check_int(n_features, "n_features", minimum=1)
        self.degree = check_int(degree, "degree", minimum=1, maximum=64)
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1, maximum=2**31 - 1)
        self.dtype = check_dtype_arg(dtype)
        self._key = seed_to_key(seed)
        d, p = self.n_features, self.degree
        self._buckets = np.empty((p, d), dtype=np.int64)
        self._signs = np.empty((p, d), dtype=self.dtype)
        for j in range(p):
            # hashed_buckets_signs writes through views, so each degree's row
            # is filled in place from its own sub-key.
            hashed_buckets_signs(
                derive_key(self._key, j), 0, d, self.sketch_size, self._buckets[j], self._signs[j]
            )
        row_bytes = 2 * p * (self.sketch_size + 2) * self.dtype.itemsize
        self._block_rows = int(
            min(_MAX_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // max(1, row_bytes)))
        )

    # -- protocol -----------------------------------------------------------
    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        return 16 * int(params["degree"]) * int(params["n_features"])

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "degree": self.degree,
            "sketch_size": self.sketch_size,
            "dtype": self.dtype.name,
            "seed_key": self._key,
        }

    def _workspace_arrays(self) -> list[np.ndarray]:
        return [self._buckets, self._signs]

    @property
    def n_components(self) -> int:
        """Output width, ``sketch_size``."""
        return self.sketch_size

    # -- the map --------------------------------------------------------------
    def hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-degree CountSketch hashes (copies).

        Returns
        -------
        buckets : numpy.ndarray of int64, shape (degree, n_features)
            ``h_j(f)`` in ``[0, sketch_size)``.
        signs : numpy.ndarray of dtype, shape (degree, n_features)
            ``s_j(f)`` in ``{-1, +1}``.
        """
        return self._buckets.copy(), self._signs.copy()

    def transform(self, X: Any) -> np.ndarray:
        """Map rows ``X`` to their TensorSketch features.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
            Finite float32/float64 (converted to ``dtype``) or integer rows.

        Returns
        -------
        numpy.ndarray, shape (n, sketch_size), dtype ``dtype``
            ``phi(X)``, with ``E phi(x) . phi(y) = (x . y)^degree``.

        Raises
        ------
        ValueError, TypeError
            Wrong shape or dtype, NaN/Inf in ``X``, or values so large that
            ``phi`` overflows the dtype.

        Notes
        -----
        Time ``O(n degree (n_features + m log m))``; temporary memory about
        ``2 degree m`` floats per row of a block, independent of ``n``.
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        n, m = X.shape[0], self.sketch_size
        out = np.empty((n, m), dtype=self.dtype)
        if n == 0:
            return out
        block = self._block_rows
        bad = []

        def part(lo: int, hi: int) -> None:
            work = self._workspace(min(block, hi - lo))
            for b in range(lo, hi, block):
                if not self._transform_block(X, b, min(hi, b + block), out, work):
                    bad.append(b)
                    return

        run_chunks(part, split_rows(n, block))
        if bad:
            raise ValueError("X is too large: its TensorSketch overflows the dtype")
        return out

    def _workspace(self, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        m, p = self.sketch_size, self.degree
        buf = np.empty((p, rows, m), dtype=self.dtype)
        if not _NUMPY_FFT_OUT:
            return buf, None
        ctype = np.complex64 if self.dtype == np.float32 else np.complex128
        return buf, np.empty((p, rows, m // 2 + 1), dtype=ctype)

    def _transform_block(
        self,
        X: np.ndarray,
        lo: int,
        hi: int,
        out: np.ndarray,
        work: tuple[np.ndarray, np.ndarray | None],
    ) -> bool:
        m, p = self.sketch_size, self.degree
        rows = hi - lo
        buf = work[0][:, :rows]
        l1 = _scatter_degrees(X, lo, hi, self._buckets, self._signs, buf)
        # Every intermediate (CountSketch entries, spectra, their product,
        # the unnormalised inverse sums) is bounded by m * ||x||_1^p, so
        # below this threshold the block cannot overflow and the pass that
        # checks the result for Inf/NaN is skipped.
        safe = l1 == 0.0 or (
            math.isfinite(l1)
            and p * math.log(l1) + math.log(8.0 * m) < math.log(float(np.finfo(self.dtype).max))
        )
        dest = out[lo:hi]
        with np.errstate(over="ignore", invalid="ignore"):
            if p == 1:
                dest[...] = buf[0]
            elif work[1] is not None:
                spec = work[1][:, :rows]
                np.fft.rfft(buf, axis=-1, out=spec)
                for j in range(1, p):
                    np.multiply(spec[0], spec[j], out=spec[0])
                np.fft.irfft(spec[0], n=m, axis=-1, out=dest)
            else:
                spec = scipy.fft.rfft(buf, axis=-1, workers=1)
                for j in range(1, p):
                    np.multiply(spec[0], spec[j], out=spec[0])
                dest[...] = scipy.fft.irfft(spec[0], n=m, axis=-1, workers=1)
        return safe or bool(np.isfinite(dest).all())
