"""Online ridge leverage scores in O(d^2) workspace.

For a stream of rows ``x_1, x_2, ...`` in ``R^d`` and a ridge ``lambda > 0``
let ``M_t = sum_{s<=t} x_s x_s^T + lambda I``. The *online ridge leverage* of
row ``t`` is its ridge leverage against every row so far, itself included::

    tau_t = x_t^T M_t^{-1} x_t = u_t / (1 + u_t),   u_t = x_t^T M_{t-1}^{-1} x_t

(the second form is Sherman–Morrison). It lies in ``[0, 1)``, and
``sum_t tau_t <= d log(1 + ||X||_2^2 / lambda)`` (Cohen, Musco & Pachocki,
"Online row sampling", 2016), which is what makes it a one-pass importance
score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg

from .._parallel import SINGLE_THREAD_BLAS_WORK, single_threaded_blas
from .._validation import (
    as_float_matrix,
    as_float_vector,
    check_dtype_arg,
    check_float,
    check_int,
)
from ..base import Sketch

__all__ = ["OnlineRidgeLeverage"]


def _block_plan(d: int) -> tuple[int, bool]:
    """Rows per block for width ``d``, and whether blocks run on one BLAS thread.

    Per row, a block of b rows costs ~3 d^2 (the d x d products) + 2 b d (the
    b x b Gram and C^{-1} X P) + b^2 / 3 (Cholesky) flops, plus a fixed
    Python/LAPACK overhead per block. Below SINGLE_THREAD_BLAS_WORK per
    product (d <= 322 here) the blocks run on one BLAS thread: threaded BLAS
    on small products spin-waits against other jobs (measured at d = 256 on two
    loaded cores: 730 rows/s threaded with 8-row blocks, 38 600 single-threaded
    with 64-row blocks); single-threaded, b ~ d / 2 was fastest (b in 8..256
    measured at d = 64, 256, 512).
    """
    b = min(256, max(64, d // 2))
    return b, b * d * d < SINGLE_THREAD_BLAS_WORK


class _NotPositiveDefinite(Exception):
    """A block's I + X P X^T failed its Cholesky factorisation."""


