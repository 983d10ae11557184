"""Sketches of dask arrays through dask's own tree reduction.

A tall ``dask.array`` (``n x d``, chunked by rows) becomes one sketch: every
row chunk is sketched by its own task (``map_blocks``), then the chunk
sketches are merged by :func:`dask.array.reduction` in a tree whose fan-in is
``split_every``. Whatever runs the graph runs the sketch: the local threaded
or synchronous scheduler, or a ``dask.distributed`` cluster (a ``Client`` in
scope). Sketches travel between tasks as their
:meth:`~streamsketch.base.Serializable.to_bytes` blobs, never pickled.

What "the same as the in-memory stream" means
----------------------------------------------
Row chunk ``i`` starts at global row ``offset_i`` (the sum of the earlier
chunk lengths). Position-aware sketches (the linear row sketches,
:class:`~streamsketch.rows.UniversalSet`, MergeReduce trees over them) are
extended with ``start_index=offset_i``, so their hashes and kept indices are
those of the global rows, and the tree merges chunks in row order (left
before right). The result therefore equals one sketch fed the rows in order
exactly where the class's merge is exact: linear sketches and
:class:`~streamsketch.rows.OnlineRidgeLeverage`'s Gram matrix (to the
rounding of the additions), :class:`~streamsketch.rows.UniversalSet` with
``p = 2`` and no capacity (the same indices: the set after a merge is the set
of keys whose score against the merged Gram reaches ``eps``). Other
sketches keep their merge guarantee (Frequent Directions' error bound,
merge-and-reduce error growth). What the merge cannot carry is lost: the
per-row online scores that ``OnlineRidgeLeverage.extend`` returns depend on
the prefix and are not part of the result (its final Gram matrix is exact,
so :meth:`~streamsketch.rows.OnlineRidgeLeverage.scores` of any row is).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import dask.array as da
import numpy as np

from ._validation import check_float, check_int
from .base import Sketch
from .linear.countsketch import CountSketch
from .rows.leverage import _default_sketch_size, _rank_tol, _row_sq_norms_of_product
from .rows.merge_reduce import MergeReduce

__all__ = ["leverage_scores", "sketch"]

_SketchT = TypeVar("_SketchT", bound=Sketch)


def _takes_positions(template: Sketch) -> bool:
    # A MergeReduce tree takes positions exactly when its reducer does.
    probe = template.make() if isinstance(template, MergeReduce) else template
    return "start_index" in inspect.signature(probe.extend).parameters


def _one(value: Any, keepdims: bool) -> np.ndarray:
    """``value`` in a (1,) or () object array: the unit dask passes between tasks."""
    out = np.empty((1,) if keepdims else (), dtype=object)
    out.reshape(-1)[0] = value  # item assignment: numpy never unpacks the bytes
    return out


def _sketch_block(
    block: np.ndarray,
    cls: type[Sketch],
    params: dict[str, Any],
    positional: bool,
    block_info: Any = None,
) -> np.ndarray:
    sk = cls._from_params(params)
    if positional:
        sk.extend(block, start_index=int(block_info[0]["array-location"][0][0]))
    else:
        sk.extend(block)
    return _one(sk.to_bytes(), keepdims=True)


def _identity(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return x


def _merge_blobs(parts: list[np.ndarray], axis: Any, keepdims: bool, cls: type[Sketch]) -> Any:
    # ``parts`` are contiguous chunk results in row order: fold left to right.
    blobs = [b for p in parts for b in p.reshape(-1)]
    acc = cls.from_bytes(blobs[0])
    for blob in blobs[1:]:
        acc.merge(cls.from_bytes(blob))
    return _one(acc.to_bytes(), keepdims)


def sketch(
    array: Any, make_sketch: Callable[[], _SketchT], split_every: int | None = None
) -> _SketchT:
    """Sketch the rows of a 2-D dask array with a tree reduction over its row chunks.

    Parameters
    ----------
    array : dask.array.Array, shape (n, d)
        The rows, chunked along axis 0 (column chunks are joined first:
        each task needs whole rows). Float32/float64 or integer; the sketch
        validates every chunk (NaN/Inf raise when the graph runs).
    make_sketch : callable
        ``make_sketch()`` returns an empty :class:`~streamsketch.base.Sketch`
        with ``n_features == d`` whose ``extend`` takes rows alone, e.g.
        ``lambda: UniversalSet(d, eps=0.01)``. It is called once, here;
        every task rebuilds that object from its parameters (same seed), so
        all chunk sketches merge.
    split_every : int, optional
        Fan-in of the merge tree (``>= 2``); default: dask's own
        (``dask.config`` ``split_every``, 4). Depth
        ``ceil(log(n_chunks) / log(split_every))``.

    Returns
    -------
    Sketch
        The sketch of all ``n`` rows, computed now with the current dask
        scheduler (the default threaded one, ``dask.config.set(scheduler=...)``
        or an active ``dask.distributed`` client). See the module docstring
        for when it equals the in-memory stream's sketch.

    Raises
    ------
    TypeError
        ``array`` is not a dask array; ``make_sketch`` is not callable or does
        not return a Sketch whose ``extend`` takes rows alone.
    ValueError
        ``array`` is not 2-D; the sketch is not empty or has another
        ``n_features``; ``split_every < 2``. Errors of the sketch itself
        (NaN, overflow) surface from the computation.

    Notes
    -----
    Cost: every row is read once by the sketch's own ``extend`` in its chunk's
    task; then ``n_chunks - 1`` merges, each a ``to_bytes``/``from_bytes``
    of the two states (``O(nbytes)``) plus the class's merge. Memory per
    task: one chunk plus a few sketch states.

    Examples
    --------
    >>> import dask.array as da
    >>> from streamsketch import CountSketch
    >>> from streamsketch.dask import sketch
    >>> X = da.random.default_rng(0).standard_normal((100_000, 8), chunks=(25_000, 8))
    >>> sk = sketch(X, lambda: CountSketch(8, 256, seed=1))
    >>> sk.n_seen, sk.next_index, sk.result().shape
    (100000, 100000, (256, 8))
    """
    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array.Array, got {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"array must be 2-D of shape (n, n_features), got shape {array.shape}")
    if not callable(make_sketch):
        raise TypeError(
            f"make_sketch must be a zero-argument callable, got {type(make_sketch).__name__}"
        )
    if split_every is not None:
        split_every = check_int(split_every, "split_every", minimum=2)
    template = make_sketch()
    if not isinstance(template, Sketch):
        raise TypeError(f"make_sketch() must return a Sketch, got {type(template).__name__}")
    if template.n_seen != 0:
        raise ValueError(f"make_sketch() must return an empty sketch, got n_seen={template.n_seen}")
    if template.n_features != array.shape[1]:
        raise ValueError(
            f"make_sketch() returned a sketch of n_features={template.n_features}, "
            f"but array has {array.shape[1]} columns"
        )
    try:
        inspect.signature(template.extend).bind(None)
    except TypeError:
        raise TypeError(
            f"make_sketch() must return a sketch whose extend takes rows alone; "
            f"{type(template).__name__}.extend needs more"
        ) from None
    cls = type(template)
    if array.numblocks[1] > 1:
        array = array.rechunk({1: -1})
    parts = array.map_blocks(
        _sketch_block,
        cls=cls,
        params=template._params(),
        positional=_takes_positions(template),
        chunks=((1,) * array.numblocks[0],),
        drop_axis=1,
        dtype=object,
        meta=np.empty((0,), dtype=object),
    )
    merge = functools.partial(_merge_blobs, cls=cls)
    total = da.reduction(
        parts,
        _identity,
        merge,
        combine=merge,
        axis=0,
        split_every=split_every,
        concatenate=False,
        dtype=object,
        meta=np.empty((), dtype=object),
        name="streamsketch-merge",
    )
    return cls.from_bytes(total.compute().reshape(-1)[0])


def _scores_block(block: np.ndarray, T: np.ndarray) -> np.ndarray:
    # True scores never exceed 1: clipping only moves an estimate towards them.
    clipped: np.ndarray = np.minimum(_row_sq_norms_of_product(block, T), 1.0)
    return clipped


def leverage_scores(
    array: Any,
    ridge: float = 0.0,
    sketch_size: int | None = None,
    seed: Any = None,
    split_every: int | None = None,
) -> Any:
    """Sketched (ridge) leverage scores of the rows of a tall dask array, lazily.

    The estimator of :func:`streamsketch.rows.leverage_scores` with
    ``method="sketch"`` and no JL map, on a cluster: one pass builds a
    CountSketch ``S A`` with :func:`sketch` (computed now), ``R`` comes from
    the QR of ``[S A; sqrt(ridge) I]`` and an SVD ``R = U S V^T``, and the
    returned dask array computes ``||a_i^T V_r S_r^{-1}||^2`` chunk by chunk
    (a second pass over ``array`` when it is computed).

    Parameters
    ----------
    array : dask.array.Array, shape (n, d)
    ridge : float, default 0.0
        ``lambda >= 0``: estimates of ``a_i^T (A^T A + lambda I)^+ a_i``.
    sketch_size : int, optional
        CountSketch rows ``m >= d``; default ``max(2 d^2, 2000)``.
    seed : int, numpy.random.Generator or None
        Fixes the CountSketch hashes.
    split_every : int, optional
        Fan-in of the merge tree (see :func:`sketch`).

    Returns
    -------
    dask.array.Array, shape (n,), float64
        The estimates, clipped to ``<= 1``, chunked like ``array``'s rows.

    Raises
    ------
    TypeError, ValueError
        As :func:`sketch`; ``ridge < 0``; ``sketch_size < d``; a sketch
        whose factorisation overflows float64.

    Notes
    -----
    Guarantee (as :func:`streamsketch.rows.leverage_scores`): if ``S`` is a
    ``(1 +- eps)`` subspace embedding of the column space of
    ``[A; sqrt(ridge) I]``, every estimate lies in
    ``[tau_i / (1 + eps)^2, tau_i / (1 - eps)^2]``; with the default
    ``m = max(2 d^2, 2000)`` the library documents (and its tests check)
    every score within a factor ``1 +- 0.5`` of the exact one on Gaussian
    and coherent matrices. Cost: the sketch pass ``O(nnz(A))``, ``O(m d^2)``
    for the factorisation, the scores ``O(n d r)``; memory per task one
    chunk plus ``O(m d)``.
    """
    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array.Array, got {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"array must be 2-D of shape (n, n_features), got shape {array.shape}")
    ridge = check_float(ridge, "ridge", minimum=0.0)
    d = int(array.shape[1])
    if sketch_size is None:
        sketch_size = _default_sketch_size(d)
    sketch_size = check_int(sketch_size, "sketch_size", minimum=max(d, 1))
    dtype = np.float32 if array.dtype == np.float32 else np.float64
    template = CountSketch(d, sketch_size, dtype=dtype, seed=seed)
    SA = sketch(array, template.copy, split_every=split_every).result().astype(np.float64)
    if ridge > 0.0:
        SA = np.vstack([SA, math.sqrt(ridge) * np.eye(d)])
    R = np.linalg.qr(SA, mode="r")
    if not np.isfinite(R).all():
        raise ValueError("array is too large: its sketch's factorisation overflows float64")
    _, s, Vt = np.linalg.svd(R, full_matrices=False)
    r = int(np.count_nonzero(s > _rank_tol(s, SA.shape)))
    T = Vt[:r].T / s[:r]
    if array.numblocks[1] > 1:
        array = array.rechunk({1: -1})
    return array.map_blocks(
        _scores_block, T=T, drop_axis=1, dtype=np.float64, meta=np.empty((0,), dtype=np.float64)
    )
