"""Statistical leverage scores: exact, ridge, and fast sketched estimates.

For ``A`` of shape ``(n, d)`` and ``ridge = lambda >= 0`` the (ridge) leverage
score of row ``i`` is

.. math:: \\tau_i = a_i^T (A^T A + \\lambda I)^{+} a_i ,

the ``i``-th diagonal entry of the projection onto the column space of ``A``
(``lambda = 0``) or of the "hat" matrix ``A (A^T A + lambda I)^{-1} A^T``
(``lambda > 0``). Scores lie in ``[0, 1]``; they sum to ``rank(A)`` for
``lambda = 0`` and to ``sum_j sigma_j^2 / (sigma_j^2 + lambda)`` (the
statistical dimension) otherwise.

The sketched estimator follows Drineas, Magdon-Ismail, Mahoney & Woodruff,
"Fast approximation of matrix coherence and statistical leverage", JMLR 13
(2012): a subspace embedding ``S`` gives ``R`` with ``R^T R ~ A^T A``, and the
row norms of ``A R^{-1}`` (optionally through a Gaussian JL map) estimate the
scores without factorising ``A`` itself.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from .._random import SeedKey, SeedLike, derive_key, key_generator, seed_to_key
from .._validation import as_float_matrix, check_finite, check_float, check_int
from ..linear.countsketch import countsketch

__all__ = ["leverage_scores"]

_METHODS = ("exact", "sketch")

# Failure probability budget of the default JL map over all n rows (union bound).
_JL_DELTA = 0.01
# Chernoff exponents of chi^2_k / k leaving [0.7, 1.25]: P <= exp(-k * rate).
# The upper tail is the binding one, so it sets the default jl_dim.
_JL_RATE_UP = 0.5 * (0.25 - math.log1p(0.25))
_JL_RATE_LOW = 0.5 * (-0.3 - math.log1p(-0.3))

# Rows per block of the final (rows x d) @ (d x k) product: about 2 MiB of
# float64 output per block keeps the product in cache and the workspace O(d).
_BLOCK_BYTES = 1 << 21


def _default_sketch_size(d: int) -> int:
    """CountSketch rows used when ``sketch_size`` is None: ``max(2 d^2, 2000)``.

    ``d^2`` is the birthday bound of CountSketch: with ``m >> h^2`` buckets the
    ``h`` rows of large leverage land in distinct buckets, which is what the
    subspace-embedding guarantee needs on coherent matrices. The floor keeps
    ``m / d >= 60`` for small ``d``, where the distortion of an incoherent
    column space is about ``sqrt(d / m)``.
    """
    return max(2 * d * d, 2000)


def _default_jl_dim(n: int) -> int:
    """Smallest JL width ``k`` that keeps all ``n`` estimates in ``[0.7, 1.25]``.

    A row's JL estimate is ``||x||^2 * chi^2_k / k``; the Chernoff bounds
    ``P(chi^2_k / k >= 1.25) <= exp(-0.0134 k)`` and
    ``P(chi^2_k / k <= 0.7) <= exp(-0.0284 k)`` and a union bound over ``n``
    rows give failure probability ``<= 0.01``. This is ``k ~ 75 ln(200 n)``
    (about 1300 for ``n = 2e5``), so the projection only pays off for wide
    matrices; below that width it is skipped (see :func:`leverage_scores`).
    """
    n = max(n, 1)
    return math.ceil(math.log(2.0 * n / _JL_DELTA) / min(_JL_RATE_UP, _JL_RATE_LOW))


def _rank_tol(s: np.ndarray, shape: tuple[int, int]) -> float:
    # numpy.linalg.matrix_rank's default: singular values below this are
    # indistinguishable from the rounding error of a backward-stable
    # factorisation of a matrix of this shape.
    smax = float(s.max(initial=0.0))
    tol: float = smax * max(shape) * np.finfo(np.float64).eps
    return tol


def _check_factor(R: np.ndarray) -> None:
    # A finite A whose column norms overflow gives an infinite R; the rank
    # rule would then silently call every direction negligible.
    if not np.isfinite(R).all():
        raise ValueError("A is too large: its factorisation overflows float64")


def _row_sq_norms(X: np.ndarray) -> np.ndarray:
    sq: np.ndarray = np.einsum("ij,ij->i", X, X)
    return sq


def _row_sq_norms_of_product(A: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``||A[i] @ T||^2`` for every row, in float64, one block of rows at a time."""
    n = A.shape[0]
    out = np.empty(n, dtype=np.float64)
    rows = max(64, _BLOCK_BYTES // (8 * max(T.shape[1], A.shape[1], 1)))
    for lo in range(0, n, rows):
        block = A[lo : lo + rows]
        if block.dtype != np.float64:
            block = block.astype(np.float64)
        P = block @ T
        out[lo : lo + rows] = _row_sq_norms(P)
    return out


def _exact_scores(A: np.ndarray, ridge: float) -> np.ndarray:
    n, d = A.shape
    if ridge == 0.0:
        # Householder QR is backward stable, so the singular values of R are
        # those of A up to eps * ||A||: an SVD of the small R reveals the
        # numerical rank without an SVD of A. A = (Q U) S V^T, so the rows of
        # Q U_r span the column space and their squared norms are the scores.
        Q, R = np.linalg.qr(A, mode="reduced")
        _check_factor(R)
        U, s, _ = np.linalg.svd(R, full_matrices=False)
        r = int(np.count_nonzero(s > _rank_tol(s, (n, d))))
        if r < Q.shape[1]:
            Q = Q @ U[:, :r]
        return _row_sq_norms(Q)
    # QR of [A; sqrt(ridge) I]: R^T R = A^T A + ridge I and the top n rows of
    # Q are A R^{-1}, so the scores are their squared norms. Unlike a
    # Cholesky of the Gram matrix this never forms A^T A: its accuracy
    # depends on cond([A; sqrt(ridge) I]), the square root of cond(A^T A +
    # ridge I), and it cannot break down when ridge < eps * ||A||^2 makes the
    # rounded Gram matrix indefinite.
    stacked = np.empty((n + d, d), dtype=np.float64)
    stacked[:n] = A
    stacked[n:] = 0.0
    stacked[np.arange(n, n + d), np.arange(d)] = math.sqrt(ridge)
    Q, R = np.linalg.qr(stacked, mode="reduced")
    _check_factor(R)
    return _row_sq_norms(Q[:n])


def _sketched_scores(
    A: np.ndarray, ridge: float, sketch_size: int, jl_dim: int | None, key: int
) -> np.ndarray:
    n, d = A.shape
    try:
        SA = countsketch(A, sketch_size, seed=SeedKey(derive_key(key, 0)))
    except ValueError:
        # NaN/Inf in A always reach the (checked) sketch, so A is validated
        # without a separate pass over it; name the culprit only on failure.
        check_finite(A, "A")
        raise ValueError("A is too large: its sketch overflows the dtype") from None
    SA = SA.astype(np.float64, copy=False)
    if ridge > 0.0:
        # The ridge part of [A; sqrt(ridge) I] is already small: keep it exact.
        SA = np.vstack([SA, math.sqrt(ridge) * np.eye(d)])
    # numpy's stubs give every mode the (Q, R) result; mode="r" returns R alone.
    R = cast(np.ndarray, np.linalg.qr(SA, mode="r"))
    _check_factor(R)
    # (SA)^T SA = V S^2 V^T, so a^T ((SA)^T SA)^+ a = ||a^T V_r S_r^{-1}||^2;
    # the SVD of the small R also handles rank-deficient A (the pseudo-inverse
    # on the numerical column space) at O(d^3).
    _, s, Vt = np.linalg.svd(R, full_matrices=False)
    r = int(np.count_nonzero(s > _rank_tol(s, SA.shape)))
    T = Vt[:r].T / s[:r]
    k = _default_jl_dim(n) if jl_dim is None else jl_dim
    if k < r:
        # G acts in the original coordinates through (A^T S^T S A)^{+1/2} =
        # V_r S_r^{-1} V_r^T, not through V_r S_r^{-1}: the SVD's arbitrary
        # column signs (which change with BLAS threading) then cannot change
        # the estimates. V_r^T G is again Gaussian, so the law is the same.
        G = key_generator(derive_key(key, 1)).standard_normal((d, k))
        T = T @ (Vt[:r] @ (G / math.sqrt(k)))
    scores = _row_sq_norms_of_product(A, T)
    # True scores never exceed 1; clipping only moves an estimate closer to
    # the truth (it absorbs the over-estimates of heavy rows that share a
    # bucket).
    np.minimum(scores, 1.0, out=scores)
    return scores


def leverage_scores(
    A: Any,
    ridge: float = 0.0,
    method: str = "exact",
    sketch_size: int | None = None,
    jl_dim: int | None = None,
    seed: SeedLike = None,
) -> np.ndarray:
    """Leverage scores ``tau_i = a_i^T (A^T A + ridge I)^+ a_i`` of the rows of ``A``.

    Parameters
    ----------
    A : array_like, shape (n, d)
        float32/float64 or integer rows, all finite. Not modified.
    ridge : float, default 0.0
        ``lambda >= 0``. With ``0`` the scores are those of the numerical
        column space of ``A`` (rank-deficient ``A`` included: singular values
        below ``sigma_max * max(n, d) * eps`` count as zero, numpy's
        ``matrix_rank`` rule).
    method : {"exact", "sketch"}, default "exact"
        ``"exact"``: a dense QR of ``A``. ``"sketch"``: the randomised
        estimator of Drineas, Magdon-Ismail, Mahoney & Woodruff (2012).
    sketch_size : int, optional
        Rows ``m`` of the CountSketch (``method="sketch"`` only; at least
        ``d``). Default ``max(2 d^2, 2000)``. If ``m >= n`` the sketch would
        not be smaller than ``A`` and the exact scores are returned.
    jl_dim : int, optional
        Columns ``k`` of the Gaussian JL map (``method="sketch"`` only).
        Default: the smallest ``k`` that keeps all ``n`` JL factors in
        ``[0.7, 1.25]`` with probability 0.99, ``ceil(ln(200 n) / 0.0134)``
        (about 1300 at ``n = 2e5``). Whenever ``k >= r`` (the numerical rank,
        at most ``d``) no JL map is used: the exact row norms of
        ``A R^{-1}`` then cost ``O(n d r) <= O(n d k)`` and add no error.
    seed : int, numpy.random.Generator or None
        Fixes the CountSketch hashes and the JL map (``method="sketch"``):
        the same seed gives bit-identical scores. A Generator is advanced by
        one draw; ``None`` draws fresh entropy.

    Returns
    -------
    numpy.ndarray, shape (n,), float64
        The scores, in ``[0, 1]`` up to rounding (sketched ones are clipped
        to ``<= 1``).

    Raises
    ------
    TypeError
        ``A`` of a non-numeric / bool / complex dtype or a foreign tensor;
        ``method`` not a string; non-integer sizes; bad ``seed`` type.
    ValueError
        ``A`` not 2-D or holding NaN/Inf; ``ridge < 0`` or not finite;
        unknown ``method``; ``sketch_size < d`` (below ``n``) or
        ``jl_dim < 1``; ``sketch_size``/``jl_dim`` given with
        ``method="exact"``; a matrix so large its factorisation overflows.

    Notes
    -----
    **Exact** (``ridge = 0``): reduced Householder QR ``A = QR`` and an SVD of
    the small ``R``; the scores are the squared row norms of ``Q`` (of
    ``Q U_r`` when ``A`` is rank-deficient). **Exact ridge**: QR of the
    stacked ``[A; sqrt(ridge) I]``, scores are the squared row norms of the
    top ``n`` rows of its ``Q``. This is preferred to a Cholesky of
    ``A^T A + ridge I``: it never squares the condition number and cannot
    fail when ``ridge`` is below ``eps * ||A||^2``. Time ``O(n d^2)``,
    workspace ``O(n d)`` (the factor ``Q``).

    **Sketch**: ``SA`` with a CountSketch of ``m`` rows (``O(nnz(A))``),
    ``[SA; sqrt(ridge) I]`` when ``ridge > 0``, ``R`` from its QR and an SVD
    of ``R = U S V^T`` (``O(m d^2 + d^3)``), then ``||a_i^T V_r S_r^{-1} V_r^T G||^2``
    with ``G`` the ``d x k`` Gaussian JL map scaled by ``1 / sqrt(k)`` (or
    ``||a_i^T V_r S_r^{-1}||^2``, no map, see ``jl_dim``), computed block by
    block (``O(n d min(k, r))``). Workspace
    ``O(m d + d^2 + b d)`` besides the output, for blocks of ``b`` rows
    (about 2 MiB); ``A`` itself is not copied once it is a C-contiguous float
    array. A float32 ``A`` is sketched in float32 and multiplied in float64.

    Guarantee: if ``S`` is a ``(1 +- eps)`` subspace embedding of the column
    space of ``[A; sqrt(ridge) I]``, every estimate before the JL map lies in
    ``[tau_i / (1 + eps)^2, tau_i / (1 - eps)^2]``, and the JL map multiplies
    each by a factor distributed as ``chi^2_k / k`` (one ``G`` serves all
    rows, so the factors are not independent; the union bound needs no
    independence) (in ``[0.7, 1.25]`` for all
    rows with probability 0.99 at the default ``k``). CountSketch is such an
    embedding with probability ``1 - delta`` for ``m = O(d^2 / (eps^2
    delta))`` (Clarkson & Woodruff 2013; Nelson & Nguyen 2013); the default
    ``m = 2 d^2`` keeps every score within a factor ``1 +- 0.5`` of the
    exact one on Gaussian and coherent (few very heavy rows) matrices in the
    tests and the benchmark, where the distortion is well below the bound.
    Adversarial matrices with about ``d`` rows of leverage near 1 need
    ``m >> d^2`` (heavy rows must not share buckets).

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.rows.leverage import leverage_scores
    >>> A = np.random.default_rng(0).standard_normal((20000, 16))
    >>> tau = leverage_scores(A)
    >>> round(float(tau.sum()), 6)
    16.0
    >>> est = leverage_scores(A, method="sketch", seed=0)
    >>> bool(np.all((est > 0.5 * tau) & (est < 1.5 * tau)))
    True
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    ridge = check_float(ridge, "ridge", minimum=0.0)
    if method == "exact":
        for name, value in (("sketch_size", sketch_size), ("jl_dim", jl_dim)):
            if value is not None:
                raise ValueError(f"{name} applies only to method='sketch'")
        A = as_float_matrix(A, "A", dtype=np.float64)
    else:
        # The sketch reads A once and detects NaN/Inf in its (small) result.
        A = as_float_matrix(A, "A", finite=False)
        if sketch_size is not None:
            sketch_size = check_int(sketch_size, "sketch_size", minimum=1)
        if jl_dim is not None:
            jl_dim = check_int(jl_dim, "jl_dim", minimum=1)
    n, d = A.shape
    if method == "sketch":
        m = _default_sketch_size(d) if sketch_size is None else sketch_size
        if m < min(d, n):
            raise ValueError(
                f"sketch_size must be >= n_features = {d} (a smaller sketch cannot "
                f"embed the column space), got {m}"
            )
        # Last check: a Generator seed is advanced only by a call that runs.
        key = seed_to_key(seed)
        if m >= n:
            check_finite(A, "A")
            A = A.astype(np.float64, copy=False)
            method = "exact"
    if n == 0 or d == 0:
        return np.zeros(n, dtype=np.float64)
    if method == "exact":
        scores = _exact_scores(A, ridge)
    else:
        scores = _sketched_scores(A, ridge, m, jl_dim, key)
    if not np.isfinite(scores).all():
        raise ValueError("A is too large: its factorisation overflows float64")
    return scores
