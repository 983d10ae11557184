"""Approximate matrix products ``A^T B`` through one shared sketch.

For ``A`` of shape ``(n, d1)`` and ``B`` of shape ``(n, d2)`` (the same rows,
for instance features and targets, or two views of one data set),
``A^T S^T S B`` with an oblivious ``S`` of ``m`` rows is an unbiased estimate
of ``A^T B`` (``E[S^T S] = I`` for all three sketches), computed from the two
small sketches ``SA`` and ``SB`` in one pass over the rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import scipy.sparse

from .._random import SeedLike, seed_to_key
from .._validation import as_float_matrix, check_bool, check_finite, check_float, check_int
from ._blocks import (
    RowSource,
    check_sketch,
    make_sketch,
    progress_bar,
    release_pages,
    require_tqdm,
    sketch_columns,
)

__all__ = ["matmul", "matmul_error_bound"]


def matmul_error_bound(sketch_size: int, delta: float = 0.1) -> float:
    """Relative error ``ε`` that :func:`matmul` meets with probability ``1 - δ``.

    Parameters
    ----------
    sketch_size : int
        ``m >= 1``.
    delta : float
        Failure probability ``δ`` in ``(0, 1)``.

    Returns
    -------
    float
        ``ε = sqrt(2 / (m δ))``: for every fixed ``A`` and ``B`` and each of
        the three sketches,
        ``P(||A^T S^T S B - A^T B||_F > ε ||A||_F ||B||_F) <= δ``.

    Notes
    -----
    From the exact second moment (see :func:`matmul`),
    ``E ||A^T S^T S B - A^T B||_F^2 <= 2 ||A||_F^2 ||B||_F^2 / m``, and
    Chebyshev's (Markov's) inequality. So ``m = ceil(2 / (ε^2 δ))`` rows
    suffice for error ``ε`` with probability ``1 - δ``. The root-mean-square
    error is ``sqrt(2/m) ||A||_F ||B||_F`` at most. For Gaussian sketches the
    dependence on ``δ`` improves to ``m = O(log(1/δ) / ε^2)`` (JL moment
    property; Kane & Nelson 2014), with constants this bound does not state.
    """
    m = check_int(sketch_size, "sketch_size", minimum=1)
    delta = check_float(delta, "delta", minimum=0.0, strict_minimum=True, maximum=1.0)
    if delta >= 1.0:
        raise ValueError(f"delta must be < 1, got {delta}")
    return math.sqrt(2.0 / (m * delta))


def matmul(
    A: Any,
    B: Any,
    sketch_size: int,
    *,
    sketch: str = "countsketch",
    seed: SeedLike = None,
    progress: bool = False,
) -> np.ndarray:
    """Approximate ``A^T B`` by ``(S A)^T (S B)`` with a shared random sketch ``S``.

    Parameters
    ----------
    A : array_like or scipy.sparse matrix, shape (n, d1); or iterable of pairs
        The left factor. With ``B=None``, an iterable (a generator is fine)
        of aligned row-block pairs ``(A_block, B_block)`` of shapes
        ``(k_i, d1)`` and ``(k_i, d2)``, read once.
    B : array_like or scipy.sparse matrix, shape (n, d2), or None
        The right factor, the same rows as ``A``.
    sketch_size : int
        Rows ``m`` of ``S``.
    sketch : {"countsketch", "gaussian", "srht"}
        The sketch. CountSketch (default) costs one pass, ``O(nnz)``,
        whatever ``m``; the Gaussian sketch ``O(m n (d1 + d2))`` is only
        cheaper than the exact product when ``m < d1 d2 / (d1 + d2)``.
    seed : int, numpy.random.Generator or None
        Determines ``S``.
    progress : bool
        Show a tqdm progress bar of the rows read (needs ``tqdm``).

    Returns
    -------
    numpy.ndarray, shape (d1, d2), float64

    Raises
    ------
    TypeError, ValueError
        Bad types, shapes, values (NaN/Inf), or unaligned blocks; a streamed
        block is checked when it is read.

    Notes
    -----
    Guarantee. For fixed ``A``, ``B`` and ``E = A^T S^T S B - A^T B``,
    ``E[E] = 0`` and, with the sketches' hashes modelled as fully random,

    ``E ||E||_F^2 = (||A||_F^2 ||B||_F^2 + ||A^T B||_F^2 - c Σ_i ||a_i||^2 ||b_i||^2) / m``

    with ``c = 0`` for the Gaussian sketch and ``c = 2`` for CountSketch and
    SRHT (``a_i``, ``b_i`` the rows), hence ``E ||E||_F^2 <= 2 ||A||_F^2
    ||B||_F^2 / m`` and ``||E||_F <= sqrt(2/(m δ)) ||A||_F ||B||_F`` with
    probability ``1 - δ`` (:func:`matmul_error_bound`): ``m ~ 2/(ε^2 δ)``.
    For the SRHT the identity holds because ``E_r[h_r h_r^T] = I`` for its
    uniformly sampled Hadamard rows, whatever the random signs, and the
    ``m`` rows are independent given the signs. Gaussian sketches also meet
    ``m = O(log(1/δ)/ε^2)``.

    Cost: one pass over the rows to form ``SA`` and ``SB`` (CountSketch
    ``O(nnz(A) + nnz(B))``, SRHT ``O(n (d1 + d2) log m)``, Gaussian
    ``O(m n (d1 + d2))``) and ``O(m d1 d2)`` for the product, against
    ``O(n d1 d2)`` exactly. Memory ``O(m (d1 + d2))`` plus one block of rows.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.nla import matmul, matmul_error_bound
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((20000, 30)); B = rng.standard_normal((20000, 20))
    >>> err = np.linalg.norm(matmul(A, B, 2000, seed=0) - A.T @ B)
    >>> bool(err <= matmul_error_bound(2000, 0.01) * np.linalg.norm(A) * np.linalg.norm(B))
    True
    """
    m = check_int(sketch_size, "sketch_size", minimum=1)
    kind = check_sketch(sketch)
    progress = check_bool(progress, "progress")
    if B is None:
        if not isinstance(A, Iterable) or isinstance(A, (np.ndarray, str, bytes)):
            raise TypeError(
                "with B=None, A must be an iterable of (A_block, B_block) pairs, "
                f"got {type(A).__name__}"
            )
        pairs, sources = A, None
    else:
        sources = [RowSource(A, "A", streams=False), RowSource(B, "B", streams=False)]
        if sources[0].n_rows != sources[1].n_rows:
            raise ValueError(
                f"A and B must have the same number of rows, got {sources[0].n_rows} "
                f"and {sources[1].n_rows}"
            )
    if progress:
        require_tqdm()
    key = seed_to_key(seed)
    if sources is not None:
        bar = progress_bar(progress, sources[0].n_rows, "sketching A and B")
        SA, SB = sketch_columns(sources, kind, m, key, bar)
    else:
        bar = progress_bar(progress, None, "sketching A and B")
        SA, SB = _sketch_pairs(pairs, kind, m, key, bar)
    if bar is not None:
        bar.close()
    product: np.ndarray = SA.T @ SB
    return product


def _pair_blocks(pairs: Iterable[Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validated ``(A_block, B_block)`` float64 pairs of equal rows and fixed widths."""
    widths: tuple[int, int] | None = None
    start = 0
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"block {i} must be a pair (A_block, B_block)")
        blocks = []
        for name, raw in zip("AB", pair, strict=True):
            what = f"{name} block {i}"
            if scipy.sparse.issparse(raw):
                raw = raw.toarray()
            X = as_float_matrix(raw, what, dtype=np.float64, finite=False)
            check_finite(X, what, row_offset=start)
            blocks.append(X)
        Ab, Bb = blocks
        if Ab.shape[0] != Bb.shape[0]:
            raise ValueError(
                f"block {i}: A_block and B_block must have the same rows, got "
                f"{Ab.shape[0]} and {Bb.shape[0]}"
            )
        if widths is None:
            widths = (Ab.shape[1], Bb.shape[1])
            if 0 in widths:
                raise ValueError(f"block {i}: blocks must have at least one column")
        elif (Ab.shape[1], Bb.shape[1]) != widths:
            raise ValueError(
                f"block {i} has widths ({Ab.shape[1]}, {Bb.shape[1]}), expected {widths}"
            )
        start += Ab.shape[0]
        yield Ab, Bb
        for raw in pair:
            release_pages(raw)
    if start == 0:
        raise ValueError("A yielded no rows")


def _sketch_pairs(
    pairs: Iterable[Any], kind: str, m: int, key: int, bar: Any
) -> tuple[np.ndarray, np.ndarray]:
    sk = None
    d1 = 0
    for Ab, Bb in _pair_blocks(pairs):
        if sk is None:
            d1 = Ab.shape[1]
            sk = make_sketch(kind, d1 + Bb.shape[1], m, key)
        # Side by side: S is generated once per block for both factors.
        sk.extend(np.hstack([Ab, Bb]))
        if bar is not None:
            bar.update(Ab.shape[0])
    assert sk is not None
    SP = sk.result()
    return np.ascontiguousarray(SP[:, :d1]), np.ascontiguousarray(SP[:, d1:])
