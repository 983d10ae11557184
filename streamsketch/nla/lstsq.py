"""Sketched overdetermined least squares: sketch-and-solve and sketch-and-precondition.

For ``A`` of shape ``(n, d)`` with ``n >= d`` and ``b`` of length ``n`` both
methods start from one sketch ``S`` (``m x n``, ``m >= d``) of ``[A, b]``, a
Householder QR ``[SA, Sb] = Q [[R, z], [0, rho]]`` and an SVD
``R = U Σ V^T``, which reveals the numerical rank ``r`` of ``SA``:

- *sketch-and-solve* returns ``x_s = N U_r^T z`` with ``N = V_r Σ_r^{-1}``,
  the least-squares solution of the small problem ``min ||SAx - Sb||``;
- *sketch-and-precondition* (Blendenpik, Avron, Maymounkov & Toledo 2010;
  LSRN, Meng, Saunders & Mahoney 2014) runs LSQR (Paige & Saunders 1982) on
  ``min_y ||A N y - b||``, warm-started at ``y_0 = U_r^T z`` (so ``N y_0 = x_s``),
  and returns ``x = N y``. When ``S`` embeds the column space of ``A`` with
  distortion ``ε`` (``(1-ε)||Ax|| <= ||SAx|| <= (1+ε)||Ax||``), every singular
  value of ``A N`` lies in ``[1/(1+ε), 1/(1-ε)]``, so LSQR contracts the error
  by a factor about ``ε`` per iteration whatever the conditioning of ``A``.
  ``N`` spans the row space of ``SA``, which is that of ``A`` when ``S``
  preserves the rank, so for rank-deficient ``A`` the result is the
  minimum-norm solution, like ``numpy.linalg.lstsq`` (the LSRN argument).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .._random import SeedLike, seed_to_key
from .._validation import as_float_matrix, as_float_vector, check_bool, check_float, check_int
from ..rows.leverage import _check_factor, _rank_tol
from ._blocks import RowSource, check_sketch, sketch_columns

__all__ = ["LstsqInfo", "lstsq"]

_METHODS = ("sketch-precondition", "sketch-and-solve")

# LSQR's own guard against a preconditioned operator that is far from
# orthonormal (a sketch that failed to embed): it stops with istop = 3.
_CONLIM = 1e8
# Cap on the entries of a default CountSketch/SRHT sketch (128 MiB of float64).
_MAX_SKETCH_ENTRIES = 1 << 24


@dataclass(frozen=True)
class LstsqInfo:
    """What :func:`lstsq` did (``return_info=True``).

    Attributes
    ----------
    method, sketch : str
        The method and the sketch used.
    sketch_size : int
        Rows ``m`` of the sketch.
    rank : int
        Numerical rank of ``SA`` (the width of the preconditioner).
    iterations : int
        LSQR iterations (0 for sketch-and-solve).
    converged : bool
        LSQR met ``tol`` (always ``True`` for sketch-and-solve).
    stop_reason : int
        LSQR's ``istop`` (1, 2, 4, 5: converged; 3: the condition estimate
        exceeded 1e8; 7: ``maxiter`` reached); 0 for sketch-and-solve or a
        zero solution.
    residual_norm : float
        ``||A x - b||``, computed exactly after the solve (one extra pass).
    sketch_residual_norm : float
        ``||S(A x_s - b)||`` of the sketch-and-solve solution ``x_s``.
    time_sketch, time_factor, time_solve : float
        Wall-clock seconds of each phase (sketch; QR and SVD; LSQR).
    """

    method: str
    sketch: str
    sketch_size: int
    rank: int
    iterations: int
    converged: bool
    stop_reason: int
    residual_norm: float
    sketch_residual_norm: float
    time_sketch: float
    time_factor: float
    time_solve: float

    @property
    def time_total(self) -> float:
        """Seconds of the three phases together."""
        return self.time_sketch + self.time_factor + self.time_solve


def default_sketch_size(d: int, sketch: str) -> int:
    """Sketch rows used when ``sketch_size`` is None.

    ``γ d`` with ``γ = 20`` for CountSketch, 10 for SRHT and 4 for the
    Gaussian sketch (the Blendenpik choice), but CountSketch and SRHT are
    held to ``2**24`` entries (128 MiB) when that is more than ``4 d`` rows;
    at least ``d + 50``. A distortion ``ε ~ sqrt(d/m)`` makes LSQR contract by
    about ``ε`` per iteration, and CountSketch and SRHT cost one pass over
    ``A`` whatever ``m``, so their extra rows are cheap; a Gaussian sketch
    costs ``O(m n d)``, so it stays small.
    """
    if sketch == "gaussian":
        m = 4 * d
    else:
        gamma = 20 if sketch == "countsketch" else 10
        m = max(4 * d, min(gamma * d, _MAX_SKETCH_ENTRIES // d))
    return max(d + 50, m)


def lstsq(
    A: Any,
    b: Any,
    *,
    method: str = "sketch-precondition",
    sketch: str = "countsketch",
    sketch_size: int | None = None,
    tol: float = 1e-10,
    maxiter: int | None = None,
    seed: SeedLike = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, LstsqInfo]:
    """Solve ``min_x ||A x - b||_2`` for a tall ``A`` through a random sketch.

    Parameters
    ----------
    A : array_like or scipy.sparse matrix, shape (n, d)
        ``n >= d``. float32/float64/integer, finite; computed in float64
        (a dense float64 C-contiguous array or a CSR float64 matrix is not
        copied).
    b : array_like, shape (n,)
        Right-hand side, finite.
    method : {"sketch-precondition", "sketch-and-solve"}
        ``"sketch-precondition"`` (default): LSQR on the sketch-preconditioned
        problem to ``tol``; the answer is the least-squares solution to
        LSQR's accuracy, whatever the sketch. ``"sketch-and-solve"``: the
        solution of the sketched problem, within a factor ``1 + O(ε)`` of the
        optimal residual (see Notes); one pass over ``A`` and no iterations.
    sketch : {"countsketch", "srht", "gaussian"}
        The oblivious sketch ``S`` (:class:`~streamsketch.CountSketch`,
        :class:`~streamsketch.SRHT`, :class:`~streamsketch.GaussianSketch`).
    sketch_size : int, optional
        Rows ``m >= d`` of ``S``; default :func:`default_sketch_size`
        (``20 d`` for CountSketch, ``10 d`` for SRHT, ``4 d`` for Gaussian,
        at least ``d + 50``; CountSketch and SRHT held to 128 MiB when
        that exceeds ``4 d`` rows).
    tol : float
        LSQR's ``atol`` and ``btol``, in ``(0, 1)``: it stops when
        ``||(AN)^T r|| <= tol ||AN|| ||r||`` (a least-squares solution to
        relative accuracy ``tol``) or ``||r|| <= tol (||b|| + ||AN|| ||y||)``
        (a consistent system). Ignored by sketch-and-solve.
    maxiter : int, optional
        LSQR iteration limit (default 1000; a working sketch needs a few
        tens). If LSQR stops before ``tol`` a ``RuntimeWarning`` is issued.
    seed : int, numpy.random.Generator or None
        Determines ``S``; equal seeds give bit-identical results (for a given
        thread count of the BLAS).
    return_info : bool
        Also return an :class:`LstsqInfo`.

    Returns
    -------
    x : numpy.ndarray, shape (d,), float64
    info : LstsqInfo
        Only with ``return_info=True``.

    Raises
    ------
    TypeError
        Non-numeric input, bad argument types.
    ValueError
        Wrong shapes, NaN/Inf, ``n < d``, ``sketch_size < d``, bad names or
        tolerances; the matrix too large for float64.

    Notes
    -----
    Guarantees. Let ``x*`` be the (minimum-norm) least-squares solution and
    ``r* = b - A x*``.

    - Sketch-and-precondition: if ``S`` is an ``ε``-subspace embedding of the
      column space of ``A`` (``ε < 1``; it suffices that ``S`` keeps the rank
      of ``A``), ``κ(AN) <= (1+ε)/(1-ε)`` and LSQR needs about
      ``log(1/tol) / log(1/ε)`` iterations; the result meets LSQR's stopping
      rules above. If ``S`` fails to embed, the result is still correct
      whenever LSQR converges, only slower.
    - Sketch-and-solve: if ``S`` is an ``ε``-subspace embedding of the
      ``(d+1)``-dimensional span of ``[A, b]``,
      ``||A x_s - b|| <= (1+ε)/(1-ε) ||r*||``. For the Gaussian sketch the
      expectation is exact: ``E ||A x_s - b||^2 = (1 + d/(m-d-1)) ||r*||^2``
      (``m > d + 1``), so ``m = d/ε + d + 1`` gives ``1 + ε`` on average.
      Embedding sizes (probability ``1 - δ``): Gaussian
      ``m = O((d + log(1/δ))/ε^2)``; SRHT ``m = O((d + log(n/δ)) log(d/δ)/ε^2)``;
      CountSketch ``m = O(d^2/(δ ε^2))`` (in practice ``m`` of a few ``d``
      suffices for matrices without a few dominant rows).

    Cost, for ``m`` sketch rows and ``nnz`` stored entries of ``A``
    (``nnz = n d`` when dense): the sketch costs ``O(nnz)`` (CountSketch),
    ``O(n d log m)`` (SRHT) or ``O(m n d)`` (Gaussian), one pass over ``A``;
    the factorisations ``O(m d^2 + d^3)``; each LSQR iteration two passes
    (``A v`` and ``A^T u``), ``O(nnz + d^2)``. Memory: ``O(m d + d^2)`` plus
    LSQR's ``O(n + d)`` vectors; ``A`` is not copied when it is already
    float64 (C-contiguous dense or CSR).

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.nla import lstsq
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((5000, 20)); b = rng.standard_normal(5000)
    >>> x = lstsq(A, b, seed=0)
    >>> bool(np.allclose(x, np.linalg.lstsq(A, b, rcond=None)[0]))
    True
    """
    src = RowSource(A, "A", streams=False)
    n, d = src.n_rows, src.n_features
    assert n is not None and d is not None
    if n < d:
        raise ValueError(f"A must have at least as many rows as columns, got shape ({n}, {d})")
    if np.ndim(b) != 1:
        raise ValueError(
            f"b must be 1-D of shape ({n},), got shape {np.shape(b)}; "
            "solve for each column separately"
        )
    b = as_float_vector(b, "b", dtype=np.float64)
    if b.shape[0] != n:
        raise ValueError(f"b must have length {n} (the rows of A), got {b.shape[0]}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    kind = check_sketch(sketch)
    m = (
        default_sketch_size(d, kind)
        if sketch_size is None
        else check_int(sketch_size, "sketch_size", minimum=d)
    )
    tol = check_float(tol, "tol", minimum=0.0, strict_minimum=True, maximum=1.0)
    maxiter = 1000 if maxiter is None else check_int(maxiter, "maxiter", minimum=1)
    return_info = check_bool(return_info, "return_info")
    # Last: a Generator seed is advanced only by a call that runs.
    key = seed_to_key(seed)

    t0 = time.perf_counter()
    if not src.sparse:
        # Once here rather than at every LSQR product (no copy for float64).
        src.array = as_float_matrix(src.array, "A", dtype=np.float64, finite=False)
    SA, Sb = sketch_columns([src, RowSource(b[:, None], "b")], kind, m, key)
    t1 = time.perf_counter()
    Ra = scipy.linalg.qr(np.hstack([SA, Sb]), mode="r", check_finite=False)[0]
    R, z = Ra[:d, :d], Ra[:d, d]
    _check_factor(Ra)
    sketch_res = float(abs(Ra[d, d])) if Ra.shape[0] > d else 0.0
    U, s, Vt = scipy.linalg.svd(R, check_finite=False)
    r = int(np.count_nonzero(s > _rank_tol(s, (m, d))))
    N = Vt[:r].T / s[:r]
    y0 = U[:, :r].T @ z
    t2 = time.perf_counter()

    Ad = src.array
    if method == "sketch-and-solve" or r == 0:
        # r = 0: A is zero (to rounding), and so is the minimum-norm solution.
        x = N @ y0 if r else np.zeros(d)
        iters, istop, converged = 0, 0, True
    else:
        op = scipy.sparse.linalg.LinearOperator(
            (n, r),
            matvec=lambda y: Ad @ (N @ y),
            rmatvec=lambda u: N.T @ (Ad.T @ u),
            dtype=np.float64,
        )
        out = scipy.sparse.linalg.lsqr(
            op, b, atol=tol, btol=tol, conlim=_CONLIM, iter_lim=maxiter, x0=y0
        )
        y, istop, iters = out[0], int(out[1]), int(out[2])
        x = N @ y
        converged = istop in (0, 1, 2, 4, 5)
        if not converged:
            why = "reached maxiter" if istop == 7 else "hit its condition limit"
            warnings.warn(
                f"lstsq: LSQR {why} after {iters} iterations without reaching tol={tol:g}; "
                "a larger sketch_size helps",
                RuntimeWarning,
                stacklevel=2,
            )
    t3 = time.perf_counter()
    if not return_info:
        return x
    info = LstsqInfo(
        method=method,
        sketch=kind,
        sketch_size=m,
        rank=r,
        iterations=iters,
        converged=converged,
        stop_reason=istop,
        residual_norm=float(np.linalg.norm(Ad @ x - b)),
        sketch_residual_norm=sketch_res,
        time_sketch=t1 - t0,
        time_factor=t2 - t1,
        time_solve=t3 - t2,
    )
    return x, info
