r"""l_p Lewis weights and the l_p sensitivity bounds they give.

The l_p Lewis weights of ``A`` (n x d, rows ``a_i``) are the unique
``w >= 0`` with

.. math::  w_i = \bigl(a_i^\top (A^\top W^{1-2/p} A)^{+} a_i\bigr)^{p/2},
           \qquad \sum_i w_i = \operatorname{rank}(A)

(Lewis, 1978; Cohen & Peng, 2015). They are the leverage scores of the
reweighted matrix ``W^{1/2-1/p} A``, equal the ordinary leverage scores at
``p = 2``, and bound how much one row can contribute to ``||Ax||_p^p``:
see :func:`lp_sensitivity_bound`.

Everything is computed in an orthonormal basis ``U`` of the column space of
``A`` (the weights depend on ``A`` only through that subspace), with every row
split into a unit direction and a log norm. That is what makes the weights
exactly invariant under ``A -> cA``, handles rank deficiency, and keeps rows of
wildly different norms (1e-200 next to 1e200) free of overflow (accuracy for
such graded rows: see the rank rule in the Notes of :func:`lewis_weights`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg

from .._validation import as_float_matrix, as_float_vector, check_float, check_int

__all__ = ["lewis_weights", "lp_sensitivity_bound"]

_METHODS = ("auto", "fixed_point", "newton")
# The fixed-point map contracts by |1 - p/2| per step (0.25 at p = 2.5, 0.95
# at p = 3.9); from p = 2.5 on Newton's few, dearer steps finish first
# (measured on 50000 x 32 Gaussian and Cauchy matrices: Newton 1.0-1.7x faster
# at p = 2.5, 1.3-2.9x faster at p = 2.8-3.5).
_AUTO_NEWTON_FROM_P = 2.5
# A ridge term larger than this (a direction along which A is below
# sqrt(ridge) * 1e-150) is clipped: its contribution to any weight is
# below 1e-300 either way, and the clip keeps M finite.
_MAX_RIDGE_TERM = 1e300


def lewis_weights(
    A: Any,
    p: float,
    *,
    ridge: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    method: str = "auto",
) -> np.ndarray:
    r"""The l_p Lewis weights of the rows of ``A``.

    Parameters
    ----------
    A : array_like, shape (n, d)
        Rows ``a_i``; float32, float64 or integer, finite. Computation is in
        float64 whatever the input dtype.
    p : float
        The exponent, ``p > 0``.
    ridge : float, default 0
        ``lambda >= 0``. With ``lambda > 0`` the weights solve
        ``w_i = (a_i^T (A^T W^{1-2/p} A + lambda I)^{-1} a_i)^{p/2}`` and sum to
        less than ``rank(A)``; they are then not scale invariant.
    tol : float, default 1e-8
        Stop when the fixed-point residual
        ``max_i |log w_i - log phi_i(w)|`` is at most ``tol``, where
        ``phi_i(w) = (a_i^T (A^T W^{1-2/p} A + lambda I)^{+} a_i)^{p/2}``; i.e. the
        defining equation holds to relative accuracy ``tol`` for every row.
        Rounding limits what is reachable to about ``1e-12``.
    max_iter : int, optional
        Iteration cap; by default enough for the method's convergence rate
        (fixed point: ``ceil(log(tol / 64) / log|1 - p/2|) + 20``; Newton: 100).
        Not converging within it emits a :class:`RuntimeWarning` and returns
        the last iterate.
    method : {"auto", "fixed_point", "newton"}
        ``"fixed_point"`` (any ``p < 4``) is the Cohen–Peng iteration;
        ``"newton"`` (any ``p > 2``) is Newton's method on the convex
        formulation. ``"auto"`` uses the fixed point for ``p < 2.5`` and Newton
        from there on.

    Returns
    -------
    numpy.ndarray, shape (n,), float64
        The weights: ``0 <= w_i <= 1``, ``w_i = 0`` exactly for zero rows, and
        ``sum(w) = rank(A)`` (to rounding) when ``ridge = 0``.

    Raises
    ------
    ValueError, TypeError
        Bad ``A`` (not 2-D, NaN/Inf, non-numeric dtype), ``p <= 0`` or not
        finite, ``ridge < 0``, ``tol <= 0``, ``max_iter < 1``, unknown
        ``method``, or a method outside its range of ``p``.

    Notes
    -----
    **Reduction.** A thin SVD ``A = U S V^T`` (after an exact power-of-two
    rescaling of ``A``) gives an orthonormal basis ``U`` (n x r) of the column
    space, with ``r = rank(A)`` the number of singular values above
    ``max(n, d) * eps * s_max`` (NumPy's ``matrix_rank`` rule). Because
    ``a_i = V S u_i``, ``a_i^T (A^T W^a A + lambda I)^+ a_i =
    u_i^T (U^T W^a U + lambda S^{-2})^{-1} u_i`` for ``a = 1 - 2/p``, so the
    weights are computed from ``U`` and the diagonal ``lambda S^{-2}``.
    Zero rows have ``u_i = 0`` and weight 0 and are left out of the iteration
    (for ``p < 2`` the factor ``w_i^{1-2/p}`` would be ``0^{-}``). Rows of very
    different norms are fine as long as the directions they carry clear the
    rank rule: one row 1e10 times longer than the rest still leaves the other
    weights accurate to about 1e-11 (tested); a direction carried only by rows
    more than ``1 / (max(n, d) eps)`` (1.5e13 for n = 300) times shorter than
    the largest singular value counts as numerically absent, as in
    ``numpy.linalg.matrix_rank``.

    **Fixed point (Cohen & Peng 2015, §3).** ``w <- phi(w)`` starting from
    ``w = 1``. For multiplicative perturbations ``phi`` is a contraction with
    factor ``c = |1 - p/2|`` in the metric ``max_i |log(w_i / w'_i)|``
    (``W' within e^{±eps} W`` gives ``M' within e^{±|1-2/p| eps} M``, and the
    power ``p/2`` multiplies the exponent by ``p/2``), so for ``0 < p < 4`` it
    converges linearly from any start:
    ``dist(w_k, w*) <= c^k dist(w_0, w*)``, and a residual ``<= tol`` means
    ``dist(phi(w), w*) <= tol * c / (1 - c)``. The returned ``phi(w)`` has
    residual ``<= c * tol``. At ``p = 2`` one step is exact (``c = 0``).

    **Newton (p > 2): the ellipsoid program.** For ``p >= 2`` the function
    ``f(Q) = -log det Q + (2/p) sum_i (u_i^T Q u_i)^{p/2} + tr(lambda S^{-2} Q)``
    over symmetric ``Q > 0`` (r x r) is strictly convex (``-log det`` is, and
    ``t -> t^{p/2}`` is convex and non-decreasing) and coercive, so it has a
    unique minimiser, and ``grad f = 0`` reads
    ``Q^{-1} = sum_i tau_i^{p/2-1} u_i u_i^T + lambda S^{-2}`` with
    ``tau_i = u_i^T Q u_i``: exactly the Lewis equations for
    ``w_i = tau_i^{p/2}`` (then ``Q^{-1} = U^T W^{1-2/p} U + lambda S^{-2}``).
    This is the Lagrangian form of Lewis's characterisation (maximise
    ``det Q`` subject to ``sum_i (u_i^T Q u_i)^{p/2} <= r``; Lewis 1978, used
    by Cohen & Peng 2015 and, as the l_p generalisation of the John-ellipsoid
    program, by Fazel, Lee, Padmanabhan & Sidford 2022, "Computing Lewis
    weights to high precision", SODA). It has ``r(r+1)/2`` unknowns instead of
    ``n``, and every weight is read off ``Q`` directly, so rows of tiny weight
    are as accurate as the others. We run damped Newton: in coordinates
    whitened by ``Q = R R^T`` the Hessian is
    ``E -> E + (p/2 - 1) sum_i tau_i^{p/2-2} (u~_i^T E u~_i) u~_i u~_i^T``
    (``u~_i = R^T u_i``), at least the identity and at most ``p/2`` times it at
    the optimum; the Newton system is solved by conjugate gradients with
    Hessian products costing ``O(n r^2)`` (no ``n x n`` or ``r^2 x r^2``
    matrix is formed), forcing term ``min(0.1, ||gradient||)``; the step
    ``R <- R chol(I + t E)`` stays positive definite and ``t`` backtracks
    (Armijo). Convergence: on the compact initial sublevel set ``f`` is
    strongly convex with Lipschitz Hessian, so damped Newton with
    backtracking converges from any start and quadratically at the end
    (Boyd & Vandenberghe 2004, §9.5.3); CG from zero always returns a descent
    direction and the vanishing forcing term keeps the local rate superlinear
    (Dembo, Eisenstat & Steihaug 1982). Stopping is rigorous:
    ``|log w_i - log phi_i(w)| <= (p/2) max |log eig(R^T M(w) R)|`` for every
    row, and the iteration stops when that bound is ``<= tol``. Measured on
    20000 x 32 Gaussian, Cauchy and row-rescaled matrices, ``p`` from 3 to 12
    took 3–7 Newton steps and 9–44 Hessian products for ``tol = 1e-8``.

    **Cost.** Time ``O(n d^2)`` for the SVD plus ``O(n r^2)`` per fixed-point
    step (form ``M``, one ``(n, r) x (r, r)`` product), about
    ``log(1/tol) / log(1/|1 - p/2|)`` steps; a Newton step costs ``O(n r^2)``
    times (3 + twice the number of CG iterations) plus ``O(r^3)``. Workspace ``O(n d)``
    float64 (the basis ``U`` and one ``(n, r)`` work array).

    The sensitivity bound :func:`lp_sensitivity_bound` holds for the
    ``ridge = 0`` weights; with ``lambda > 0`` the same argument bounds
    ``|a_i x|^2`` by ``tau_i (sum_j w_j^{1-2/p} (a_j x)^2 + lambda ||x||^2)``.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.random.default_rng(0).standard_normal((500, 6))
    >>> w = lewis_weights(A, 1.0)
    >>> w.shape, round(float(w.sum()), 6)
    ((500,), 6.0)
    """
    X = as_float_matrix(A, "A")
    p = check_float(p, "p", minimum=0.0, strict_minimum=True)
    ridge = check_float(ridge, "ridge", minimum=0.0)
    tol = check_float(tol, "tol", minimum=0.0, strict_minimum=True)
    if max_iter is not None:
        max_iter = check_int(max_iter, "max_iter", minimum=1)
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "auto":
        method = "newton" if p >= _AUTO_NEWTON_FROM_P else "fixed_point"
    if method == "fixed_point" and p >= 4.0:
        raise ValueError(
            f"method='fixed_point' needs p < 4 (the map is a contraction only there), got p={p}"
        )
    if method == "newton" and p <= 2.0:
        raise ValueError(
            f"method='newton' needs p > 2 (the convex formulation needs 1 - 2/p > 0), got p={p}"
        )

    n = X.shape[0]
    out = np.zeros(n, dtype=np.float64)
    basis = _column_space(X.astype(np.float64, copy=False), ridge)
    if basis is None:
        return out
    rows, ubar, lnu, ridge_diag = basis
    if method == "fixed_point":
        lw = _fixed_point(ubar, lnu, ridge_diag, p, tol, max_iter)
    else:
        lw = _newton(ubar, lnu, ridge_diag, p, tol, max_iter)
    out[rows] = np.exp(lw)
    return out


def lp_sensitivity_bound(w: Any, p: float, d: int) -> np.ndarray:
    r"""Upper bounds on the l_p sensitivities from l_p Lewis weights.

    The sensitivity of row ``i`` for ``f(x) = |x|^p`` is
    ``s_i = sup_x |a_i . x|^p / ||A x||_p^p`` (over ``x`` with ``Ax != 0``).
    For the exact (``ridge = 0``) Lewis weights ``w`` of ``A``:

    - ``0 < p <= 2``: ``s_i <= w_i``;
    - ``p >= 2``: ``s_i <= d^{p/2 - 1} w_i`` with ``d >= sum(w) = rank(A)``;

    and always ``s_i <= 1``, so the returned bound is
    ``min(1, w_i)`` resp. ``min(1, d^{p/2-1} w_i)``. Summed, these give the
    classical total-sensitivity bounds ``d`` for ``p <= 2`` and ``d^{p/2}`` for
    ``p > 2``. At ``p = 2`` the bound is the leverage score and is attained.

    Parameters
    ----------
    w : array_like, shape (n,)
        Lewis weights for exponent ``p`` (from :func:`lewis_weights`), finite
        and ``>= 0``.
    p : float
        The exponent, ``p > 0``.
    d : int
        The dimension (``n_features``) or any upper bound on ``rank(A)``;
        ``>= 1``. Only used for ``p > 2``.

    Returns
    -------
    numpy.ndarray, shape (n,), float64
        ``s_i`` upper bounds in ``[0, 1]``. O(n) time and memory.

    Notes
    -----
    Proof (self-contained; the standard argument behind the total-sensitivity
    bounds ``d`` for ``p <= 2`` and ``d^{p/2}`` for ``p > 2`` quoted by Cohen &
    Peng 2015 and by Woodruff & Yasuda 2023, "Sharper bounds for l_p
    sensitivity sampling"). Let ``M = A^T W^{1-2/p} A`` (over the rows with
    ``w_j > 0``; zero rows have ``y_j = 0``), ``y = Ax`` and
    ``S = sum_j w_j^{1-2/p} y_j^2 = x^T M x``. Cauchy–Schwarz in the ``M``
    inner product and the Lewis equation ``a_i^T M^+ a_i = w_i^{2/p}`` give
    ``y_i^2 <= w_i^{2/p} S``.
    For ``p >= 2``, Hölder with exponents ``p/2`` and ``p/(p-2)`` gives
    ``S <= (sum w)^{1-2/p} ||y||_p^2``, so ``|y_i|^p <= d^{p/2-1} w_i ||y||_p^p``.
    For ``p < 2``, writing ``y_j^2 = |y_j|^p |y_j|^{2-p}`` and bounding
    ``|y_j|^{2-p} <= w_j^{(2-p)/p} S^{(2-p)/2}`` gives
    ``S <= ||y||_p^p S^{1-p/2}``, i.e. ``S^{p/2} <= ||y||_p^p``, so
    ``|y_i|^p <= w_i S^{p/2} <= w_i ||y||_p^p``.

    What this means for the commonly quoted forms: for ``p < 2`` the bound is
    ``w_i``, which is *tighter* than ``w_i^{p/2}`` (``w_i <= 1``), so
    ``w_i^{p/2}`` is valid but loose. In the other direction, for ``p < 2``
    sensitivities are at least ``d^{p/2-1} w_i`` (Chen & Derezinski 2021, as
    cited by Woodruff & Yasuda 2023). Checked numerically (tests): maximising
    ``|a_i.x|^p / ||Ax||_p^p`` over ``x`` by sampling plus Nelder–Mead on
    30 x 3 Gaussian, outlier and Cauchy matrices reached 0.66–0.83 of the
    bound at ``p = 1``, 0.82–0.97 at ``p = 1.5``, the bound itself at
    ``p = 2``, and 0.36–1.00 at ``p = 3`` and ``4`` (1.00 for outlier rows,
    where the bound is clipped at 1), never above it;
    without the ``d^{p/2-1}`` factor the ``p = 3, 4`` bound would be
    exceeded by up to 2.2x. Weights known only to within a factor ``1 + e``
    (for example from a loose ``tol``) give valid bounds after multiplying
    by ``1 + e``.
    """
    w = as_float_vector(w, "w", dtype=np.float64)
    p = check_float(p, "p", minimum=0.0, strict_minimum=True)
    d = check_int(d, "d", minimum=1)
    if w.size and w.min() < 0:
        raise ValueError("w must be non-negative (Lewis weights)")
    bound: np.ndarray
    if p <= 2.0:
        bound = w.copy()
    else:
        bound = w * float(d) ** (p / 2.0 - 1.0)
    np.minimum(bound, 1.0, out=bound)
    return bound


# ----------------------------------------------------------------------------
# internals


def _column_space(
    X: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Orthonormal basis of range(X), split per row into unit direction and log norm.

    Returns ``(rows, ubar, lnu, ridge_diag)``: indices of the rows with a
    non-zero component in the basis, their unit directions ``ubar`` (k, r),
    ``log ||u_i||`` and the diagonal ``ridge * S^{-2}`` in the rescaled
    coordinates; ``None`` when the rank is 0.
    """
    n, d = X.shape
    if n == 0 or d == 0:
        return None
    amax = float(np.max(np.abs(X)))
    if amax == 0.0:
        return None
    # Power-of-two rescaling is exact, so w(cA) = w(A) holds bit for bit when
    # c is a power of two, and the SVD never sees huge or tiny numbers.
    e = math.frexp(amax)[1]
    Xs = np.ldexp(X, -e)
    _, s, vt = np.linalg.svd(Xs, full_matrices=False)
    r = int(np.count_nonzero(s > s[0] * max(n, d) * np.finfo(np.float64).eps))
    s = s[:r]
    # U = Xs V S^{-1} explicitly (not LAPACK's U) so that a zero row gives an
    # exactly zero u_i.
    U = (Xs @ vt[:r].T) / s
    norms = np.sqrt(np.einsum("ij,ij->i", U, U))
    rows = np.flatnonzero(norms > 0)
    if rows.size == 0:
        return None
    ubar = U[rows] / norms[rows, None]
    lnu = np.log(norms[rows])
    if ridge > 0:
        # ridge / c^2 / s^2 for A = c Xs, c = 2^e, computed in logs.
        log_term = math.log(ridge) - 2.0 * e * math.log(2.0) - 2.0 * np.log(s)
        ridge_diag = np.exp(np.minimum(log_term, math.log(_MAX_RIDGE_TERM)))
    else:
        ridge_diag = np.zeros(r)
    return rows, np.ascontiguousarray(ubar), lnu, ridge_diag


def _whitener(M: np.ndarray) -> np.ndarray:
    """``R`` with ``M^{-1} = R R^T``: ``L^{-T}`` from Cholesky, or from ``eigh`` if that fails.

    One small ``(r, r)`` inverse, so that whitening ``n`` rows is a single GEMM
    rather than a triangular solve with ``n`` right-hand sides.
    """
    try:
        L = scipy.linalg.cholesky(M, lower=True, check_finite=False)
        R: np.ndarray = scipy.linalg.solve_triangular(
            L, np.eye(M.shape[0]), lower=True, check_finite=False
        ).T
        return R
    except np.linalg.LinAlgError:
        # Numerically singular M (weights spanning ~16 orders of magnitude):
        # floor the spectrum at the rounding level instead of failing.
        ev, V = np.linalg.eigh(M)
        floor = max(float(ev[-1]), np.finfo(np.float64).tiny) * M.shape[0] * 1e-15
        R = V / np.sqrt(np.maximum(ev, floor))
        return R


def _fixed_point_map(
    ubar: np.ndarray, lnu: np.ndarray, ridge_diag: np.ndarray, p: float, lw: np.ndarray
) -> np.ndarray:
    """``log phi(w)`` at ``w = exp(lw)``.

    ``M = sum_i w_i^{1-2/p} ||u_i||^2 ubar_i ubar_i^T + D`` is formed with the
    coefficients in logs, ``q_i = ubar_i^T M^{-1} ubar_i`` and
    ``log phi_i = (p/2)(2 log||u_i|| + log q_i)``: every factor stays in a safe
    floating-point range however small or large the row norms are.
    """
    coef = np.exp((1.0 - 2.0 / p) * lw + 2.0 * lnu)
    M = (ubar.T * coef) @ ubar
    M[np.diag_indices_from(M)] += ridge_diag
    Z = ubar @ _whitener(M)
    log_phi: np.ndarray = 0.5 * p * (2.0 * lnu + np.log(np.einsum("ij,ij->i", Z, Z)))
    return log_phi


def _default_fp_iters(p: float, tol: float) -> int:
    c = abs(1.0 - 0.5 * p)
    if c == 0.0:
        return 1
    return math.ceil(math.log(tol / 64.0) / math.log(c)) + 20


def _fixed_point(
    ubar: np.ndarray,
    lnu: np.ndarray,
    ridge_diag: np.ndarray,
    p: float,
    tol: float,
    max_iter: int | None,
) -> np.ndarray:
    if max_iter is None:
        max_iter = _default_fp_iters(p, tol)
    lw = np.zeros(lnu.shape[0])
    for _ in range(max_iter):
        lphi = _fixed_point_map(ubar, lnu, ridge_diag, p, lw)
        residual = float(np.max(np.abs(lphi - lw)))
        lw = lphi
        if residual <= tol or p == 2.0:
            return lw
    warnings.warn(
        f"lewis_weights: fixed-point iteration stopped after {max_iter} steps with "
        f"residual {residual:.3g} > tol={tol:g}",
        RuntimeWarning,
        stacklevel=3,
    )
    return lw


def _ellipsoid_objective(
    ubar: np.ndarray, lnu: np.ndarray, ridge_diag: np.ndarray, p: float, R: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``f(Q)`` at ``Q = R R^T``, with ``Z = ubar R``, ``log q`` and ``log tau``.

    ``f(Q) = -log det Q + (2/p) sum_i (u_i^T Q u_i)^{p/2} + tr(D Q)``.
    """
    Z = ubar @ R
    log_q = np.log(np.einsum("ij,ij->i", Z, Z))
    log_tau = 2.0 * lnu + log_q
    # A trial step of the line search may overshoot far enough to overflow;
    # f = inf then simply rejects it.
    with np.errstate(over="ignore"):
        f = (
            -2.0 * float(np.sum(np.log(np.abs(np.diag(R)))))
            + (2.0 / p) * float(np.sum(np.exp(0.5 * p * log_tau)))
            + float(ridge_diag @ np.einsum("ij,ij->i", R, R))
        )
    if not math.isfinite(f):
        f = math.inf
    return f, Z, log_q, log_tau


def _cg(
    matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, rtol: float, max_iter: int
) -> np.ndarray:
    """Conjugate gradients (Frobenius inner product) for an SPD operator."""
    x = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rr = float(np.vdot(r, r))
    stop = (rtol**2) * rr
    for _ in range(max_iter):
        if rr <= stop:
            break
        Kd = matvec(d)
        step = rr / float(np.vdot(d, Kd))
        x += step * d
        r -= step * Kd
        rr_new = float(np.vdot(r, r))
        d = r + (rr_new / rr) * d
        rr = rr_new
    return x


def _newton(
    ubar: np.ndarray,
    lnu: np.ndarray,
    ridge_diag: np.ndarray,
    p: float,
    tol: float,
    max_iter: int | None,
) -> np.ndarray:
    """Damped Newton on the ellipsoid program ``min_Q f(Q)`` (p > 2), Q = R R^T."""
    if max_iter is None:
        max_iter = 100
    r = ubar.shape[1]
    eye = np.eye(r)
    # Best multiple of the identity for f without ridge, then shrunk along the
    # ridge directions: a start that is already on the right scale.
    log_s = (2.0 / p) * (math.log(r) - _logsumexp(p * lnu))
    R = np.diag(1.0 / np.sqrt(math.exp(-log_s) + ridge_diag))
    f, Z, log_q, log_tau = _ellipsoid_objective(ubar, lnu, ridge_diag, p, R)
    residual = math.inf
    for it in range(max_iter + 1):
        # Whitened gradient: M~ - I with M~ = R^T M(Q) R and
        # M(Q) = sum_i tau_i^{p/2-1} u_i u_i^T + D, the matrix A^T W^{1-2/p} A + D
        # of the weights w_i = tau_i^{p/2} that Q defines.
        c = np.exp((0.5 * p - 1.0) * log_tau + 2.0 * lnu)
        Mt = (Z.T * c) @ Z + (R.T * ridge_diag) @ R
        Mt = 0.5 * (Mt + Mt.T)
        ev = np.linalg.eigvalsh(Mt)
        if ev[0] <= 0:
            raise FloatingPointError("lewis_weights: ellipsoid matrix lost definiteness")
        # |log w_i - log phi_i(w)| = (p/2) |log(z^T z) - log(z^T M~^{-1} z)|
        # <= (p/2) max |log eig(M~)| for every row at once.
        residual = 0.5 * p * float(np.max(np.abs(np.log(ev))))
        if residual <= tol:
            return 0.5 * p * log_tau
        if it == max_iter:
            break
        coef = (0.5 * p - 1.0) * c / np.exp(log_q)

        def hess(E: np.ndarray, Z: np.ndarray = Z, coef: np.ndarray = coef) -> np.ndarray:
            s = np.einsum("ij,ij->i", Z @ E, Z)
            HE: np.ndarray = E + (Z.T * (coef * s)) @ Z
            return HE

        rhs = eye - Mt
        E = _cg(hess, rhs, rtol=min(0.1, float(np.linalg.norm(rhs))), max_iter=10 * r + 50)
        E = 0.5 * (E + E.T)
        lambda2 = float(np.vdot(rhs, E))
        emin = float(np.linalg.eigvalsh(E)[0])
        t = 1.0 if emin > -0.99 else 0.99 / -emin
        slack = 1e-13 * (abs(f) + r)
        while True:
            step_chol = np.linalg.cholesky(eye + t * E)
            R_new = R @ step_chol
            f_new, Z_new, log_q_new, log_tau_new = _ellipsoid_objective(
                ubar, lnu, ridge_diag, p, R_new
            )
            if f_new <= f - 1e-4 * t * lambda2 + slack:
                break
            t *= 0.5
            if t < 1e-10:
                warnings.warn(
                    "lewis_weights: Newton line search stalled (rounding); "
                    f"residual {residual:.3g} > tol={tol:g}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return 0.5 * p * log_tau
        R, f, Z, log_q, log_tau = R_new, f_new, Z_new, log_q_new, log_tau_new
    warnings.warn(
        f"lewis_weights: Newton's method stopped after {max_iter} steps with "
        f"residual {residual:.3g} > tol={tol:g}",
        RuntimeWarning,
        stacklevel=3,
    )
    return 0.5 * p * log_tau


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))
