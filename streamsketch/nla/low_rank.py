"""Truncated SVDs: randomized (in memory), Frequent Directions and a one-pass linear sketch.

Three routes to ``A ≈ U diag(s) Vt`` of rank ``k`` for ``A`` of shape ``(n, d)``:

``"randomized"``
    Halko, Martinsson & Tropp (2011), Algorithms 4.3/4.4 and 5.1: a Gaussian
    test matrix, power (subspace) iterations orthonormalised at every step,
    and the last product ``A^T Q`` reused as the projected matrix. Needs the
    whole matrix (``2q + 2`` passes for ``q`` power iterations).
``"frequent-directions"``
    :class:`~streamsketch.FrequentDirections` over the row stream gives the
    top right singular directions ``V``; a second pass forms ``A V`` and its
    SVD. Two passes, ``O(ℓ d)`` sketch memory.
``"streaming"``
    The two-sided linear sketch of Tropp, Yurtsever, Udell & Cevher,
    "Practical sketching algorithms for low-rank matrix approximation",
    SIAM J. Matrix Anal. Appl. 38(4), 2017 (low-rank reconstruction and its
    fixed-rank truncation): one
    pass keeps the range sketch ``Y = A Ω`` and the co-range sketch
    ``W = Ψ A`` and never holds ``A``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse

from .._random import SeedLike, derive_key, key_generator, seed_to_key
from .._validation import as_float_matrix, check_bool, check_int
from ..rows.frequent_directions import FrequentDirections
from ._blocks import (
    RowSource,
    check_sketch,
    make_sketch,
    progress_bar,
    require_tqdm,
)

__all__ = ["low_rank"]

_METHODS = ("randomized", "frequent-directions", "streaming")

# n_iter="auto": power iterations stop once one lowers the squared Frobenius
# error of the rank-k approximation by less than this fraction, or after
# _AUTO_MAX_ITER (sklearn's randomized_svd default for small ranks).
_AUTO_TOL = 1e-2
_AUTO_MAX_ITER = 7
# CholeskyQR2 is accurate to machine precision when cond(Y) is below about
# eps^-1/2 (Yamamoto et al. 2015). The ratio of the extreme diagonal entries
# of the first Cholesky factor (a lower bound on cond(Y)) must stay well
# inside that, else Householder QR is used.
_CHOLQR_MAX_COND = 1e5
# Co-range rows per range column of the one-pass sketch. The co-range sketch
# Ψ A is (m, d), small next to the (n, ℓ) range sketch of a long stream, and
# its error factor 1 + ℓ/(m - ℓ - 1) (Tropp et al. 2017, Gaussian case) falls from
# 2 at m = 2ℓ + 1 to about 4/3 here.
_CORANGE_FACTOR = 4


def _orth(Y: np.ndarray, passes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Thin ``Y = Q R`` of a tall float64 ``Y`` (which is consumed), ``Q`` with orthonormal columns.

    Cholesky QR (a Gram matrix, a Cholesky factor and a triangular solve, all
    BLAS-3 and in place in ``Y``, several times faster than Householder QR on
    tall thin blocks), repeated ``passes`` times: two passes (CholeskyQR2)
    are orthonormal to machine precision when ``cond(Y)`` is below about
    ``eps^-1/2`` (Yamamoto et al. 2015); one pass leaves an orthogonality
    error of about ``eps cond(Y)^2``, enough for the inner steps of the power
    iteration. Householder QR when ``Y`` looks too ill-conditioned for it;
    ``passes=0`` asks for Householder directly (short blocks, where its cost
    does not matter and fewer BLAS calls do: each call pays a thread
    start-up, which a loaded machine stretches).
    """
    Y = np.ascontiguousarray(Y)
    R = None
    try:
        for _ in range(passes):
            Rp = scipy.linalg.cholesky(Y.T @ Y, check_finite=False)
            diag = np.abs(np.diag(Rp))
            if diag.min() * _CHOLQR_MAX_COND <= diag.max():
                break
            # Y R^-1 as (R^-T Y^T): Y.T is Fortran-ordered, so BLAS trsm
            # overwrites Y itself (no second (n, l) array).
            Y = scipy.linalg.blas.dtrsm(1.0, Rp, Y.T, side=0, lower=0, trans_a=1, overwrite_b=1).T
            R = Rp if R is None else Rp @ R
        else:
            if passes:
                assert R is not None  # the loop ran ``passes >= 1`` times without a break
                return np.ascontiguousarray(Y), R
    except np.linalg.LinAlgError:
        pass
    # Ill-conditioned (or short): Householder on what is left of Y, which
    # spans the same space as the input.
    Q, R2 = scipy.linalg.qr(Y, mode="economic", overwrite_a=True, check_finite=False)
    return Q, R2 if R is None else R2 @ R


