"""The LevAttention universal set: every key any query can weight heavily.

For keys ``k_1, k_2, ...`` in ``R^d`` and polynomial attention with
``f(x) = |x|^p``, the weight of key ``j`` for query ``q`` is
``A_qj = |q.k_j|^p / sum_l |q.k_l|^p``. Its supremum over all queries is the
``l_p`` *sensitivity* ``s_j`` of row ``j`` of ``K``. Kannan, Bhattacharyya,
Kacham & Woodruff ("LevAttention", 2024) observe that the keys with
``s_j >= eps`` form a *universal set*: a set of size independent of the number
of keys that holds every heavy entry of every attention row, and that a
stream of keys can be filtered down to it in constant memory. This module
keeps that set exactly, in a stream, with exact merges.

Bounds used (``M = K^T K`` over all keys so far, ``tau_j = k_j^T M^+ k_j``):

- ``p = 2``: ``s_j = tau_j`` exactly (the worst query is ``q = M^+ k_j``) and
  ``sum_j tau_j = rank(K) <= d``, so at most ``d / eps`` keys reach ``eps``.
- Lewis certificate (any ``p != 2``; Cohen & Peng, "l_p row sampling by Lewis
  weights", 2015). For *any* positive weights ``v`` on a set ``S`` of keys
  containing ``j``, with ``h_j = k_j^T (K_S^T V^(1-2/p) K_S)^+ k_j``:
  ``s_j(K) <= s_j(K_S) <= h_j^(p/2) (sum_S v)^(p/2-1)`` for ``p > 2``
  (Hölder) and ``<= c h_j^(p/2)``, ``c = max_S v^(1-2/p) h^(1-p/2)``, for
  ``p < 2`` (see :func:`_lewis_bounds`). At the exact Lewis weights ``w`` of
  ``K_S`` these are the classical ``d^(p/2-1) w_j`` and ``w_j`` (the latter
  is tighter than the ``w_j^(p/2)`` often quoted, since ``w_j <= 1``), which
  sum to ``d^(p/2)`` and ``d``. The first inequality is why a *subset* works:
  removing keys only raises a sensitivity. ``S`` is the kept set plus the
  incoming block, ``v`` are Lewis weights of ``S`` from a fixed-point
  iteration, and as the certificate holds for any ``v`` the bound is valid
  however far the iteration got.
- ``p > 2``: the Lewis certificate; at most ``d^(p/2) / eps`` keys.
- ``0 < p < 2``: also ``||v||_p >= ||v||_2``, i.e.
  ``sum_l |q.k_l|^p >= (q^T M q)^(p/2)``, so ``s_j <= tau_j^(p/2)``, a bound
  over the *whole* stream (monotone, exactly mergeable, needs only the Gram
  matrix). The score is the minimum of both bounds (and of the key's earlier
  scores, all valid): ``tau^(p/2)`` screens the block cheaply and is tight
  for keys many others resemble, the certificate caps the set at
  ``d / eps`` keys (``tau^(p/2)`` alone allows ``d / eps^(2/p)``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import scipy.linalg

from .._parallel import fixed_chunks, njit, run_chunks, split_rows
from .._validation import (
    as_float_matrix,
    as_float_vector,
    check_dtype_arg,
    check_float,
    check_int,
    resolve_start,
)
from ..base import Sketch

__all__ = ["UniversalSet"]

_MAX_INDEX = 2**62
# Singular values of the Gram's square-root factor below this fraction of the
# largest are numerically zero (noise of a few ulps accumulated over updates);
# genuine directions of keys whose norms differ by 1e6 sit near 1e-8 and above.
_RANK_RTOL = 1e-12
# Rows simulated at once in capacity mode (workspace b x (capacity + b)).
_SIM_ROWS = 256
# Factors at least this well conditioned (LAPACK 1-norm estimate) are updated
# by Cholesky and inverted directly; the rest go through QR and an SVD.
_FAST_RCOND = 1e-4
_LEWIS_MAX_ITER = 60
_LEWIS_TOL = 1e-10
# Rows per thread for the compiled Gram / scoring kernels.
_ROWS_PER_THREAD = 2048
# Bound on the kept-row buffer, in elements, to refuse absurd eps at construction.
_MAX_BUFFER = 2**33

# (R, K, idx, sc): the Gram's factor, the kept keys, their positions and scores.
_LowState = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# (K, idx, sc) without a factor (p > 2).
_HighState = tuple[np.ndarray, np.ndarray, np.ndarray]


@njit(nogil=True, cache=True)
def _gram_upper(  # pragma: no cover - compiled
    B: npt.NDArray[np.float64], lo: int, hi: int, out: npt.NDArray[np.float64]
) -> None:
    """``out[a, c] += sum_i B[i, a] B[i, c]`` for ``a <= c`` and rows ``lo <= i < hi``.

    Eight rows per sweep of the upper triangle keep the accumulators in
    registers; the inner loop is contiguous and vectorises.
    """
    d = B.shape[1]
    i = lo
    while i + 8 <= hi:
        for a in range(d):
            x0 = B[i, a]
            x1 = B[i + 1, a]
            x2 = B[i + 2, a]
            x3 = B[i + 3, a]
            x4 = B[i + 4, a]
            x5 = B[i + 5, a]
            x6 = B[i + 6, a]
            x7 = B[i + 7, a]
            for c in range(a, d):
                out[a, c] += (
                    x0 * B[i, c] + x1 * B[i + 1, c] + x2 * B[i + 2, c] + x3 * B[i + 3, c]
                ) + (x4 * B[i + 4, c] + x5 * B[i + 5, c] + x6 * B[i + 6, c] + x7 * B[i + 7, c])
        i += 8
    for r in range(i, hi):
        for a in range(d):
            xa = B[r, a]
            for c in range(a, d):
                out[a, c] += xa * B[r, c]


@njit(nogil=True, cache=True)
def _whitened_sq(  # pragma: no cover - compiled
    K: npt.NDArray[np.float64],
    W: npt.NDArray[np.float64],
    upper: bool,
    lo: int,
    hi: int,
    out: npt.NDArray[np.float64],
) -> None:
    """``out[i] = ||K[i] @ W||^2`` for rows ``lo <= i < hi`` (``W`` triangular if ``upper``)."""
    d = K.shape[1]
    y = np.empty(W.shape[1])
    for i in range(lo, hi):
        y[:] = 0.0
        for a in range(d):
            ka = K[i, a]
            for c in range(a if upper else 0, W.shape[1]):
                y[c] += ka * W[a, c]
        s = 0.0
        for c in range(W.shape[1]):
            s += y[c] * y[c]
        out[i] = s


@njit(nogil=True, cache=True)
def _cholesky_upper(  # pragma: no cover - compiled
    G: npt.NDArray[np.float64], C: npt.NDArray[np.float64]
) -> bool:
    """Upper ``C`` with ``C^T C = G`` (d x d, built as the lower ``L = C^T`` by rows).

    Returns False if ``G`` is not numerically positive definite. A compiled
    O(d^3 / 3) loop instead of LAPACK: at these sizes OpenBLAS's threaded
    ``potrf`` can wait milliseconds for a descheduled thread on a busy machine.
    """
    d = G.shape[0]
    L = np.zeros((d, d))
    for i in range(d):
        for j in range(i + 1):
            s = G[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                if not s > 0.0:
                    return False
                L[i, i] = np.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    for i in range(d):
        for j in range(d):
            C[i, j] = L[j, i]
    return True


@njit(nogil=True, cache=True)
def _inv_upper(  # pragma: no cover - compiled
    C: npt.NDArray[np.float64], X: npt.NDArray[np.float64]
) -> None:
    """``X = C^{-1}`` for upper-triangular ``C`` with a nonzero diagonal (O(d^3 / 6))."""
    d = C.shape[0]
    X[:, :] = 0.0
    for j in range(d):
        X[j, j] = 1.0 / C[j, j]
        for i in range(j - 1, -1, -1):
            s = 0.0
            for k in range(i + 1, j + 1):
                s += C[i, k] * X[k, j]
            X[i, j] = -s / C[i, i]


@njit(nogil=True, cache=True)
def _forward_sub_upper_t(  # pragma: no cover - compiled
    C: npt.NDArray[np.float64], Z: npt.NDArray[np.float64]
) -> None:
    """``Z <- C^{-T} Z`` in place (``C`` upper triangular, ``Z`` s x m, by rows)."""
    s = C.shape[0]
    for i in range(s):
        for k in range(i):
            c = C[k, i]
            for j in range(Z.shape[1]):
                Z[i, j] -= c * Z[k, j]
        inv = 1.0 / C[i, i]
        for j in range(Z.shape[1]):
            Z[i, j] *= inv


def _chol_upper(G: np.ndarray) -> np.ndarray | None:
    C = np.empty_like(G)
    return C if np.isfinite(G).all() and _cholesky_upper(G, C) else None


def _gram(B: np.ndarray) -> np.ndarray:
    """``B^T B`` (float64, d x d) with the compiled kernel on row chunks in threads."""
    d = B.shape[1]

    def part(lo: int, hi: int) -> np.ndarray:
        out = np.zeros((d, d))
        _gram_upper(B, lo, hi, out)
        return out

    parts = run_chunks(part, fixed_chunks(B.shape[0], _ROWS_PER_THREAD))
    G = parts[0]
    for q in parts[1:]:
        G += q
    full: np.ndarray = np.triu(G) + np.triu(G, 1).T
    return full


class _Whitener:
    """``tau(k) = k^T (R^T R + ridge I)^+ k = ||k @ W||^2``, with ``W`` (d x d).

    Well-conditioned case: ``W = F^{-1}`` for the triangular factor ``F`` of
    ``R^T R + ridge I`` (``rank = d``, ``V`` None). Otherwise from the SVD
    ``R = U S V^T``: ``W = V^T' (S^2 + ridge)^{-1/2}``, where for ``ridge = 0``
    singular values below ``_RANK_RTOL * s_max`` count as zero (zero columns
    of ``W``); ``V`` (rank x d) then spans the range used. In both cases
    ``W W^T = (R^T R + ridge I)^+``.
    """

    W: np.ndarray
    V: np.ndarray | None
    rank: int
    upper: bool
    s_max: float  # set only on the SVD path (rank < d is possible only there)

    def __init__(self, R: np.ndarray, ridge: float) -> None:
        d = R.shape[0]
        if ridge > 0:
            G = _gram(R)
            G[np.diag_indices(d)] += ridge
            F: np.ndarray | None = _chol_upper(G)
        else:
            F = R
        if F is not None and _rcond(F) >= _FAST_RCOND:
            Finv = np.empty_like(F)
            _inv_upper(F, Finv)
            if np.isfinite(Finv).all():
                self.W, self.V, self.rank, self.upper = Finv, None, d, True
                return
        s, vt = _svd(R)
        if ridge > 0:
            inv = 1.0 / np.sqrt(s * s + ridge)
            rank = d
        else:
            keep = s > _RANK_RTOL * s[0] if s[0] > 0 else np.zeros(s.shape, bool)
            rank = int(keep.sum())
            inv = np.zeros_like(s)
            inv[keep] = 1.0 / s[keep]
        self.W = np.ascontiguousarray(vt.T * inv[None, :])
        self.V, self.rank, self.upper = vt[:rank], rank, False
        self.s_max = float(s[0])

    def whiten(self, K: np.ndarray) -> np.ndarray:
        """``K @ W``: whitened coordinates, (m, d)."""
        Y: np.ndarray = K @ self.W
        return Y

    def tau(self, K: np.ndarray) -> np.ndarray:
        """``||k @ W||^2`` per row of float64 ``K`` (compiled kernel, row chunks in threads)."""
        m = K.shape[0]
        out = np.empty(m)
        if m == 0:
            return out
        K = np.ascontiguousarray(K)

        def part(lo: int, hi: int) -> None:
            _whitened_sq(K, self.W, self.upper, lo, hi, out)

        run_chunks(part, split_rows(m, _ROWS_PER_THREAD))
        return out

    def sq_norm_bound(self) -> float:
        """An upper bound on ``||W||_2^2`` (Hölder: ``||W||_1 ||W||_inf``), O(d^2)."""
        a = np.abs(self.W)
        return float(a.sum(axis=0).max() * a.sum(axis=1).max())


def _rcond(R: np.ndarray) -> float:
    """LAPACK estimate of ``1 / cond_1(R)`` for upper-triangular ``R`` (O(d^2))."""
    rc, info = scipy.linalg.lapack.dtrcon(R, norm="1", uplo="U", diag="N")
    return float(rc) if info == 0 and np.isfinite(rc) else 0.0


def _triu_factor(R: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Upper-triangular ``R'`` (d x d) with ``R'^T R' = R^T R + B^T B``.

    The Gram matrix is carried in square-root form: same information as
    ``K^T K``, accumulated to rounding like a running sum (each step is
    backward stable; errors add and never compound). When the result is well
    conditioned (LAPACK's estimate ``cond_1(R') <= 1e4``) it comes from a
    Cholesky factorisation of ``R^T R + B^T B`` (fast; forming the Gram then
    costs at most ``eps * cond(M) <= 1e8 eps ~ 2e-8`` relative accuracy in a
    leverage score); otherwise from a Householder QR of
    ``[R; B]``, whose error in a direction of singular value ``s`` is relative
    ``eps * s_max / s`` instead of ``eps * (s_max / s)^2`` -- what lets
    ridge-free leverage resolve keys whose norms differ by 1e6 near
    rank-deficient prefixes.
    """
    d = R.shape[1]
    C = _chol_upper(_gram(np.concatenate([R, B])))
    if C is not None and _rcond(C) >= _FAST_RCOND:
        return C
    # numpy's stubs give every mode the (Q, R) result; mode="r" returns R alone.
    r = cast(np.ndarray, np.linalg.qr(np.concatenate([R, B]), mode="r"))
    out = np.zeros((d, d))
    out[: r.shape[0]] = np.triu(r)
    return out


