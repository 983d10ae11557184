"""Frequent Directions: a deterministic, mergeable sketch of ``A^T A``.

Liberty (2013) and Ghashami, Liberty, Phillips & Woodruff (2016), the
``2ℓ``-row buffer variant. Rows of ``A`` (shape ``(n, d)``) are appended to a
``(2ℓ, d)`` buffer; when it is full it is replaced by its SVD
``U Σ V^T -> sqrt(max(Σ^2 - σ_ℓ^2, 0)) V^T``, which zeroes every row from the
``ℓ``-th on and frees ``ℓ + 1`` rows. Each such *shrink* subtracts
``δ = σ_ℓ^2`` from the top ``ℓ`` squared singular values; ``Δ = Σ δ`` over all
shrinks is the whole error:

- ``0 ≼ A^T A - B^T B ≼ Δ I``, so ``‖A^T A - B^T B‖_2 ≤ Δ``, and
- every shrink removes at least ``ℓ δ`` of squared Frobenius mass, hence
  ``ℓ Δ ≤ ‖A‖_F^2 - ‖B‖_F^2`` and, for every ``k < ℓ``,
  ``Δ ≤ ‖A - A_k‖_F^2 / (ℓ - k)`` (``A_k``: best rank-``k`` approximation).

Merging two sketches streams one buffer's rows into the other and adds the
``Δ``'s; the argument above goes through unchanged, so the merged sketch
satisfies the same bound for the concatenated stream (the mergeability of
Ghashami et al.), however the merges are arranged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from .._parallel import SINGLE_THREAD_BLAS_WORK, single_threaded_blas
from .._validation import as_float_matrix, check_dtype_arg, check_float, check_int
from ..base import Sketch

__all__ = ["FrequentDirections"]

# Rows of X handled per block in ridge_leverage: bounds its workspace to
# O(block * d) whatever the number of query rows.
_SCORE_BLOCK = 4096


def _svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD ``M = U diag(s) Vt``; returns ``(s, Vt)``, ``s`` in float64, descending."""
    try:
        _, s, Vt = scipy.linalg.svd(M, full_matrices=False, check_finite=False)
    except np.linalg.LinAlgError:
        # gesdd very rarely fails to converge; the QR-iteration driver is
        # slower but more robust.
        _, s, Vt = scipy.linalg.svd(
            M, full_matrices=False, check_finite=False, lapack_driver="gesvd"
        )
    return s.astype(np.float64), Vt


def _sum_squares(X: np.ndarray) -> float:
    """``‖X‖_F^2`` accumulated in float64 (inf when it overflows)."""
    if X.dtype == np.float64:
        v = X.ravel()
        with np.errstate(over="ignore"):
            return float(v @ v)
    with np.errstate(over="ignore"):
        return float(np.einsum("ij,ij->", X, X, dtype=np.float64))


