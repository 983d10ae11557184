"""PolySketch: a non-negative random feature map for ``<x, y>^p`` with even ``p``.

Kacham, Mirrokni & Zhong (2023, *PolySketchFormer*) sketch the polynomial
kernel of degree ``q = p/2`` with a tree of Gaussian products, then take the
*tensor square* of that sketch ("self-tensoring"). Inner products of the
result are squares, hence never negative, which is what polynomial attention
needs for its normaliser.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._parallel import njit, run_chunks, split_rows
from .._random import SeedLike, derive_key, key_generator, seed_to_key
from .._validation import as_float_matrix, check_dtype_arg, check_int
from ..base import FeatureMap

__all__ = ["PolySketch"]

_ROWS_PER_THREAD = 256


@njit(nogil=True, cache=True)
def _self_tensor(  # pragma: no cover - compiled
    psi: np.ndarray, lo: int, hi: int, symmetric: bool, out: np.ndarray
) -> None:
    """Rows ``lo <= i < hi`` of ``psi(x) (x) psi(x)`` (full or packed upper triangle)."""
    r = psi.shape[1]
    root2 = np.sqrt(2.0)
    for i in range(lo, hi):
        a = psi[i]
        o = out[i]
        if symmetric:
            k = 0
            for u in range(r):
                o[k] = a[u] * a[u]
                k += 1
                s = root2 * a[u]
                for v in range(u + 1, r):
                    o[k] = s * a[v]
                    k += 1
        else:
            for u in range(r):
                au = a[u]
                base = u * r
                for v in range(r):
                    o[base + v] = au * a[v]


class _Node:
    """An internal node of the product tree: ``sqrt(1/r) (G1 left) * (G2 right)``.

    ``left``/``right`` are child nodes, or ``None`` for the input ``x``.
    """

    __slots__ = ("G1", "G2", "degree", "left", "right")

    def __init__(self, degree: int, left: _Node | None, right: _Node | None) -> None:
        self.degree = degree
        self.left = left
        self.right = right
        self.G1: np.ndarray
        self.G2: np.ndarray


class PolySketch(FeatureMap):
    """PolySketchFormer feature map: ``<phi(x), phi(y)> = <psi(x), psi(y)>^2 >= 0``.

    Parameters
    ----------
    n_features : int
        Input width ``d``.
    degree : int
        Even polynomial degree ``p >= 2``; the inner sketch ``psi`` has degree
        ``q = p / 2``.
    sketch_size : int
        Width ``r`` of the inner sketch ``psi``.
    symmetric : bool, default False
        Output the full tensor square (``r**2`` columns, entry ``u*r + v`` is
        ``psi_u psi_v``) when false; when true output only its upper triangle
        (``r (r + 1) / 2`` columns, row-major, off-diagonal entries scaled by
        ``sqrt(2)``), which has the same inner products at about half the width.
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the Gaussian matrices and the output; inputs are converted.
    seed : int, numpy.random.Generator or None
        Fixes the Gaussian matrices (node ``t`` of the tree in pre-order draws
        its two matrices from ``key_generator(derive_key(key, t, 0))`` and
        ``key_generator(derive_key(key, t, 1))``, in float64, then cast, so
        float32 and float64 maps with one seed share their matrices).

    Notes
    -----
    **The inner sketch.** ``psi_q`` is built recursively: for ``q >= 2``,

    ``psi_q(x) = sqrt(1/r) (G1 psi_ceil(q/2)(x)) * (G2 psi_floor(q/2)(x))``

    (elementwise product) with independent standard Gaussian ``G1, G2`` of
    ``r`` rows and ``psi_1(x) = x`` at the leaves; for ``q = 1`` (``p = 2``),
    ``psi_1(x) = G x / sqrt(r)``. Each node draws fresh matrices, so the two
    subtrees are independent and, by induction,
    ``E <psi(x), psi(y)> = <x, y>^ceil(q/2) <x, y>^floor(q/2) = <x, y>^q``:
    ``psi`` is **unbiased** for ``<x, y>^q``. For ``q = 2`` the variance is
    exactly ``((|x|^2 |y|^2 + 2 <x,y>^2)^2 - <x,y>^4) / r <= 9 |x|^4 |y|^4 / r``.
    The paper (building on Ahle et al. 2020) shows that
    ``r = O(q eps^-2 log(1/delta))`` gives
    ``|<psi(x), psi(y)> - <x, y>^q| <= eps |x|^q |y|^q`` with probability
    ``1 - delta``.

    **The outer map** ``phi(x) = psi(x) (x) psi(x)`` is **not unbiased** for
    ``<x, y>^p``: ``E <phi(x), phi(y)> = E <psi(x), psi(y)>^2 = <x, y>^p +
    Var <psi(x), psi(y)>`` (an upward bias that shrinks like ``1/r``). Its
    guarantee is deterministic given the inner one: if
    ``|<psi(x), psi(y)> - <x, y>^q| <= eps |x|^q |y|^q`` then, since
    ``(a + e)^2 - a^2 = 2 a e + e^2`` and ``|a| <= |x|^q |y|^q``,

    ``|<phi(x), phi(y)> - <x, y>^p| <= (2 eps + eps^2) |x|^p |y|^p``.

    In exact arithmetic ``<phi(x), phi(y)> >= 0`` for every pair (including
    ``<x, y> < 0``); computed in floating point it can dip below zero by
    rounding, at most about ``r^2 u |phi(x)| |phi(y)|`` for unit roundoff ``u``.

    **Cost.** The tree has ``q - 1`` internal nodes (one for ``q = 1``), each
    two GEMMs, so ``inner_transform`` of ``n`` rows costs
    ``O(n r (q d + q r))`` time and ``O(n r log q)`` temporary memory;
    ``transform`` adds ``O(n r^2)`` for the tensor square. Fixed workspace:
    the Gaussian matrices, ``nbytes = itemsize * r * sum of child widths``
    (``r d`` for ``q = 1``, ``2 r d`` for ``q = 2``, ``O(q r (r + d))``).

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.linear.polysketch import PolySketch
    >>> X = np.random.default_rng(0).standard_normal((5, 16))
    >>> ps = PolySketch(16, 4, 32, symmetric=True, seed=0)
    >>> Phi = ps.transform(X)
    >>> Phi.shape, bool((Phi @ Phi.T >= -1e-9).all())
    ((5, 528), True)
    """

    def __init__(
        self,
        n_features: int,
        degree: int,
        sketch_size: int,
        *,
        symmetric: bool = False,
        dtype: Any = np.float64,
        seed: SeedLike = None,
    ) -> None:
        self.n_features = check_int(n_features, "n_features", minimum=1)
        degree = check_int(degree, "degree", minimum=2, maximum=64)
        if degree % 2:
            raise ValueError(f"degree must be even (the map is a tensor square), got {degree}")
        self.degree = degree
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1, maximum=2**16)
        if not isinstance(symmetric, (bool, np.bool_)):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.symmetric = bool(symmetric)
        self.dtype = check_dtype_arg(dtype)
        self._key = seed_to_key(seed)
        self._counter = 0
        self._matrices: list[np.ndarray] = []
        q = self.degree // 2
        if q == 1:
            self._G = self._gaussian((self.sketch_size, self.n_features), 0)
            self._matrices.append(self._G)
            self._root: _Node | None = None
        else:
            self._root = self._build(q)

    # -- construction ---------------------------------------------------------
    def _gaussian(self, shape: tuple[int, int], which: int) -> np.ndarray:
        gen = key_generator(derive_key(self._key, self._counter, which))
        return gen.standard_normal(shape).astype(self.dtype)

    def _build(self, q: int) -> _Node | None:
        """Pre-order construction of the subtree for degree ``q`` (``None`` = input)."""
        if q == 1:
            return None
        r, d = self.sketch_size, self.n_features
        node = _Node(q, None, None)
        # A child of degree 1 is the input itself (width d), any other child
        # is a sketch (width r).
        node.G1 = self._gaussian((r, d if (q + 1) // 2 == 1 else r), 0)
        node.G2 = self._gaussian((r, d if q // 2 == 1 else r), 1)
        self._matrices += [node.G1, node.G2]
        self._counter += 1
        node.left = self._build((q + 1) // 2)
        node.right = self._build(q // 2)
        return node

    # -- protocol -------------------------------------------------------------
    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        r, d = int(params["sketch_size"]), int(params["n_features"])

        def count(q: int) -> int:  # entries of the matrices _build would draw
            if q <= 1:
                return 0
            w1 = d if (q + 1) // 2 == 1 else r
            w2 = d if q // 2 == 1 else r
            return r * (w1 + w2) + count((q + 1) // 2) + count(q // 2)

        q = int(params["degree"]) // 2
        return 8 * (r * d if q == 1 else count(min(q, 32)))

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "degree": self.degree,
            "sketch_size": self.sketch_size,
            "symmetric": self.symmetric,
            "dtype": self.dtype.name,
            "seed_key": self._key,
        }

    def _workspace_arrays(self) -> list[np.ndarray]:
        return list(self._matrices)

    @property
    def n_components(self) -> int:
        """Output width: ``r (r + 1) / 2`` if ``symmetric`` else ``r**2``."""
        r = self.sketch_size
        return r * (r + 1) // 2 if self.symmetric else r * r

    @property
    def inner_degree(self) -> int:
        """Degree ``q = degree / 2`` of the inner sketch ``psi``."""
        return self.degree // 2

    # -- maps -----------------------------------------------------------------
    def _psi(self, X: np.ndarray) -> np.ndarray:
        scale = self.dtype.type(1.0 / math.sqrt(self.sketch_size))
        if self._root is None:
            psi: np.ndarray = (X @ self._G.T) * scale
            return psi

        def evaluate(node: _Node | None) -> np.ndarray:
            if node is None:
                return X
            a: np.ndarray
            b: np.ndarray
            if node.left is None and node.right is None:
                # Both factors see x: one GEMM against the stacked matrices.
                both = X @ np.concatenate([node.G1, node.G2]).T
                a, b = both[:, : self.sketch_size], both[:, self.sketch_size :]
            else:
                a = evaluate(node.left) @ node.G1.T
                b = evaluate(node.right) @ node.G2.T
            a *= scale
            a *= b
            return a

        return np.ascontiguousarray(evaluate(self._root))

    def _checked_psi(self, X: Any) -> np.ndarray:
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            psi = self._psi(X)
        if not np.isfinite(psi).all():
            raise ValueError("X is too large: its sketch overflows the dtype")
        return psi

    def inner_transform(self, X: Any) -> np.ndarray:
        """The inner sketch ``psi``, unbiased for ``<x, y>^(degree/2)``.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
            Finite float32/float64 (converted to ``dtype``) or integer rows.

        Returns
        -------
        numpy.ndarray, shape (n, sketch_size), dtype ``dtype``
            ``psi(X)`` with ``E psi(x) . psi(y) = (x . y)^(degree/2)`` (signed).

        Raises
        ------
        ValueError, TypeError
            Wrong shape or dtype, NaN/Inf in ``X``, or an overflowing sketch.

        Notes
        -----
        Time ``O(n r (q d + q r))`` (GEMMs), temporary memory ``O(n r log q)``.
        """
        return self._checked_psi(X)

    def transform(self, X: Any) -> np.ndarray:
        """The non-negative map ``phi(x) = psi(x) (x) psi(x)``.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
            Finite float32/float64 (converted to ``dtype``) or integer rows.

        Returns
        -------
        numpy.ndarray, shape (n, n_components), dtype ``dtype``
            ``phi(X)``; ``phi(x) . phi(y) = (psi(x) . psi(y))^2 >= 0``.

        Raises
        ------
        ValueError, TypeError
            Wrong shape or dtype, NaN/Inf in ``X``, or an overflowing sketch.

        Notes
        -----
        Time ``O(n r (q d + q r + r))``; memory: the ``(n, n_components)``
        output plus ``O(n r log q)``.
        """
        psi = self._checked_psi(X)
        n = psi.shape[0]
        out = np.empty((n, self.n_components), dtype=self.dtype)
        if n == 0:
            return out
        peak = float(np.abs(psi).max())
        if peak > 0 and 2.0 * math.log(peak) + math.log(2.0) >= math.log(
            float(np.finfo(self.dtype).max)
        ):
            raise ValueError("X is too large: its sketch overflows the dtype")

        def part(lo: int, hi: int) -> None:
            _self_tensor(psi, lo, hi, self.symmetric, out)

        run_chunks(part, split_rows(n, _ROWS_PER_THREAD))
        return out