def _svd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        _, s, vt = np.linalg.svd(A, full_matrices=False)
    except np.linalg.LinAlgError:  # pragma: no cover - gesdd rarely fails
        _, s, vt = scipy.linalg.svd(A, full_matrices=False, lapack_driver="gesvd")
    return s, vt


def _row_sq(Y: np.ndarray) -> np.ndarray:
    sq: np.ndarray = np.einsum("ij,ij->i", Y, Y)
    return sq


def _lewis_bounds(K: np.ndarray, p: float) -> np.ndarray:
    """Certified upper bounds on the ``l_p`` sensitivities (``p != 2``) of the rows of ``K``.

    Approximate Lewis weights ``v`` solve ``v = h(v)^(p/2)``, where
    ``h_j(v) = k_j^T (K^T V^(1-2/p) K)^+ k_j``: for ``p < 2`` by the
    Cohen–Peng iteration ``v <- h(v)^(p/2)`` (a contraction by ``1 - p/2``),
    for ``p > 2`` by ``v <- v^(1-2/p) h(v)``, the same step scaled to slope
    zero in log space (the plain iteration does not converge for ``p >= 4``).
    For *any*
    ``v > 0`` (so convergence only affects tightness), with ``y = K q`` and
    ``S = sum_j v_j^(1-2/p) y_j^2``, Cauchy–Schwarz gives ``y_j^2 <= h_j S``
    and then

    - ``p > 2`` (Hölder, exponents ``p/2`` and ``p/(p-2)``):
      ``S <= (sum v)^(1-2/p) ||y||_p^2``, so
      ``s_j <= h_j^(p/2) (sum v)^(p/2-1)``;
    - ``p < 2`` (``y_j^2 = |y_j|^p |y_j|^(2-p)`` and ``|y_j|^(2-p) <=
      (h_j S)^(1-p/2)``): ``S^(p/2) <= c ||y||_p^p`` with
      ``c = max_j v_j^(1-2/p) h_j^(1-p/2)``, so ``s_j <= c h_j^(p/2)``.

    At the exact Lewis weights these are ``d^(p/2-1) w_j`` and ``w_j``.
    Zero rows get 0; a nonzero row whose direction is numerically absent gets
    1 (it is left out of the set, which only raises the other bounds).
    Cost: O(m d^2) per iteration, at most ``_LEWIS_MAX_ITER`` iterations.
    """
    out = np.zeros(K.shape[0])
    a = 1.0 - 2.0 / p

    zero = np.zeros((K.shape[1], K.shape[1]))

    def lev(A: np.ndarray, weights: np.ndarray) -> np.ndarray:
        r = _triu_factor(zero, np.sqrt(weights)[:, None] * A)
        return _Whitener(r, 0.0).tau(A)

    nz = np.flatnonzero(np.any(K != 0, axis=1))
    if nz.size == 0:
        return out
    v = lev(K[nz], np.ones(nz.size))
    alive = v > 0
    out[nz[~alive]] = 1.0
    nz, v = nz[alive], v[alive]
    if nz.size == 0:
        return out
    A = K[nz]
    # Log space throughout: leverage is homogeneous of degree -1 in the
    # weights, so h(w) = h(w / s) / s with s = max(w), and w = v^(1-2/p)
    # would overflow for small p and graded rows if formed directly.
    log_v = np.log(v)
    log_h = None
    for _ in range(_LEWIS_MAX_ITER + 1):
        la = a * log_v
        top = float(la.max())
        hh = lev(A, np.exp(la - top))
        if not (np.all(hh > 0) and np.isfinite(hh).all()):
            break  # rounding lost a direction: keep the last certified iterate
        log_h = np.log(hh) - top  # log h_j(w) at w = v^(1-2/p)
        log_new = la + log_h if p > 2 else (p / 2) * log_h
        done = np.max(np.abs(log_new - log_v)) < _LEWIS_TOL
        if done:
            break
        log_v = log_new
    if log_h is None:  # no certificate: the trivial bound
        out[nz] = 1.0
        return out
    # The certificate below is valid for the v that produced log_h.
    if p > 2:
        log_sum_v = float(np.logaddexp.reduce(log_v))
        log_out = (p / 2) * log_h + (p / 2 - 1) * log_sum_v
    else:
        log_c = float(np.max(a * log_v + (1 - p / 2) * log_h))
        log_out = log_c + (p / 2) * log_h
    # A sensitivity never exceeds 1 (the row's own term is in the sum).
    out[nz] = np.exp(np.minimum(log_out, 0.0))
    return out