class OnlineRidgeLeverage(Sketch):
    """Online ridge leverage scores of a row stream, with an exact Gram matrix.

    State: ``M = K^T K + ridge * I`` of every row ``K`` seen so far, kept in
    float64 (the exact refactorisation source), and ``P ~= M^{-1}``, also in
    float64, updated by Woodbury/Sherman–Morrison and rebuilt from ``M``
    (Cholesky) every ``refactor_every`` rows, so rounding in ``P`` never
    accumulates over more than ``refactor_every`` rows.

    Parameters
    ----------
    n_features : int
        Width ``d`` of every row.
    ridge : float
        ``lambda > 0``. It must be positive: the online score of the first
        rows needs ``M_t`` invertible from ``t = 1`` (with ``lambda = 0`` every
        row outside the span of the earlier ones scores exactly 1 and
        ``M_t^{-1}`` does not exist until ``d`` independent rows have been
        seen, so neither Sherman–Morrison nor ``P`` would be defined).
        ``lambda`` also sets the scale below which a direction counts as
        "not yet seen".
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the input rows (inputs are converted to it). ``M`` and ``P``
        are float64 whatever ``dtype`` is: a float32 ``P`` turns indefinite
        under Woodbury rounding on ill-conditioned streams (rank-deficient
        rows with a small ridge), and the state is only ``2 d^2`` numbers.
    refactor_every : int, optional
        Rebuild ``P`` from ``M`` after this many rows (and after every
        :meth:`merge`). Default ``max(1024, 16 * n_features)``; refactoring
        costs ``O(d^3)``, i.e. ``O(d^2 / 16)`` per row at the default.

    Notes
    -----
    **Scores.** :meth:`update` returns ``tau_t`` above; :meth:`extend` returns
    the same scores for a block, equal (to rounding) to a loop of
    :meth:`update`. :meth:`scores` gives the *current* ridge leverage
    ``x^T M^{-1} x`` of arbitrary rows (not added).

    **Blocked algorithm.** For a block ``X`` (``b x d``) with ``P = M^{-1}`` of
    the rows before it, let ``G = I_b + X P X^T = C C^T`` (Cholesky, ``C``
    lower triangular). Eliminating the first ``i - 1`` rows of ``G`` leaves the
    Schur complement ``1 + x_i^T (P - P X_<^T (I + X_< P X_<^T)^{-1} X_< P)
    x_i = 1 + x_i^T (M + X_<^T X_<)^{-1} x_i`` (Woodbury), and that Schur
    complement is ``C_ii^2``. Hence ``u_i = C_ii^2 - 1`` for the ``M`` that
    already holds rows ``1 .. i-1`` of the block, and the online score is
    ``u_i / (1 + u_i)``; ``u_i`` is formed as ``G_ii - 1 - sum_{k<i} C_ik^2``
    (no ``1 +`` rounding, so tiny scores keep their relative accuracy). The
    inverse then moves by Woodbury: ``M_new^{-1} = P - W^T W`` with
    ``W = C^{-1} X P``. The block's products run in float64, so a float32
    sketch loses nothing to cancellation inside a block. If rounding makes
    ``G`` fail its Cholesky (a very ill-conditioned ``M``), the block is
    retried once with ``P`` rebuilt from the exact ``M``; a second failure
    raises ``ValueError`` asking for a larger ridge, state unchanged.

    **Cost.** ``extend`` of ``k`` rows: ``O(k d^2)`` time (blocks of
    ``b = clip(2d, 32, 256)`` rows cost ``O(b d^2 + b^2 d + b^3)`` each, plus
    ``O(d^3)`` per refactorisation; ``b`` shrinks to ``2^18 / d^2`` for
    ``d > 64``); workspace ``O(b d + b^2)`` besides the
    state. ``scores`` of ``k`` rows: ``O(k d^2)``. ``nbytes`` is
    ``16 d^2``, independent of the stream length.

    **Accuracy.** Between refactorisations ``P`` carries Woodbury rounding of
    order ``unit_roundoff(float64) * cond(M)`` per block; the refactorisation
    resets it to the rounding of one Cholesky of the exact ``M``. The tests
    measure the drift: after ``10^6`` float32 rows (``d = 16``) scores stay
    within ``1e-3`` relative of exact float64 ones, float64 within ``1e-8``.

    **Merge.** ``M = M_1 + M_2 - ridge * I`` (the Gram matrices add), then
    ``P`` is refactored: exact, and equal (to rounding) to the sketch of the
    concatenated stream. Online scores already returned are not revisited.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.rows.online import OnlineRidgeLeverage
    >>> X = np.random.default_rng(0).standard_normal((1000, 8))
    >>> ol = OnlineRidgeLeverage(8, ridge=1e-3)
    >>> tau = ol.extend(X)
    >>> tau.shape, bool(tau[0] > 0.99), bool(tau[-1] < 0.05)
    ((1000,), True, True)
    """

    def __init__(
        self,
        n_features: int,
        ridge: float,
        *,
        dtype: Any = np.float64,
        refactor_every: int | None = None,
    ) -> None:
        self.n_features = check_int(n_features, "n_features", minimum=1)
        self.ridge = check_float(ridge, "ridge", minimum=0.0, strict_minimum=True)
        self.dtype = check_dtype_arg(dtype)
        if refactor_every is None:
            refactor_every = max(1024, 16 * self.n_features)
        self.refactor_every = check_int(refactor_every, "refactor_every", minimum=1)
        d = self.n_features
        self._M: npt.NDArray[np.float64] = np.eye(d) * self.ridge
        # M^{-1} is kept in float64 whatever ``dtype``: in float32 the
        # Woodbury updates make it indefinite on ill-conditioned streams
        # (rank-deficient keys with a small ridge), and it is only d^2 numbers.
        self._P: npt.NDArray[np.float64] = np.eye(d) / self.ridge
        self._n_seen = 0
        self._since_refactor = 0

    # -- protocol -----------------------------------------------------------
    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        return 32 * int(params["n_features"]) ** 2

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "ridge": self.ridge,
            "dtype": self.dtype.name,
            "refactor_every": self.refactor_every,
        }

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"M": self._M, "P": self._P}

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen, "since_refactor": self._since_refactor}

    def _check_loaded_state(self) -> None:
        name = type(self).__name__
        M, P = self._M, self._P
        if not np.array_equal(M, M.T):
            raise ValueError(f"corrupt {name} blob: M is not symmetric")
        # diag(M) = ridge + sum of squares, so it can never fall below ridge.
        if np.any(np.diag(M) < self.ridge):
            raise ValueError(f"corrupt {name} blob: M is not K^T K + ridge I")
        try:
            np.linalg.cholesky(M)
        except np.linalg.LinAlgError:
            raise ValueError(f"corrupt {name} blob: M is not positive definite") from None
        eig = np.linalg.eigvalsh(M)
        if eig[0] < self.ridge * (1 - 1e-9) - 1e-12 * eig[-1]:
            raise ValueError(f"corrupt {name} blob: M - ridge I is not positive semidefinite")
        if self._n_seen == 0 and not np.array_equal(M, np.eye(self.n_features) * self.ridge):
            raise ValueError(f"corrupt {name} blob: an empty sketch must hold M = ridge I")
        scale = np.abs(P).max()
        if np.abs(P - P.T).max() > 1e-5 * scale or np.any(np.diag(P) <= 0):
            raise ValueError(f"corrupt {name} blob: P is not a symmetric positive inverse")
        if self._since_refactor > self.refactor_every or self._since_refactor > self._n_seen:
            raise ValueError(f"corrupt {name} blob: since_refactor is out of range")
        # P must be the inverse of M up to the float64 drift refactor_every allows.
        tol = min(0.1, max(1e-6, 1e3 * np.finfo(np.float64).eps * eig[-1] / eig[0]))
        # A forged entry near the float64 limit overflows the product; the
        # resulting inf / nan residual is refused below, so no warning is due.
        with np.errstate(over="ignore", invalid="ignore"):
            resid = np.abs(P.astype(np.float64) @ M - np.eye(self.n_features)).max()
        if not resid < tol:
            raise ValueError(f"corrupt {name} blob: P is not the inverse of M")

    # -- core -----------------------------------------------------------------
    @staticmethod
    def _inverse(M: np.ndarray) -> np.ndarray:
        try:
            L = scipy.linalg.cholesky(M, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise ValueError(
                "the Gram matrix is numerically singular in float64 (overflow, or a "
                "ridge too small for the rows' scale); raise ridge"
            ) from None
        # M^{-1} = L^{-T} L^{-1}; LAPACK trtri plus one product avoids a
        # triangular solve with d right-hand sides (threaded, slow when busy).
        Linv, info = scipy.linalg.lapack.dtrtri(L, lower=1)
        if info != 0:  # pragma: no cover - L has a positive diagonal
            raise ValueError("the Gram matrix is singular")
        Linv = np.tril(Linv)
        P = Linv.T @ Linv
        sym: npt.NDArray[np.float64] = 0.5 * (P + P.T)
        return sym

    def _block(
        self, X: np.ndarray, M: np.ndarray, P: np.ndarray, out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Online scores of block ``X`` into ``out``; returns the new ``(M, P)``."""
        b = X.shape[0]
        # The b x d and b x b products run in float64 whatever dtype is: with
        # float32 products, u_i = G_ii - sum_k C_ik^2 would cancel float32
        # rounding of G whenever rows in a block are nearly dependent.
        X64 = X.astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            XP = X64 @ P.astype(np.float64, copy=False)
            G = XP @ X64.T
        if not np.isfinite(G).all():
            raise ValueError("X is too large: its scores overflow")
        u0 = np.diag(G).copy()
        G[np.diag_indices(b)] += 1.0
        try:
            C = scipy.linalg.cholesky(G, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise _NotPositiveDefinite from None
        off = np.tril(C, -1)
        u = np.maximum(u0 - np.einsum("ij,ij->i", off, off), 0.0)
        out[:] = u / (1.0 + u)
        # C^{-1} by LAPACK trtri (unblocked for these sizes) then a product:
        # cheaper here than a threaded triangular solve with d right-hand sides.
        Cinv, info = scipy.linalg.lapack.dtrtri(C, lower=1)
        if info != 0:  # pragma: no cover - C has a positive diagonal
            raise ValueError("X is too large: the update is singular")
        W = np.tril(Cinv) @ XP
        with np.errstate(over="ignore", invalid="ignore"):
            P = P - W.T @ W
            M = M + X64.T @ X64
        if not (np.isfinite(M).all() and np.isfinite(P).all()):
            raise ValueError("X is too large: the Gram matrix overflows")
        return M, P

    def extend(self, X: Any) -> np.ndarray:
        """Add rows ``X`` and return their online ridge leverage scores.

        Parameters
        ----------
        X : array_like, shape (k, n_features)
            Finite float32/float64 (converted to ``dtype``) or integer rows.

        Returns
        -------
        numpy.ndarray, shape (k,), float64
            ``tau_i = x_i^T M_i^{-1} x_i`` where ``M_i`` holds every earlier
            row and ``x_i`` itself; equal (to rounding) to ``k`` calls of
            :meth:`update`.

        Raises
        ------
        ValueError, TypeError
            Bad shape or dtype, NaN/Inf, or rows so large the Gram matrix
            overflows. The state is unchanged.
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        k = X.shape[0]
        out = np.empty(k, dtype=np.float64)
        # Work on copies of the small state so a failure half-way through a
        # long block leaves the sketch as it was.
        M, P, since = self._M, self._P, self._since_refactor
        step, single = _block_plan(self.n_features)
        lo = 0
        with single_threaded_blas(enabled=single and k > 1):
            while lo < k:
                # Blocks end at refactorisation points, so where refactoring
                # happens depends only on n_seen, not on how the stream is chunked.
                hi = min(k, lo + step, lo + self.refactor_every - since)
                try:
                    M, P = self._block(X[lo:hi], M, P, out[lo:hi])
                except _NotPositiveDefinite:
                    # Rounding in the Woodbury-updated inverse can make I + X P X^T
                    # indefinite on ill-conditioned streams: retry from the exact M.
                    try:
                        M, P = self._block(X[lo:hi], M, self._inverse(M), out[lo:hi])
                    except _NotPositiveDefinite:
                        raise ValueError(
                            f"X: the stream is too ill-conditioned for ridge={self.ridge:g} "
                            "(I + X M^-1 X^T is not positive definite in float64); raise ridge"
                        ) from None
                since += hi - lo
                if since >= self.refactor_every:
                    P = self._inverse(M)
                    since = 0
                lo = hi
        self._M, self._P, self._since_refactor = M, P, since
        self._n_seen += k
        return out

    def update(self, x: Any) -> float:
        """Add one row ``x`` (shape ``(n_features,)``) and return its online score.

        ``tau = x^T M^{-1} x`` with ``M`` including ``x``, i.e. ``u / (1 + u)``
        with ``u = x^T M_prev^{-1} x``. Same as ``extend(x[None])[0]``; O(d^2).
        """
        return float(super().update(x)[0])

    def scores(self, X: Any) -> np.ndarray:
        """Current ridge leverage ``x^T M^{-1} x`` of each row of ``X`` (not added).

        Parameters
        ----------
        X : array_like, shape (k, n_features)

        Returns
        -------
        numpy.ndarray, shape (k,), float64
            Computed with ``P`` (at most ``refactor_every`` rows of drift).
            O(k d^2) time, O(k d) workspace.

        Raises
        ------
        ValueError, TypeError
            Bad shape or dtype, NaN/Inf, or rows so large that a score
            overflows float64 (rather than returning Inf).
        """
        X = as_float_matrix(X, "X", self.n_features, dtype=self.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            XP = X @ self._P
            out: npt.NDArray[np.float64] = np.einsum("ij,ij->i", XP, X, dtype=np.float64)
        if not np.isfinite(out).all():
            raise ValueError("X is too large: its scores overflow float64")
        return np.maximum(out, 0.0)

    def score(self, x: Any) -> float:
        """Current ridge leverage of one row ``x`` (not added); see :meth:`scores`."""
        row = as_float_vector(x, "x", self.n_features, dtype=self.dtype)
        return float(self.scores(row[None, :])[0])

    def refactor(self) -> OnlineRidgeLeverage:
        """Rebuild ``P`` from the exact ``M`` now (Cholesky, O(d^3)). Returns self."""
        self._P = self._inverse(self._M)
        self._since_refactor = 0
        return self

    def _merge_state(self, other: OnlineRidgeLeverage) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            M = self._M + other._M
            M[np.diag_indices(self.n_features)] -= self.ridge
        if not np.isfinite(M).all():
            raise ValueError("other cannot be merged: the Gram matrix overflows")
        P = self._inverse(M)
        self._M, self._P = M, P
        self._since_refactor = 0
        self._n_seen += other._n_seen

    # -- results --------------------------------------------------------------
    @property
    def gram(self) -> np.ndarray:
        """``K^T K + ridge * I`` of all rows seen, (d, d) float64 (a copy)."""
        M: npt.NDArray[np.float64] = self._M.copy()
        return M

    @property
    def inverse(self) -> np.ndarray:
        """The maintained ``M^{-1}``, (d, d) float64 (a copy)."""
        P: npt.NDArray[np.float64] = self._P.copy()
        return P
