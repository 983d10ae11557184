"""Dense Gaussian Johnson–Lindenstrauss sketch.

``S[r, i] = g(seed, i, r) / sqrt(m)`` with ``g`` standard normal, produced by
the counter-based :func:`~streamsketch._random.hashed_normals`: column ``i`` is a
pure function of ``(seed, i)``, so any chunking of the stream, any worker and
any thread count use the same matrix, and shards merge by addition.
"""

from __future__ import annotations

import numpy as np

from .._parallel import num_threads, run_chunks
from .._random import hashed_normals
from ._rowsketch import LinearRowSketch

__all__ = ["GaussianSketch"]

# Rows per generated Gaussian block: enough columns for an efficient BLAS
# matmul, while the (m, block) buffer stays within about 8 MiB.
_MAX_BLOCK = 2048
_MIN_BLOCK = 64
_BLOCK_ENTRIES = 1 << 20


def _block_rows(m: int) -> int:
    return max(_MIN_BLOCK, min(_MAX_BLOCK, _BLOCK_ENTRIES // m))


class GaussianSketch(LinearRowSketch):
    """Streaming Gaussian sketch of a row stream: ``result() = S·A``.

    ``S`` has shape ``(sketch_size, infinity)`` with i.i.d. ``N(0, 1/m)``
    entries (``m = sketch_size``); column ``i`` multiplies the row at global
    stream position ``i``.

    Parameters
    ----------
    n_features : int
        Width ``d`` of each row.
    sketch_size : int
        Rows ``m`` of the sketch.
    dtype : {numpy.float64, numpy.float32}, default float64
        State dtype; inputs are converted to it and the Gaussian entries are
        generated in float64 and rounded to it.
    seed : int, numpy.random.Generator or None
        Fixes ``S``; sketches merge only when built with the same seed.

    Notes
    -----
    Guarantee (Johnson–Lindenstrauss): ``E[S^T S] = I`` and, for a fixed
    vector ``x``, ``m ||S x||^2 / ||x||^2`` is chi-squared with ``m`` degrees
    of freedom (mean 1 and variance ``2/m`` for the ratio), so
    ``| ||Sx||^2 - ||x||^2 | <= eps ||x||^2`` with probability ``1 - delta``
    once ``m = O(eps^-2 log(1/delta))``. For every ``x`` in a ``d``-dimensional
    subspace at once (a subspace embedding: ``||S A x|| = (1 +- eps) ||A x||``
    for all ``x``, hence every singular value of ``S A`` is within a factor
    ``1 +- eps`` of the matching one of ``A``)
    ``m = O((d + log(1/delta)) / eps^2)`` suffices.

    Cost: ``extend`` of ``k`` rows is O(m k d) for the matmul plus O(m k) to
    generate the Gaussian entries (which dominates for small ``d``: a
    hashed Box–Muller normal costs about as much as tens of multiply-adds).
    The rows are processed in blocks of at most 2048 (fewer when ``m`` is
    large, so one ``(m, block)`` block stays under about 8 MiB); worker
    threads generate one block each and the calling thread multiplies them
    with BLAS in stream order, so the state does not depend on the thread
    count. Transient memory: one block per thread. ``update`` is O(m d).
    Workspace held: the ``(m, d)`` state, ``nbytes = m * d * itemsize``
    (``S`` is never stored).

    The matrix is the same for every ``start_index`` convention: a worker
    that sketches rows ``[s, s + k)`` of a stream with ``start_index=s``
    merges with the others into the sketch of the whole stream.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.linear.gaussian import GaussianSketch
    >>> A = np.random.default_rng(0).standard_normal((1000, 8))
    >>> sk = GaussianSketch(8, 64, seed=1).extend(A[:600])
    >>> sk.extend(A[600:]).result().shape
    (64, 8)
    """

    def _apply(self, X: np.ndarray, start: int) -> np.ndarray:
        m = self.sketch_size
        n, ncols = X.shape
        block = _block_rows(m)
        key = self._key

        def generate(lo: int, hi: int) -> np.ndarray:
            G = np.empty((m, hi - lo), dtype=self.dtype)
            hashed_normals(key, start + lo, hi - lo, m, G)
            return G

        # Generating the Gaussian entries costs several times the matmul, so
        # the worker threads generate one block each (a GIL-free kernel) and
        # this thread multiplies with BLAS, which has threads of its own:
        # running BLAS inside the workers oversubscribes the cores. Blocks are
        # added in order, so the result does not depend on the thread count.
        blocks = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
        total = np.zeros((m, ncols), dtype=self.dtype)
        wave = max(1, num_threads())
        # Overflow and NaN surface as non-finite entries of the result, which
        # the caller checks before touching the state; no warning needed.
        with np.errstate(over="ignore", invalid="ignore"):
            for w in range(0, len(blocks), wave):
                ranges = blocks[w : w + wave]
                for (lo, hi), G in zip(ranges, run_chunks(generate, ranges), strict=True):
                    total += G @ X[lo:hi]
            total *= self.dtype.type(1.0 / np.sqrt(m))
        return total