_TIE_BITS = 40


def _tie_key(sc: np.ndarray) -> np.ndarray:
    """Scores rounded to 40 mantissa bits: equal scores reached by different
    rounding paths (a row fed alone vs. in a block) compare equal, so the
    index decides, as documented."""
    m, e = np.frexp(sc)
    key: np.ndarray = np.ldexp(np.floor(m * 2.0**_TIE_BITS + 0.5), e - _TIE_BITS)
    return key


@njit(nogil=True, cache=True)
def _tie_key1(x: float) -> float:  # pragma: no cover - compiled
    if x <= 0.0:
        return x
    m, e = math.frexp(x)
    return math.ldexp(math.floor(m * 2.0**_TIE_BITS + 0.5), e - _TIE_BITS)


@njit(nogil=True, cache=True)
def _simulate_capacity(  # pragma: no cover - compiled
    tau0: npt.NDArray[np.float64],
    cum: npt.NDArray[np.float64],
    idx: npt.NDArray[np.int64],
    n: int,
    cap: int,
    eps: float,
    half_p: float,
    alive: npt.NDArray[np.bool_],
) -> None:
    """Per-row capacity decisions inside a block, from exact running scores.

    Candidates ``0..n-1`` are the kept keys, ``n..n+s-1`` the block's rows in
    arrival order. After block row ``t`` arrives the score of candidate ``j``
    is ``(tau0[j] - cum[t, j])^(p/2)``. Each step drops keys below ``eps``,
    then, if more than ``cap`` remain, the lowest score (the highest index
    among equal scores).
    """
    m = tau0.shape[0]
    s = cum.shape[0]
    for j in range(m):
        alive[j] = j < n
    count = n
    for t in range(s):
        alive[n + t] = True
        count += 1
        worst = -1
        wsc = np.inf
        widx = -1
        for j in range(n + t + 1):
            if not alive[j]:
                continue
            tau = tau0[j] - cum[t, j]
            tau = min(max(tau, 0.0), 1.0)
            sc = tau**half_p
            if sc < eps:
                alive[j] = False
                count -= 1
                continue
            key = _tie_key1(sc)
            if key < wsc or (key == wsc and idx[j] > widx):
                worst = j
                wsc = key
                widx = idx[j]
        if count > cap:
            alive[worst] = False
            count -= 1


