"""Shared machinery of the oblivious linear sketches S·A.

Each sketch is a random matrix ``S`` of shape ``(sketch_size, infinity)``
whose column ``i`` is a pure function of ``(seed, i)``. Streaming rows
``a_i`` (global position ``i``) accumulate ``S·A = sum_i S[:, i] a_i^T``, so

- ``extend`` in any chunking gives the same state (to rounding), and
- workers that sketch disjoint shards with the same seed, each passing the
  global position of its first row as ``start_index``, merge by addition into
  exactly the sketch of the concatenated stream.

The same ``S`` restricted to its first ``n_features`` columns is also a
feature map (``transform(X) = X S[:, :n_features]^T``), which is what
linear-attention style updaters use.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from .._random import SeedLike, seed_to_key
from .._validation import (
    as_float_matrix,
    check_dtype_arg,
    check_finite,
    check_index,
    check_int,
    resolve_start,
)
from ..base import FeatureMap, Sketch


class LinearRowSketch(Sketch, FeatureMap):
    """Base of CountSketch, GaussianSketch and SRHT: state ``S·A``.

    Parameters
    ----------
    n_features : int
        Width ``d`` of every row.
    sketch_size : int
        Rows ``m`` of ``S`` (and of :meth:`result`).
    dtype : {numpy.float64, numpy.float32}
        Dtype of the state; inputs are converted to it.
    seed : int, numpy.random.Generator or None
        Determines ``S``. Sketches merge only when built with the same seed.
    """

    def __init__(
        self,
        n_features: int,
        sketch_size: int,
        *,
        dtype: Any = np.float64,
        seed: SeedLike = None,
    ) -> None:
        self.n_features = check_int(n_features, "n_features", minimum=1)
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1)
        self.dtype = check_dtype_arg(dtype)
        self._key = seed_to_key(seed)
        self._SA: np.ndarray = np.zeros((self.sketch_size, self.n_features), dtype=self.dtype)
        self._n_seen = 0
        self._next_index = 0

    # -- the one thing a subclass provides ---------------------------------
    @abc.abstractmethod
    def _apply(self, X: np.ndarray, start: int) -> np.ndarray:
        """Return ``S[:, start:start+n] @ X`` as a new ``(sketch_size, X.shape[1])`` array.

        ``X`` is C-contiguous, of the sketch's dtype, and may hold NaN/Inf
        (callers check the result).
        """

    # -- protocol -----------------------------------------------------------
    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        return int(params["sketch_size"]) * int(params["n_features"]) * 8

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "sketch_size": self.sketch_size,
            "dtype": self.dtype.name,
            "seed_key": self._key,
        }

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"SA": self._SA}

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen, "next_index": self._next_index}

    @property
    def n_components(self) -> int:
        return self.sketch_size

    @property
    def next_index(self) -> int:
        """Global position that ``extend`` uses when ``start_index`` is omitted."""
        return self._next_index

    def extend(self, X: Any, start_index: int | None = None) -> LinearRowSketch:
        """Add rows ``X`` (shape ``(k, n_features)``) at global positions ``start_index + j``.

        Parameters
        ----------
        X : array_like, shape (k, n_features)
            float32/float64 (kept) or integer (converted) rows, all finite.
        start_index : int, optional
            Global stream position of ``X[0]``. Defaults to the position right
            after the last row this sketch consumed (0 for a new sketch). Give
            it explicitly when several workers sketch shards of one stream:
            the shards then merge into the sketch of the whole stream. Each
            position should be consumed once across all merged sketches.
            Afterwards :attr:`next_index` is ``start_index + k`` (also for
            ``k = 0``, which just moves the position).

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            Bad shape, dtype, NaN/Inf (or a sum that overflows), bad
            ``start_index``. The state is unchanged.
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype, finite=False)
        start = resolve_start(start_index, self._next_index, X.shape[0])
        if X.shape[0]:
            self._accumulate(X, start)
        self._n_seen += X.shape[0]
        self._next_index = start + X.shape[0]
        return self

    def update(self, x: Any, start_index: int | None = None) -> LinearRowSketch:
        """Add one row ``x`` of shape ``(n_features,)``; see :meth:`extend`."""
        super().update(x, start_index=start_index)
        return self

    def _accumulate(self, X: np.ndarray, start: int) -> None:
        # NaN/Inf anywhere in X make the (fresh) contribution non-finite, so
        # checking the small (m, d) result validates X without a second pass
        # over it, and an overflowing sum is caught too. Only then is the
        # state touched.
        delta = self._apply(X, start)
        if not np.isfinite(delta).all():
            check_finite(X, "X")
            raise ValueError("X is too large: its sketch overflows the dtype")
        with np.errstate(over="ignore", invalid="ignore"):
            delta += self._SA  # reuse the fresh buffer for the new state
        if not np.isfinite(delta).all():
            raise ValueError("X is too large: the sketch's state would overflow the dtype")
        self._SA = delta

    def _merge_state(self, other: LinearRowSketch) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            total = self._SA + other._SA
        if not np.isfinite(total).all():
            raise ValueError("other cannot be merged: the sum overflows the dtype")
        self._SA = total
        self._n_seen += other._n_seen
        self._next_index = max(self._next_index, other._next_index)

    # -- results ------------------------------------------------------------
    def result(self) -> np.ndarray:
        """``S·A`` of all rows seen, shape ``(sketch_size, n_features)`` (a copy)."""
        out: np.ndarray = self._SA.copy()
        return out

    def sketch_matrix(self, n_rows: int, start_index: int = 0) -> np.ndarray:
        """The explicit ``S[:, start_index : start_index + n_rows]`` (for tests and teaching).

        Cost: O(sketch_size * n_rows) memory.
        """
        n_rows = check_int(n_rows, "n_rows", minimum=0)
        start = resolve_start(check_index(start_index, "start_index"), 0, n_rows)
        out = np.empty((self.sketch_size, n_rows), dtype=self.dtype)
        eye = np.eye(min(n_rows, 1024), dtype=self.dtype)  # columns in blocks: O(m n) memory
        for lo in range(0, n_rows, 1024):
            k = min(1024, n_rows - lo)
            out[:, lo : lo + k] = self._apply(np.ascontiguousarray(eye[:k, :k]), start + lo)
        return out

    def transform(self, X: Any) -> np.ndarray:
        """Feature map ``X S[:, :n_features]^T``: shape ``(n, n_features) -> (n, sketch_size)``.

        Raises ``ValueError`` when the features overflow the dtype (never
        returns Inf).
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        return _finite_features(self._apply(np.ascontiguousarray(X.T), 0).T)


def _finite_features(out: np.ndarray) -> np.ndarray:
    """``out`` as a C-contiguous array, refusing the Inf of an overflowing feature map."""
    if not np.isfinite(out).all():
        raise ValueError("X is too large: its features overflow the dtype")
    return np.ascontiguousarray(out)