class FrequentDirections(Sketch):
    """Frequent Directions covariance sketch of a row stream (deterministic).

    Parameters
    ----------
    n_features : int
        Width ``d`` of every row.
    sketch_size : int
        ``ℓ >= 1``: :meth:`sketch` returns ``ℓ`` rows; the state holds ``2ℓ``.
    dtype : {numpy.float64, numpy.float32}, default float64
        Dtype of the buffer; inputs are converted to it. ``Δ`` and ``‖A‖_F^2``
        are always accumulated in float64.

    Notes
    -----
    Guarantee (exact arithmetic), for the stream ``A`` of all rows seen,
    including rows of merged sketches, and ``B = sketch()``::

        0 ≼ A^T A - B^T B ≼ Δ I,    Δ = error_bound ≤ ‖A - A_k‖_F^2 / (ℓ - k)

    for every ``0 <= k < ℓ``. With ``k = 0``: ``Δ ≤ ‖A‖_F^2 / ℓ``. When
    ``d < ℓ`` nothing is ever lost (``Δ = 0``, ``B^T B = A^T A``).

    Cost: ``extend`` of ``k`` rows copies them into the buffer in blocks (no
    per-row Python work) and, every ``ℓ + 1`` rows or so, runs one shrink: an
    eigendecomposition of the smaller of the buffer's two Gram matrices
    (``2ℓ x 2ℓ`` or ``d x d``, in float64), O(ℓ d min(ℓ, d)) per shrink,
    amortised O(d min(ℓ, d)) per row. ``extend(X)`` performs exactly the
    same sequence of shrinks as row-by-row :meth:`update`, so the buffers are
    bit-identical (only the float64 ``‖A‖_F^2`` may differ in the last bits).
    Workspace: the ``(2ℓ, d)`` buffer, ``nbytes = 2 ℓ d itemsize + 16``,
    independent of ``n_seen``, plus O(min(ℓ, d)^2 + ℓ d) float64 scratch
    during a shrink.

    Reading (:meth:`sketch`, :meth:`covariance`, :attr:`error_bound`,
    :meth:`ridge_leverage`) never changes the state. When the buffer holds
    more than ``ℓ`` rows, the ``ℓ``-row result is obtained by one more shrink
    by ``σ_{ℓ+1}^2`` applied to a copy; that shrink is included in
    :attr:`error_bound` and keeps the guarantee above (it removes at least
    ``(ℓ + 1) σ_{ℓ+1}^2`` of mass). Repeated reads return identical results.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.rows.frequent_directions import FrequentDirections
    >>> A = np.random.default_rng(0).standard_normal((2000, 50))
    >>> fd = FrequentDirections(50, 20).extend(A)
    >>> err = np.linalg.norm(A.T @ A - fd.covariance(), 2)
    >>> bool(err <= fd.error_bound * (1 + 1e-9) and fd.error_bound <= np.sum(A**2) / 20)
    True
    """

    def __init__(self, n_features: int, sketch_size: int, *, dtype: Any = np.float64) -> None:
        self.n_features = check_int(n_features, "n_features", minimum=1)
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1)
        self.dtype = check_dtype_arg(dtype)
        self._buf = np.zeros((2 * self.sketch_size, self.n_features), dtype=self.dtype)
        # [Δ from the shrinks of the state, ‖A‖_F^2 of the input], float64
        # whatever the buffer dtype so long streams do not lose them.
        self._stats = np.zeros(2, dtype=np.float64)
        self._n_seen = 0
        self._n_filled = 0

    # -- protocol -----------------------------------------------------------
    @classmethod
    def _predicted_nbytes(cls, params: dict[str, Any]) -> int:
        return 16 * int(params["sketch_size"]) * int(params["n_features"]) + 16

    def _params(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "sketch_size": self.sketch_size,
            "dtype": self.dtype.name,
        }

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"buffer": self._buf, "stats": self._stats}

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen, "n_filled": self._n_filled}

    def _check_loaded_state(self) -> None:
        cap = 2 * self.sketch_size
        if self._n_filled >= cap:
            raise ValueError(f"corrupt FrequentDirections blob: n_filled must be < {cap}")
        if self._n_filled > self._n_seen:
            raise ValueError("corrupt FrequentDirections blob: more buffer rows than rows seen")
        if np.any(self._buf[self._n_filled :]):
            raise ValueError("corrupt FrequentDirections blob: unused buffer rows are not zero")
        if np.any(self._stats < 0):
            raise ValueError("corrupt FrequentDirections blob: negative shrinkage or norm")
        if self._n_seen == 0 and np.any(self._stats):
            raise ValueError("corrupt FrequentDirections blob: an empty sketch with statistics")
        self._check_norm(float(self._stats[1]), "corrupt FrequentDirections blob: norm")
        # Every shrink removes at least sketch_size * delta of squared mass
        # from what the buffer holds, so l * Delta + ||B||_F^2 <= ||A||_F^2.
        frob_sq = float(self._stats[1])
        # A corrupt entry near the float64 limit overflows its square; inf is
        # then the right answer (it exceeds any finite norm), not a warning.
        with np.errstate(over="ignore"):
            held = float(np.sum(self._buf[: self._n_filled].astype(np.float64) ** 2))
        slack = 1e-6 * frob_sq + 1e-300
        if held + self.sketch_size * float(self._stats[0]) > frob_sq + slack:
            raise ValueError(
                "corrupt FrequentDirections blob: buffer and shrinkage exceed the stream's norm"
            )

    def _check_norm(self, frob_sq: float, what: str) -> None:
        # Every singular value of the buffer is at most ‖A‖_F, so keeping
        # ‖A‖_F well inside the dtype's range keeps the Gram matrices and SVDs
        # overflow-free.
        if not np.isfinite(frob_sq) or np.sqrt(frob_sq) > np.finfo(self.dtype).max / 4:
            raise ValueError(f"{what} is too large: its squared norm overflows the dtype")

    # -- streaming ----------------------------------------------------------
    def extend(self, X: Any) -> FrequentDirections:
        """Consume rows ``X`` of shape ``(k, n_features)``.

        Parameters
        ----------
        X : array_like, shape (k, n_features)
            float32/float64 (converted to the sketch dtype) or integer rows,
            all finite.

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            Bad shape or dtype, NaN/Inf, or rows so large that ``‖A‖_F^2``
            overflows. The state is unchanged.

        Notes
        -----
        O(k d) copying plus one O(ℓ d min(ℓ, d)) shrink per ``ℓ + 1`` rows.
        """
        X = self._validate_rows(X)
        if X.shape[0] == 0:
            return self
        frob_sq = float(self._stats[1]) + _sum_squares(X)
        self._check_norm(frob_sq, "X")
        self._absorb(X)
        self._stats[1] = frob_sq
        self._n_seen += X.shape[0]
        return self

    def _absorb(self, rows: np.ndarray) -> None:
        """Append ``rows`` to the buffer, shrinking each time it fills up."""
        cap, d = self._buf.shape
        pos, k = 0, rows.shape[0]
        # Small shrinks run faster on one BLAS thread, and far faster when other
        # jobs load the machine; only calls that shrink at all pay the ~20 us
        # switch. A shrink costs buffer rows x columns x the smaller of the two,
        # so buffers below 128 x 1024 or 256 x 256 shrink on one thread.
        small = cap * d * min(cap, d) < SINGLE_THREAD_BLAS_WORK
        with single_threaded_blas(enabled=small and self._n_filled + k >= cap):
            while pos < k:
                take = min(cap - self._n_filled, k - pos)
                self._buf[self._n_filled : self._n_filled + take] = rows[pos : pos + take]
                self._n_filled += take
                pos += take
                if self._n_filled == cap:
                    self._shrink()

    def _shrink(self) -> None:
        # The shrink only needs the squared singular values and the matching
        # directions, so it works on the smaller Gram matrix (eigh is about
        # twice as fast as an SVD of the buffer). Eigenvalues come out with
        # absolute error O(eps ‖buffer‖_2^2), the same order as squared SVD
        # values, and the update is B <- D^(1/2) U^T B with 0 <= D <= I for an
        # orthonormal U, so B^T B can only shrink: B^T B ≼ A^T A is kept even
        # when the eigenvectors are inexact. float64 throughout, whatever the
        # buffer dtype.
        ell = self.sketch_size
        B = self._buf.astype(np.float64, copy=False)
        small_side = B.shape[1] <= B.shape[0]
        G = B.T @ B if small_side else B @ B.T
        lam, vecs = scipy.linalg.eigh(G, check_finite=False, overwrite_a=True)
        lam, vecs = np.maximum(lam[::-1], 0.0), vecs[:, ::-1]
        delta = float(lam[ell - 1]) if lam.shape[0] >= ell else 0.0
        shrunk = lam - delta
        # Eigenvalues are sorted, so the surviving directions are a prefix
        # (at most ℓ - 1 of them, fewer when the buffer is rank deficient).
        keep = int(np.count_nonzero(shrunk > 0))
        if small_side:
            # Eigenvectors of B^T B are the right singular vectors.
            rows = np.sqrt(shrunk[:keep])[:, None] * vecs[:, :keep].T
        else:
            # u_i^T B = σ_i v_i^T; rescale it to sqrt(σ_i^2 - δ) v_i^T.
            rows = np.sqrt(shrunk[:keep] / lam[:keep])[:, None] * (vecs[:, :keep].T @ B)
        self._buf[:keep] = rows
        self._buf[keep:] = 0
        self._n_filled = keep
        self._stats[0] += delta

    def _merge_state(self, other: FrequentDirections) -> None:
        # Read everything from other first: other may be self.
        rows = other._buf[: other._n_filled].copy()
        frob_sq = float(self._stats[1]) + float(other._stats[1])
        other_delta = float(other._stats[0])
        n_other = other._n_seen
        self._check_norm(frob_sq, "other")
        self._absorb(rows)
        self._stats[0] += other_delta
        self._stats[1] = frob_sq
        self._n_seen += n_other

    def merge(self, other: FrequentDirections) -> FrequentDirections:
        """Fold ``other`` into ``self``: the sketch of both streams. Returns ``self``.

        ``other``'s buffered rows are streamed into ``self`` and the
        shrinkages add, so for the concatenated stream ``A``
        ``0 ≼ A^T A - B^T B ≼ Δ I`` and ``Δ ≤ ‖A - A_k‖_F^2 / (ℓ - k)`` for
        every ``k < ℓ``, for any tree of merges. ``other`` is not modified.
        Cost: O(ℓ d min(ℓ, d)).

        Raises
        ------
        TypeError
            ``other`` is not a FrequentDirections.
        ValueError
            ``n_features``, ``sketch_size`` or ``dtype`` differ, or the merged
            norm overflows. The state is unchanged.
        """
        return super().merge(other)

    # -- results ------------------------------------------------------------
    def _factor(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(σ, Vt, δ)`` with ``sketch() ~ diag(σ) Vt`` and δ the read-time shrink."""
        ell, m = self.sketch_size, self._n_filled
        if m == 0:
            return np.zeros(0), np.zeros((0, self.n_features), self.dtype), 0.0
        s, Vt = _svd(self._buf[:m])
        if s.shape[0] <= ell:
            return s, Vt, 0.0
        # More than ℓ directions: shrink a copy by σ_{ℓ+1}^2, which leaves ℓ.
        delta = float(s[ell] ** 2)
        return np.sqrt(np.maximum(s[:ell] ** 2 - delta, 0.0)), Vt[:ell], delta

    def sketch(self) -> np.ndarray:
        """The sketch ``B``: shape ``(ℓ, n_features)``, the sketch dtype (a new array).

        ``0 ≼ A^T A - B^T B ≼ error_bound · I``. When at most ``ℓ`` rows are
        buffered they are returned as they are (zero-padded); otherwise
        ``B = diag(σ') V^T`` from an SVD of the buffer shrunk by
        ``σ_{ℓ+1}^2`` (see the class notes). The state is not modified.
        Cost: O(ℓ d) or, with more than ``ℓ`` rows buffered, O(ℓ d min(ℓ, d)).
        """
        ell = self.sketch_size
        if self._n_filled <= ell:
            head: np.ndarray = self._buf[:ell].copy()
            return head
        sigma, Vt, _ = self._factor()
        B = np.zeros((ell, self.n_features), dtype=self.dtype)
        B[: sigma.shape[0]] = sigma.astype(self.dtype)[:, None] * Vt
        return B

    def covariance(self) -> np.ndarray:
        """``B^T B`` for ``B = sketch()``: shape ``(d, d)``, symmetric PSD, ``≼ A^T A``.

        Cost: O(ℓ d^2) time, O(d^2) output.

        Raises
        ------
        ValueError
            ``B^T B`` overflows the dtype (float32 rows beyond about ``1e19``):
            the state is fine, form ``B^T B`` from :meth:`sketch` in float64.
        """
        B = self.sketch()
        with np.errstate(over="ignore", invalid="ignore"):
            cov: np.ndarray = B.T @ B
        if not np.isfinite(cov).all():
            raise ValueError(
                f"the covariance overflows {self.dtype}; compute sketch().T @ sketch() in float64"
            )
        return cov

    @property
    def error_bound(self) -> float:
        """Certified ``Δ ≥ ‖A^T A - B^T B‖_2`` for ``B = sketch()`` (exact arithmetic).

        Also ``A^T A ≼ B^T B + Δ I`` and ``Δ ≤ ‖A - A_k‖_F^2 / (ℓ - k)`` for
        every ``k < ℓ``. It is :attr:`shrinkage` plus the read-time shrink, if
        any. Cost: O(1), or one SVD of the buffer when it holds more than
        ``ℓ`` rows.
        """
        extra = self._factor()[2] if self._n_filled > self.sketch_size else 0.0
        return float(self._stats[0]) + extra

    @property
    def shrinkage(self) -> float:
        """Total ``Δ`` subtracted by the shrinks of the state (merged sketches add)."""
        return float(self._stats[0])

    @property
    def frobenius_norm_sq(self) -> float:
        """``‖A‖_F^2`` of every row consumed (merged sketches add), float64."""
        return float(self._stats[1])

    def ridge_leverage(self, X: Any, ridge: float) -> np.ndarray:
        """Ridge leverage of rows ``X`` against the sketch: ``x^T (B^T B + λ I)^{-1} x``.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
            Query rows (finite).
        ridge : float
            ``λ > 0``.

        Returns
        -------
        numpy.ndarray, shape (n,), the sketch dtype

        Notes
        -----
        Since ``B^T B ≼ A^T A``, these scores are upper bounds of the exact
        ridge leverage ``τ_A(λ) = x^T (A^T A + λ I)^{-1} x``, and since
        ``A^T A ≼ B^T B + Δ I`` (``Δ = error_bound``) they overestimate by at
        most a factor ``1 + Δ / λ``. :meth:`ridge_leverage_bounds` gives the
        tighter two-sided bracket. Computed from the SVD ``B = Σ V^T``:
        ``τ = Σ_j (v_j·x)^2 / (σ_j^2 + λ) + ‖x - V^T V x‖^2 / λ``.
        Cost: O(ℓ d min(ℓ, d)) once plus O(n d ℓ); workspace O(min(n, 4096) d).
        """
        return self.ridge_leverage_bounds(X, ridge)[1]

    def ridge_leverage_bounds(self, X: Any, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """Certified bracket ``(lower, upper)`` of the exact ridge leverage of rows ``X``.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
            Query rows (finite).
        ridge : float
            ``λ > 0``.

        Returns
        -------
        lower, upper : numpy.ndarray, shape (n,), the sketch dtype
            ``lower = x^T (B^T B + (λ + Δ) I)^{-1} x`` and
            ``upper = x^T (B^T B + λ I)^{-1} x`` with ``B = sketch()`` and
            ``Δ = error_bound``.

        Notes
        -----
        From ``B^T B + λ I ≼ A^T A + λ I ≼ B^T B + (λ + Δ) I`` and the fact
        that matrix inversion reverses the Loewner order::

            lower ≤ x^T (A^T A + λ I)^{-1} x ≤ upper,    upper ≤ (1 + Δ/λ) · lower

        (the last because ``B^T B + (λ + Δ) I ≼ (1 + Δ/λ)(B^T B + λ I)``).
        Same cost as :meth:`ridge_leverage`. Rows whose scores overflow the
        dtype raise ``ValueError`` (never Inf).
        """
        X = as_float_matrix(X, "X", self.n_features)
        lam = check_float(ridge, "ridge", minimum=0.0, strict_minimum=True)
        sigma, Vt, extra = self._factor()
        delta = float(self._stats[0]) + extra
        V = np.ascontiguousarray(Vt, dtype=np.float64)
        sig2 = sigma * sigma
        w_hi, w_lo = 1.0 / (sig2 + lam), 1.0 / (sig2 + lam + delta)
        n = X.shape[0]
        lower = np.empty(n, dtype=np.float64)
        upper = np.empty(n, dtype=np.float64)
        for lo in range(0, n, _SCORE_BLOCK):
            Xb = X[lo : lo + _SCORE_BLOCK].astype(np.float64)
            # Rows too large for float64 scores surface as Inf, refused below.
            with np.errstate(over="ignore", invalid="ignore"):
                C = Xb @ V.T
                # The residual outside span(V) is formed explicitly: ‖x‖^2 - ‖Vx‖^2
                # cancels catastrophically when λ is small.
                R = Xb - C @ V
                res = np.einsum("ij,ij->i", R, R)
                C2 = C * C
                upper[lo : lo + Xb.shape[0]] = C2 @ w_hi + res / lam
                lower[lo : lo + Xb.shape[0]] = C2 @ w_lo + res / (lam + delta)
        if not np.isfinite(upper).all():
            raise ValueError("X is too large: its scores overflow float64")
        with np.errstate(over="ignore"):
            lower, upper = lower.astype(self.dtype), upper.astype(self.dtype)
        if not np.isfinite(upper).all():
            raise ValueError(f"X is too large: its scores overflow {self.dtype}")
        return lower, upper