def _check_n_iter(n_iter: Any) -> int | None:
    if isinstance(n_iter, str):
        if n_iter != "auto":
            raise ValueError(f"n_iter must be 'auto' or an integer >= 0, got {n_iter!r}")
        return None
    return check_int(n_iter, "n_iter", minimum=0, maximum=100)


def low_rank(
    A: Any,
    rank: int,
    *,
    method: str = "randomized",
    oversample: int = 10,
    n_iter: int | str = "auto",
    sketch: str = "srht",
    seed: SeedLike = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` truncated SVD ``A ≈ U diag(s) Vt`` by sketching.

    Parameters
    ----------
    A : array_like, scipy.sparse matrix or iterable of row blocks, shape (n, d)
        The matrix. ``"randomized"`` needs it whole (an array, a memmap or a
        sparse matrix). The streaming methods also take any iterable of 2-D
        row blocks of equal width (a generator, a list of slices of
        ``numpy.load(path, mmap_mode="r")``); ``"frequent-directions"``
        reads it twice, so a one-shot iterator (a generator) is refused
        there. Values are finite float32/float64/integers, computed in
        float64.
    rank : int
        ``k``, with ``1 <= k <= min(n, d)``.
    method : {"randomized", "frequent-directions", "streaming"}
        See the module docstring and Notes.
    oversample : int
        ``p >= 0``: the sketches have ``ℓ = k + p`` columns (range sketch,
        Frequent Directions rows, Tropp's ``k``), capped at ``min(n, d)``
        for ``"randomized"``.
    n_iter : int or "auto"
        Power iterations of ``"randomized"`` (ignored by the others).
        ``"auto"`` (default) stops once an iteration lowers the squared
        Frobenius error of the rank-``k`` result, which the algorithm knows
        exactly at every step, by less than 1%, and after 7 at most.
    sketch : {"srht", "countsketch", "gaussian"}
        The co-range sketch ``Ψ`` of ``"streaming"`` (ignored by the others).
        The three give the same accuracy in our measurements; the SRHT
        (default) and CountSketch cost ``O(n d log m)`` and ``O(n d)``, the
        Gaussian sketch ``O(m n d)``.
    seed : int, numpy.random.Generator or None
        Fixes the random test matrices (Frequent Directions is
        deterministic).
    progress : bool
        Show a tqdm progress bar (rows read, or power iterations for
        ``"randomized"``). Needs the optional package ``tqdm``.

    Returns
    -------
    U : numpy.ndarray, shape (n, k), float64, orthonormal columns
    s : numpy.ndarray, shape (k,), float64, non-increasing, >= 0
    Vt : numpy.ndarray, shape (k, d), float64, orthonormal rows

    Raises
    ------
    TypeError
        Bad argument types; a one-shot iterator for ``"randomized"``.
    ValueError
        Bad shapes or values, NaN/Inf (also in a streamed block, raised
        when it is read), ``rank`` out of range, a one-shot iterator for
        ``"frequent-directions"``.
    ImportError
        ``progress=True`` without tqdm.

    Notes
    -----
    Write ``A_k`` for the best rank-``k`` approximation, ``σ_j`` for the
    singular values of ``A`` and ``τ_{j}^2 = Σ_{i >= j} σ_i^2``.

    ``"randomized"``, ``ℓ = k + p`` and ``q`` power iterations (Halko,
    Martinsson & Tropp 2011, Section 10, average-case bounds): for
    ``p >= 2``, ``E ||A - Q Q^T A||_F <= (1 + k/(p-1))^{1/2} τ_{k+1}`` with no
    power iteration, and the spectral error obeys
    ``E ||A - Q Q^T A||_2 <= [(1 + sqrt(k/(p-1))) σ_{k+1}^{2q+1}
    + e sqrt(ℓ)/p (Σ_{j>k} σ_j^{2(2q+1)})^{1/2}]^{1/(2q+1)}``, so each
    iteration pulls the error towards ``σ_{k+1}``; the returned rank-``k``
    truncation of ``Q Q^T A`` loses at most another ``τ_{k+1}`` (Frobenius).
    Cost: ``2q + 2`` passes over ``A`` of ``O(nnz(A) ℓ)`` each and
    ``O((n + d) ℓ^2)`` for orthonormalisation (one Cholesky QR pass per inner
    step, CholeskyQR2 for the final bases, Householder QR for blocks too
    ill-conditioned for Cholesky QR); memory ``O((n + d) ℓ)`` besides ``A``.

    ``"frequent-directions"`` with ``ℓ = k + p`` rows: the right factor
    ``V_k`` of the sketch ``B`` satisfies ``A^T A - Δ I ≼ B^T B ≼ A^T A`` with
    ``Δ <= τ_{k+1}^2 / (ℓ - k)``, hence the result ``A V_k V_k^T`` has
    ``||A - A V_k V_k^T||_F^2 <= ||A - A_k||_F^2 + k Δ
    <= (1 + k/p) ||A - A_k||_F^2`` (deterministic; Ghashami, Liberty, Phillips
    & Woodruff 2016). Cost: pass 1 ``O(n d ℓ)`` (one shrink per ``ℓ + 1``
    rows), pass 2 ``O(n d k)`` plus ``O(n k^2)``; memory ``O(ℓ d)`` for the
    sketch plus the ``(n, k)`` output.

    ``"streaming"`` with range width ``ℓ = k + p`` and co-range width
    ``m = 4ℓ`` (Tropp et al. 2017): ``Y = A Ω`` (``Ω`` Gaussian,
    ``d x ℓ``), ``W = Ψ A`` (``Ψ`` the ``sketch``, ``m x n``), ``Q = orth(Y)``,
    ``X = (ΨQ)^+ W`` and the rank-``k`` truncation of ``Q X``. For Gaussian
    ``Ω, Ψ`` their error bound for the reconstruction is
    ``E ||A - Q X||_F^2 <= (1 + f(ℓ, m)) min_{ρ < ℓ-1} (1 + f(ρ, ℓ)) τ_{ρ+1}^2``
    with ``f(s, t) = s / (t - s - 1)`` (here ``1 + f(ℓ, m) ≈ 4/3``), and their
    fixed-rank bound ``E ||A - [Q X]_k||_F <= τ_{k+1} + 2 (E ||A - Q X||_F^2)^{1/2}``.
    With no power iteration the range sketch is the weak part: on slowly
    decaying spectra the error is typically 1.3-1.5 times the optimal
    (``docs/nla.md``); a larger ``oversample`` helps, and
    ``"frequent-directions"`` is near optimal when two passes are possible.
    One pass: ``O(n d ℓ)`` for ``Y`` plus the cost of ``Ψ`` on the rows
    (SRHT ``O(n d log m)``), then ``O(n ℓ^2 + m ℓ d)``. Memory: ``Y`` and the
    output, ``O(n ℓ)``, plus ``O(m d)``; never ``A`` (memmap pages are
    released as they are read, see :mod:`streamsketch.nla`).

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.nla import low_rank
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 300))
    >>> U, s, Vt = low_rank(A, 8, seed=0)
    >>> bool(np.allclose((U * s) @ Vt, A))
    True
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    src = RowSource(A, "A", streams=method != "randomized")
    n, d = src.n_rows, src.n_features
    rank = check_int(rank, "rank", minimum=1, maximum=None if d is None else min(n or d, d))
    oversample = check_int(oversample, "oversample", minimum=0)
    iters = _check_n_iter(n_iter)
    kind = check_sketch(sketch)
    progress = check_bool(progress, "progress")
    if method == "frequent-directions" and not src.reiterable:
        raise ValueError(
            "method='frequent-directions' reads A twice; pass an array, a memmap or a list "
            "of blocks (not a one-shot iterator), or use method='streaming'"
        )
    if progress:
        require_tqdm()
    key = seed_to_key(seed)
    if method == "randomized":
        return _randomized(src, rank, oversample, iters, key, progress)
    if method == "frequent-directions":
        return _frequent_directions(src, rank, oversample, progress)
    return _streaming(src, rank, oversample, kind, key, progress)


def _randomized(
    src: RowSource, k: int, p: int, n_iter: int | None, key: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    A = src.array if src.sparse else as_float_matrix(src.array, "A", dtype=np.float64)
    n, d = A.shape
    # The tall side carries the orthonormal basis Q; the short side is cheap.
    flip = n < d
    X = A.T if flip else A
    if flip:
        n, d = d, n
    ell = min(k + p, d)
    if src.sparse:
        nonzeros = np.asarray(X.data)
        fro2 = float(np.sum(nonzeros**2))
    else:
        fro2 = float(np.einsum("ij,ij->", X, X))
    if not math.isfinite(fro2):
        raise ValueError("A is too large: its squared norm overflows float64")
    floor = 1e3 * np.finfo(np.float64).eps * fro2
    bar = progress_bar(
        progress, _AUTO_MAX_ITER if n_iter is None else n_iter, "power iterations", unit="it"
    )
    omega = key_generator(derive_key(key, 1)).standard_normal((d, ell))
    # Inner steps need well-conditioned bases, not exactly orthonormal ones:
    # one Cholesky QR pass each (a few BLAS-3 calls; Householder QR of a thin
    # block is dozens of BLAS-2 calls, each of which a loaded machine can
    # stall). Both last bases are finished below.
    Q, _ = _orth(np.asarray(X @ omega), passes=1)
    prev = math.inf
    it = 0
    while True:
        # X ≈ Q Q^T X = Q (W R)^T: the approximation of this subspace, with
        # its Frobenius error ||X||_F^2 - Σ_{j<=k} σ_j(R)^2 (to the accuracy
        # of one Cholesky QR pass, plenty for the stopping rule).
        W, R = _orth(np.asarray(X.T @ Q), passes=1)
        if n_iter is not None:
            done = it >= n_iter
        else:
            sb = np.linalg.svd(R, compute_uv=False)
            err2 = fro2 - float(np.sum(sb[:k] ** 2))
            done = it >= _AUTO_MAX_ITER or prev - err2 <= max(_AUTO_TOL * err2, floor)
            prev = err2
        if done:
            break
        it += 1
        Q, _ = _orth(np.asarray(X @ W), passes=1)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # Second passes: W = W2 Rw and Q = Q2 Rq with W2, Q2 orthonormal to
    # machine precision, so Q2^T X = Rq^{-T} Q^T X = Rq^{-T} (Rw R)^T W2^T.
    W, Rw = _orth(W, passes=1)
    Q, Rq = _orth(Q, passes=1)
    M = scipy.linalg.solve_triangular(Rq, (Rw @ R).T, trans="T", check_finite=False)
    Ub, sb, Vbt = scipy.linalg.svd(M, check_finite=False)
    U = Q @ Ub[:, :k]
    Vt = Vbt[:k] @ W.T
    s = sb[:k].copy()
    if flip:
        return np.ascontiguousarray(Vt.T), s, np.ascontiguousarray(U.T)
    return U, s, Vt


def _frequent_directions(
    src: RowSource, k: int, p: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fd: FrequentDirections | None = None
    bar = progress_bar(progress, src.n_rows, "frequent directions, pass 1/2")
    for _, block in src.blocks():
        if fd is None:
            fd = FrequentDirections(block.shape[1], k + p)
        fd.extend(block)
        if bar is not None:
            bar.update(block.shape[0])
    if bar is not None:
        bar.close()
    assert fd is not None
    d = fd.n_features
    _check_rank_after_stream(k, fd.n_seen, d)
    # min(ℓ, d) >= k orthonormal rows, also where the sketch is rank deficient.
    _, _, Vbt = scipy.linalg.svd(fd.sketch(), full_matrices=False, check_finite=False)
    V = np.ascontiguousarray(Vbt[:k].T)
    bar = progress_bar(progress, fd.n_seen, "frequent directions, pass 2/2")
    parts = []
    for _, block in src.blocks(n_features=d):
        parts.append(block @ V)
        if bar is not None:
            bar.update(block.shape[0])
    if bar is not None:
        bar.close()
    P = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if P.shape[0] != fd.n_seen:
        raise ValueError("A yielded a different number of rows on its second pass")
    Up, s, Wt = scipy.linalg.svd(P, full_matrices=False, check_finite=False)
    return np.ascontiguousarray(Up), s, np.ascontiguousarray(Wt @ V.T)


def _check_rank_after_stream(k: int, n: int, d: int) -> None:
    if k > min(n, d):
        raise ValueError(f"rank must be <= min(n, d) = {min(n, d)}, got {k}")


def _streaming(
    src: RowSource, k: int, p: int, kind: str, key: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ell = k + p
    m = _CORANGE_FACTOR * ell
    psi = None
    omega = np.empty((0, 0))
    bar = progress_bar(progress, src.n_rows, "streaming sketch")
    parts: list[np.ndarray] = []
    Y = None if src.n_rows is None else np.empty((src.n_rows, ell))
    for start, block in src.blocks():
        if psi is None:
            d = block.shape[1]
            omega = key_generator(derive_key(key, 1)).standard_normal((d, ell))
            psi = make_sketch(kind, d, m, derive_key(key, 2))
        if Y is not None:
            np.matmul(block, omega, out=Y[start : start + block.shape[0]])
        else:
            parts.append(block @ omega)
        psi.extend(block, start_index=start)
        if bar is not None:
            bar.update(block.shape[0])
    if bar is not None:
        bar.close()
    assert psi is not None
    n, d = psi.n_seen, psi.n_features
    _check_rank_after_stream(k, n, d)
    if Y is None:
        Y = np.concatenate(parts) if len(parts) > 1 else parts[0]
        del parts
    W = psi.result()
    Q, _ = _orth(Y) if n >= ell else scipy.linalg.qr(Y, mode="economic", check_finite=False)
    del Y
    # The same Ψ (same key, same positions) applied to the rows of Q.
    psi_q = make_sketch(kind, Q.shape[1], m, derive_key(key, 2)).extend(Q).result()
    X = scipy.linalg.lstsq(psi_q, W, check_finite=False)[0]
    Ux, s, Vt = scipy.linalg.svd(X, full_matrices=False, check_finite=False)
    return np.ascontiguousarray(Q @ Ux[:, :k]), s[:k].copy(), np.ascontiguousarray(Vt[:k])