class UniversalSet(Sketch):
    """Streaming universal set of heavy keys for ``f(x) = |x|^p`` attention (LevAttention).

    Keys stream in; the set keeps exactly the keys whose *current* score is at
    least ``eps`` and evicts the rest. For ``p = 2`` the score is the ridge
    leverage ``tau_j = k_j^T (K^T K + ridge I)^+ k_j`` against all keys seen
    so far; for ``p != 2`` it is an upper bound on the ``l_p`` sensitivity
    (see the module docstring).

    Parameters
    ----------
    n_features : int
        Key width ``d``.
    eps : float
        Threshold, ``0 < eps <= 1`` (``0 <= eps`` with ``capacity``).
    p : float, default 2
        Exponent of ``f(x) = |x|^p``, ``p > 0``.
    ridge : float, default 0.0
        ``lambda >= 0`` (``p = 2`` only). With ``lambda > 0`` the guarantee is
        for ``A_qj = (q.k_j)^2 / (sum_l (q.k_l)^2 + lambda ||q||^2)``.
    capacity : int, optional
        Keep at most this many keys: after each row, the ``capacity``
        highest-scoring keys whose score is ``>= eps`` (ties: the lower
        stream index wins; scores equal to 40 bits count as equal). ``eps = 0``
        gives a pure budget.
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the kept keys (inputs are converted to it); scores and the
        Gram factor are float64.

    Attributes
    ----------
    indices : numpy.ndarray, (n_kept,) int64
        Global stream positions of the kept keys, increasing.
    rows : numpy.ndarray, (n_kept, d)
        The kept keys, same order.
    scores : numpy.ndarray, (n_kept,) float64
        Their current scores (all ``>= eps``).

    Notes
    -----
    **Guarantee (p = 2, ridge = 0).** For every query ``q`` and every prefix
    of the stream, ``A_qj = (q.k_j)^2 / sum_l (q.k_l)^2 <= tau_j`` (Cauchy–
    Schwarz in the ``M^+`` metric, equality at ``q = M^+ k_j``), and ``tau_j``
    never increases as keys arrive (``M`` grows in the Loewner order). So a
    key evicted once can never again reach ``eps``, and after every
    :meth:`update`/:meth:`extend` the set holds every key with
    ``A_qj >= eps`` for some ``q``, and nothing else:
    ``indices == {j : tau_j(now) >= eps}``, with
    ``|U| <= sum_j tau_j / eps <= d / eps``. Because of the monotonicity the
    set after a block equals the set after feeding its rows one by one, so
    :meth:`extend` processes a block at once.

    **Guarantee (p != 2).** Every score is an upper bound on the key's ``l_p``
    sensitivity at that time, and true sensitivities only fall as keys
    arrive; so a key evicted once never again has weight ``>= eps`` for any
    query, and every key with ``A_qj >= eps`` for some ``q`` is in the set
    after every call. The set may hold a few keys whose true sensitivity is
    below ``eps`` (the bounds are not tight), never more than ``d / eps``
    (``p < 2``) or ``d^(p/2) / eps`` (``p > 2``). The certificate is computed
    on the candidate subset (kept keys plus the new block), so the set — not
    the guarantee — depends on how the stream is chunked, and by a lot for
    ``p < 2``: fed row by row, a set can hold several times the keys that
    block-wise feeding keeps (measured: 229 vs 134 keys at ``p = 1``, 287 vs
    0 at ``p = 0.5``, n = 1500, d = 8, eps = 0.02), always within the bound.
    Larger blocks give tighter sets. Stored scores are running minima of
    valid bounds.

    **Rank-deficient prefixes (ridge = 0).** ``tau`` is the pseudo-inverse
    leverage, so a key outside the span of the earlier keys scores exactly 1.
    The state holds the Gram matrix as its triangular square root ``R``
    (``R^T R = K^T K``, float64): it is never squared back where that would
    cost accuracy, only factored. Well-conditioned factors (``cond_1 <= 1e4``)
    are updated by Cholesky of ``R^T R + B^T B`` and inverted; otherwise ``R``
    is updated by Householder QR of ``[R; B]`` and leverage is read from the
    SVD ``R = U S V^T`` as ``||S^+ V^T k||^2``, where singular values below
    ``1e-12 * s_max`` count as zero. Working with ``R`` instead of ``K^T K``
    halves the dynamic range (``s`` rather than ``s^2``), so keys whose norms
    differ by ``1e6`` keep their own directions even in the nearly square
    prefixes where a float64 Gram matrix cannot resolve them (the tests
    check every prefix with norms spread over ``[1e-3, 1e3]``). Directions
    weaker than ``1e-12 s_max`` are treated as absent: the only way a key can
    be under-scored.

    **Capacity.** With ``capacity = C`` the rule becomes "after each row keep
    the ``C`` highest scores among the kept keys and the new one" (and drop
    scores below ``eps``); ``p < 2`` then scores by ``tau^(p/2)`` alone.
    Blocks are processed so that the result equals that per-row rule (to
    rounding): while fewer than ``C`` keys are held, rows arrive in
    sub-blocks that cannot overflow; once full, the exact score of every
    candidate after every row of a sub-block is read from one Cholesky
    factorisation (``tau_j(t) = tau_j(0) - sum_{s<=t} Z_sj^2`` with
    ``Z = C^{-1} Y_B Y^T`` in whitened coordinates; a row that adds a new
    direction to a rank-deficient prefix is fed alone), and a small compiled
    kernel replays the decisions. If ``C >= d / eps`` (``p = 2``) the capacity
    never binds and the guarantee above holds unchanged. For ``p > 2``
    capacity decisions are taken at block ends.

    **Merge.** ``p = 2``: the Gram factors combine exactly (``R`` of
    ``[R_1; R_2]``), the union of the two sets is re-scored against it and
    filtered. Every key of the concatenated stream with ``tau_j >= eps`` was
    kept by its own shard (its shard's score is only larger), so merging
    shards built with ``start_index`` gives exactly the single-stream set.
    ``p != 2``: the union is re-scored the same way (the merged Gram for
    ``tau^(p/2)``, the Lewis certificate on the union, the minimum with the
    shard scores, all valid bounds), so the merged set never misses a heavy
    key and obeys the same size bound, but can be several times larger than
    a single stream's set (the shards' candidate subsets are smaller).
    Capacity mode: the top ``C`` of the union (the per-row history of a
    single stream is not reproduced). Sets to merge must hold disjoint
    stream positions.

    **Cost** (``m = n_kept``, ``b`` = rows per block). ``p = 2``, per block:
    ``O(b d^2 + d^3)`` for the factor update (a compiled Gram kernel on row
    chunks in threads, then a ``d x d`` Cholesky), ``O(b d)`` for a screen
    that drops rows whose norm bound ``||k||^2 ||F^-1||_1 ||F^-1||_inf`` is
    below ``eps``, and ``O((m + b') d^2)`` to score the kept keys and the
    ``b'`` rows that pass it; ``O(d^3)`` more (QR, SVD) on ill-conditioned
    or rank-deficient factors. Workspace ``O((m + b) d)``; blocks hold
    ``max(4096, 2 * max_kept, 32 d)`` rows, so :meth:`extend` costs
    ``O(k d^2)`` and in practice ``O(k d)`` plus the Gram update.
    :meth:`update` pays ``O(d^3 + m d^2)`` per row. Capacity mode once full
    adds ``O(s (m + s) d)`` per sub-block of ``s <= 256`` rows. ``p != 2``:
    ``O(iters * m' d^2)`` more per block for the certificate on the ``m'``
    candidates (``p < 2``: only those that pass ``tau^(p/2) >= eps``).
    ``nbytes`` is constant: ``max_kept * (d * itemsize + 16) + 8 d^2``
    (``p <= 2``) with ``max_kept = floor(d / eps)`` (``p <= 2``),
    ``floor(d^(p/2) / eps)`` (``p > 2``), ``min(capacity, floor(d /
    eps^(2/p)))`` with a capacity.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.rows.universal import UniversalSet
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((5000, 8))
    >>> K[1234] *= 50.0                       # one heavy key
    >>> us = UniversalSet(8, eps=0.1).extend(K)
    >>> 1234 in us.indices, len(us.indices) <= 8 / 0.1
    (True, True)
    """

    def __init__(
        self,
        n_features: int,
        eps: float,
        *,
        p: float = 2,
        ridge: float = 0.0,
        capacity: int | None = None,
        dtype: Any = np.float64,
    ) -> None:
        self.n_features = d = check_int(n_features, "n_features", minimum=1)
        self.p = check_float(p, "p", minimum=0.0, strict_minimum=True)
        self.ridge = check_float(ridge, "ridge", minimum=0.0)
        if self.ridge > 0 and self.p != 2:
            raise ValueError("ridge > 0 is only defined for p = 2")
        if capacity is not None:
            capacity = check_int(capacity, "capacity", minimum=1)
        self.capacity = capacity
        self.eps = check_float(
            eps, "eps", minimum=0.0, maximum=1.0, strict_minimum=capacity is None
        )
        self.dtype = check_dtype_arg(dtype)
        # p < 2 in threshold mode also bounds by Lewis weights (sum <= d).
        self._lewis_low = self.p < 2 and capacity is None
        max_kept = self._buffer_rows(d, self.eps, self.p, capacity)
        if max_kept * d > _MAX_BUFFER:
            raise ValueError(
                f"eps={self.eps} needs a buffer of {max_kept} keys; raise eps or set capacity"
            )
        self._max_kept = int(max(max_kept, 0))
        self._low_p = self.p <= 2
        self._R: npt.NDArray[np.float64] | None = np.zeros((d, d)) if self._low_p else None
        self._rows = np.zeros((self._max_kept, d), dtype=self.dtype)
        self._indices = np.zeros(self._max_kept, dtype=np.int64)
        self._scores = np.zeros(self._max_kept, dtype=np.float64)
        self._n_kept = 0
        self._n_seen = 0
        self._next_index = 0

    # -- protocol -----------------------------------------------------------
    @staticmethod
    def _buffer_rows(d: int, eps: float, p: float, capacity: int | None) -> float:
        """Most keys the set can ever hold (the preallocated buffer), possibly inf."""
        if not (math.isfinite(p) and p > 0 and math.isfinite(eps) and eps >= 0 and d >= 1):
            raise ValueError("n_features, eps and p must be a positive int, >= 0 and > 0")
        if eps > 0:
            # In logs: eps^(2/p) underflows and d^(p/2) overflows for extreme p.
            if p == 2 or (p < 2 and capacity is None):  # Lewis certificate: sum <= d
                log_bound = math.log(d) - math.log(eps)
            elif p < 2:
                log_bound = math.log(d) - (2.0 / p) * math.log(eps)
            else:
                log_bound = (p / 2) * math.log(d) - math.log(eps)
            # A hair of slack so that floor() is not fooled by eps's rounding.
            bound = math.floor(math.exp(log_bound) * (1 + 1e-12)) if log_bound < 700 else math.inf
        else:
            bound = math.inf
        return bound if capacity is None else min(capacity, bound)

    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        d, eps, p = int(params["n_features"]), float(params["eps"]), float(params["p"])
        cap = params["capacity"]
        rows = cls._buffer_rows(d, eps, p, None if cap is None else int(cap))
        if not math.isfinite(rows):
            raise ValueError("eps and capacity leave the buffer unbounded")
        return int(rows) * (8 * d + 16) + 8 * d * d

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "eps": self.eps,
            "p": self.p,
            "ridge": self.ridge,
            "capacity": self.capacity,
            "dtype": self.dtype.name,
        }

    def _state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"rows": self._rows, "indices": self._indices, "scores": self._scores}
        if self._low_p:
            arrays["R"] = self._factor()
        return arrays

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen, "next_index": self._next_index, "n_kept": self._n_kept}

    def _check_loaded_state(self) -> None:
        name = type(self).__name__
        n = self._n_kept
        if n > self._max_kept or n > self._n_seen:
            raise ValueError(f"corrupt {name} blob: n_kept is out of range")
        idx, sc = self._indices, self._scores
        if np.any(self._rows[n:] != 0) or np.any(idx[n:] != 0) or np.any(sc[n:] != 0):
            raise ValueError(f"corrupt {name} blob: unused buffer slots are not zero")
        if n and (idx[0] < 0 or idx[n - 1] >= _MAX_INDEX or np.any(np.diff(idx[:n]) <= 0)):
            raise ValueError(f"corrupt {name} blob: indices are not increasing positions")
        if np.any(sc[:n] < self.eps) or np.any(sc[:n] > 1.0):
            raise ValueError(f"corrupt {name} blob: scores are outside [eps, 1]")
        if self._low_p:
            R = self._factor()
            if np.any(np.tril(R, -1) != 0):
                raise ValueError(f"corrupt {name} blob: R is not upper triangular")
            if n:
                # The stored scores must be the current scores of the stored rows.
                again = self._score_low_p(self._rows[:n].astype(np.float64), R)
                if self._lewis_low:  # running minima of tau^(p/2) and Lewis bounds
                    bad = bool(np.any(sc[:n] > again * (1 + 1e-6) + 1e-9))
                else:
                    bad = not np.allclose(again, sc[:n], rtol=1e-6, atol=1e-9)
                if bad:
                    raise ValueError(f"corrupt {name} blob: scores do not match the keys")

    # -- properties ---------------------------------------------------------
    @property
    def indices(self) -> np.ndarray:
        """Global stream positions of the kept keys, (n_kept,) int64, increasing (a copy)."""
        idx: npt.NDArray[np.int64] = self._indices[: self._n_kept].copy()
        return idx

    @property
    def rows(self) -> np.ndarray:
        """The kept keys, (n_kept, n_features) in ``dtype``, ordered as :attr:`indices`."""
        K: np.ndarray = self._rows[: self._n_kept].copy()
        return K

    @property
    def scores(self) -> np.ndarray:
        """Current scores of the kept keys, (n_kept,) float64, all ``>= eps``."""
        sc: npt.NDArray[np.float64] = self._scores[: self._n_kept].copy()
        return sc

    @property
    def n_kept(self) -> int:
        """Number of keys in the set."""
        return int(self._n_kept)

    @property
    def max_kept(self) -> int:
        """Size of the preallocated key buffer: the most keys the set can hold."""
        return self._max_kept

    @property
    def next_index(self) -> int:
        """Global position that ``extend`` uses when ``start_index`` is omitted."""
        return self._next_index

    def gram(self) -> np.ndarray:
        """``K^T K`` of every key seen (without the ridge), (d, d) float64. ``p <= 2`` only."""
        if not self._low_p:
            raise ValueError("the Gram matrix is kept only for p <= 2")
        R = self._factor()
        G: npt.NDArray[np.float64] = R.T @ R
        return G

    def _factor(self) -> npt.NDArray[np.float64]:
        """The Gram's square-root factor ``R`` (d x d), kept exactly when ``p <= 2``."""
        assert self._R is not None  # allocated in __init__ iff self._low_p
        return self._R

    # -- scoring ------------------------------------------------------------
    def _score_from_tau(self, tau: np.ndarray) -> np.ndarray:
        tau = np.clip(tau, 0.0, 1.0)
        return tau if self.p == 2 else tau ** (self.p / 2)

    def _score_low_p(self, K64: np.ndarray, R: np.ndarray) -> np.ndarray:
        return self._score_from_tau(_Whitener(R, self.ridge).tau(K64))

    def _limit(
        self, K: np.ndarray, idx: np.ndarray, sc: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep scores ``>= eps``, then the ``max_kept`` best (ties: lower index); sort by index."""
        keep = sc >= self.eps
        K, idx, sc = K[keep], idx[keep], sc[keep]
        if idx.shape[0] > self._max_kept:
            # Capacity mode, or (threshold mode) rounding that pushed scores
            # sitting exactly at eps over the d / eps bound.
            order = np.lexsort((idx, -_tie_key(sc)))[: self._max_kept]
            K, idx, sc = K[order], idx[order], sc[order]
        if idx.shape[0] > 1 and np.any(np.diff(idx) < 0):
            order = np.argsort(idx, kind="stable")
            K, idx, sc = K[order], idx[order], sc[order]
        return K, idx, sc

    def _step_final(
        self,
        R: np.ndarray,
        K: np.ndarray,
        idx: np.ndarray,
        sc: np.ndarray,
        B: np.ndarray,
        idxB: np.ndarray,
    ) -> _LowState:
        """One block scored at its end: exact for the threshold rule (monotone scores)."""
        B64 = B.astype(np.float64, copy=False)
        R = _triu_factor(R, B64)
        if not np.isfinite(R).all():
            raise ValueError("X is too large: the Gram matrix overflows")
        wh = _Whitener(R, self.ridge)
        thr = self.eps ** (2.0 / self.p)
        if thr > 0:
            # Screen: tau(k) = ||T k||^2 <= ||T||_1 ||T||_inf ||k||^2 (Hölder bound on
            # ||T||_2^2), O(d) per row. Rows that cannot reach eps skip the O(d^2)
            # scoring; in a long stream that is nearly all of them.
            with np.errstate(over="ignore", invalid="ignore"):
                # Keys or factors beyond float64 when squared (fine for R and the
                # scores themselves) overflow here and simply stay candidates.
                bound = wh.sq_norm_bound() * (1.0 + 1e-6)
                cand = ~(_row_sq(B64) * bound < thr)
            if not cand.all():
                B, idxB = B[cand], idxB[cand]
        Kc = np.concatenate([K, B])
        new = self._score_from_tau(wh.tau(Kc.astype(np.float64, copy=False)))
        if self._lewis_low:
            new = self._refine_low(Kc, new, sc)
        K, idx, sc = self._limit(Kc, np.concatenate([idx, idxB]), new)
        return R, K, idx, sc

    def _refine_low(self, Kc: np.ndarray, new: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """``p < 2``: tighten ``tau^(p/2)`` by earlier scores and the Lewis certificate.

        Only candidates that still reach ``eps`` are refined; the certificate
        is computed on exactly that subset of the keys (a subset containing
        ``j`` can only raise ``j``'s sensitivity, so it stays an upper bound),
        and its bounds sum to at most ``d``, which caps the set at ``d / eps``.
        """
        new = new.copy()
        n = prev.shape[0]
        new[:n] = np.minimum(new[:n], prev)
        live = np.flatnonzero(new >= self.eps)
        if live.size:
            lw = _lewis_bounds(Kc[live].astype(np.float64), self.p)
            new[live] = np.minimum(new[live], np.clip(lw, 0.0, 1.0))
        return new

    def _step_simulated(
        self,
        R: np.ndarray,
        wh: _Whitener,
        K: np.ndarray,
        idx: np.ndarray,
        B: np.ndarray,
        idxB: np.ndarray,
    ) -> _LowState | None:
        """A sub-block in capacity mode, every row's eviction decided as if fed alone."""
        n, s = K.shape[0], B.shape[0]
        Kc = np.concatenate([K, B])
        idxc = np.concatenate([idx, idxB])
        Y = wh.whiten(Kc.astype(np.float64, copy=False))
        tau0 = _row_sq(Y)
        YB = Y[n:]
        G = YB @ YB.T
        G[np.diag_indices(s)] += 1.0
        C = _chol_upper(G)
        if C is None:
            # I + Y_B Y_B^T >= I in exact arithmetic; in floating point the
            # identity is lost when whitened keys reach ~1e8. The caller then
            # feeds the rows alone, where G = 1 + ||y||^2 fails only on overflow.
            if s > 1:
                return None
            raise ValueError("X is too large: the block update is not positive definite")
        Z = np.ascontiguousarray(YB @ Y.T)
        _forward_sub_upper_t(C, Z)
        cum = np.cumsum(Z * Z, axis=0)
        alive = np.empty(n + s, dtype=np.bool_)
        half_p = self.p / 2
        _simulate_capacity(tau0, cum, idxc, n, self._max_kept, self.eps, half_p, alive)
        R = _triu_factor(R, B.astype(np.float64, copy=False))
        if not np.isfinite(R).all():
            raise ValueError("X is too large: the Gram matrix overflows")
        Kc, idxc = Kc[alive], idxc[alive]
        # Stored scores are always read from the exact factor, never carried.
        new = self._score_low_p(Kc.astype(np.float64, copy=False), R)
        K, idx, sc = self._limit(Kc, idxc, new)
        return R, K, idx, sc

    def _extend_low_p(
        self,
        R: np.ndarray,
        K: np.ndarray,
        idx: np.ndarray,
        sc: np.ndarray,
        X: np.ndarray,
        idxX: np.ndarray,
    ) -> _LowState:
        d = self.n_features
        k = X.shape[0]
        block = max(4096, 2 * self._max_kept, 32 * d)
        pos = 0
        single_until = 0  # rows before this one are simulated one at a time
        while pos < k:
            hi = min(k, pos + block)
            if self.capacity is None or self._max_kept - idx.shape[0] >= hi - pos:
                # Threshold mode, or rows that cannot overflow the capacity.
                R, K, idx, sc = self._step_final(R, K, idx, sc, X[pos:hi], idxX[pos:hi])
                pos = hi
                continue
            wh = _Whitener(R, self.ridge)
            hi = min(k, pos + (1 if pos < single_until else _SIM_ROWS))
            if self.ridge == 0 and wh.rank < d:
                # Woodbury is exact only inside the current range; a row that
                # adds a direction is fed alone (it happens at most d times).
                Bs = X[pos:hi].astype(np.float64)
                V = wh.V
                assert V is not None  # rank < d: the SVD path, which sets V
                resid = np.linalg.norm(Bs - (Bs @ V.T) @ V, axis=1)
                scale = np.maximum(wh.s_max, np.linalg.norm(Bs, axis=1))
                out = np.flatnonzero(resid > _RANK_RTOL * scale)
                if out.size:
                    hi = pos + max(int(out[0]), 1)
                    if out[0] == 0:
                        R, K, idx, sc = self._step_final(R, K, idx, sc, X[pos:hi], idxX[pos:hi])
                        pos = hi
                        continue
            step = self._step_simulated(R, wh, K, idx, X[pos:hi], idxX[pos:hi])
            if step is None:
                single_until = hi
                continue
            R, K, idx, sc = step
            pos = hi
        return R, K, idx, sc

    def _extend_high_p(
        self, K: np.ndarray, idx: np.ndarray, sc: np.ndarray, X: np.ndarray, idxX: np.ndarray
    ) -> _HighState:
        block = max(1024, 2 * self._max_kept, 32 * self.n_features)
        pos, k = 0, X.shape[0]
        while pos < k:
            hi = min(k, pos + block)
            B = X[pos:hi]
            Kc = np.concatenate([K, B])
            K64 = Kc.astype(np.float64, copy=False)
            if not np.isfinite(_row_sq(K64)).all():
                raise ValueError("X is too large: its squared norms overflow")
            bound = _lewis_bounds(K64, self.p)
            prev = np.concatenate([sc, np.ones(hi - pos)])
            new = np.minimum(prev, np.clip(bound, 0.0, 1.0))
            K, idx, sc = self._limit(Kc, np.concatenate([idx, idxX[pos:hi]]), new)
            pos = hi
        return K, idx, sc

    # -- public API ---------------------------------------------------------
    def _resolve_start(self, start_index: Any, n: int) -> int:
        start = resolve_start(start_index, self._next_index, n)
        held = self._indices[: self._n_kept]
        if n and held.size:
            lo, hi = np.searchsorted(held, [start, start + n])
            if hi > lo:
                raise ValueError(
                    f"start_index: position {int(held[lo])} is already held by this set "
                    "(each stream position may be consumed once)"
                )
        return start

    def extend(self, X: Any, start_index: int | None = None) -> UniversalSet:
        """Stream keys ``X`` (shape ``(k, n_features)``) at positions ``start_index + i``.

        Parameters
        ----------
        X : array_like, shape (k, n_features)
            Finite float32/float64 (converted to ``dtype``) or integer keys.
        start_index : int, optional
            Global stream position of ``X[0]``; defaults to right after the
            last key this set consumed (0 when new). Workers that stream
            shards of one sequence pass their shard's offset, so their sets
            merge into the set of the whole sequence.

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            Bad shape, dtype, NaN/Inf, keys so large their Gram overflows,
            or positions already held. The state is unchanged.
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        k = X.shape[0]
        start = self._resolve_start(start_index, k)
        if k:
            idxX = np.arange(start, start + k, dtype=np.int64)
            n = self._n_kept
            K, idx, sc = self._rows[:n], self._indices[:n], self._scores[:n]
            # Everything is computed into new arrays and installed at the end,
            # so a failure mid-way leaves the set as it was.
            if self._low_p:
                R, K, idx, sc = self._extend_low_p(self._factor(), K, idx, sc, X, idxX)
                self._R = R
            else:
                K, idx, sc = self._extend_high_p(K, idx, sc, X, idxX)
            self._install(K, idx, sc)
        self._n_seen += k
        self._next_index = start + k
        return self

    def update(self, x: Any, start_index: int | None = None) -> UniversalSet:
        """Stream one key ``x`` of shape ``(n_features,)``; same as ``extend(x[None])``."""
        row = as_float_vector(x, "x", self.n_features, dtype=self.dtype)
        return self.extend(row[None, :], start_index=start_index)

    def _install(self, K: np.ndarray, idx: np.ndarray, sc: np.ndarray) -> None:
        # Everything that can fail has run: write in place, O(max(n, old n) d)
        # rather than fresh full-size buffers per call.
        n, old = idx.shape[0], self._n_kept
        self._rows[:n] = K
        self._indices[:n] = idx
        self._scores[:n] = sc
        if old > n:
            self._rows[n:old] = 0
            self._indices[n:old] = 0
            self._scores[n:old] = 0
        self._n_kept = n

    def _merge_state(self, other: UniversalSet) -> None:
        a, b = self.indices, other.indices
        common = np.intersect1d(a, b)
        if common.size:
            raise ValueError(
                f"other holds stream position {int(common[0])} too: sets to merge must come "
                "from disjoint positions (use start_index)"
            )
        K = np.concatenate([self.rows, other.rows])
        idx = np.concatenate([a, b])
        prev = np.concatenate([self.scores, other.scores])
        order = np.argsort(idx, kind="stable")
        K, idx, prev = K[order], idx[order], prev[order]
        R: np.ndarray | None
        if self._low_p:
            R = _triu_factor(self._factor(), other._factor())
            if not np.isfinite(R).all():
                raise ValueError("other cannot be merged: the Gram matrix overflows")
            new = self._score_low_p(K.astype(np.float64), R)
            if self._lewis_low:
                new = self._refine_low(K, new, prev)
        else:
            R = None
            new = np.minimum(prev, np.clip(_lewis_bounds(K.astype(np.float64), self.p), 0, 1))
        K, idx, sc = self._limit(K, idx, new)
        if self._low_p:
            self._R = R
        self._install(K, idx, sc)
        self._n_seen += other._n_seen
        self._next_index = max(self._next_index, other._next_index)
