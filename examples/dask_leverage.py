"""Leverage scores and the heavy-key set of a tall dask array, by dask's own tree reduction.

A 2 000 000 x 64 matrix in 20 row chunks (1 GiB of float64, generated chunk by
chunk from per-chunk seeds, never held whole) is

1. sketched by a CountSketch of ``max(2 d^2, 2000)`` rows with
   ``streamsketch.dask.sketch`` (one task per chunk, merged in a tree), whose
   QR gives sketched leverage scores of every row
   (``streamsketch.dask.leverage_scores``); they are compared with exact ones
   (``a_i^T (A^T A)^{-1} a_i`` from the Gram matrix ``A^T A``, which dask also
   reduces over the chunks);
2. streamed into a LevAttention :class:`~streamsketch.UniversalSet` per chunk,
   merged into the set of the whole matrix, and compared with the set of the
   exact scores.

Run: ``python examples/dask_leverage.py`` (about 15 s on two cores; ``--rows``
and ``--chunks`` change the size, ``--scheduler distributed`` runs on a local
``dask.distributed`` cluster if ``distributed`` is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import dask
import dask.array as da
import numpy as np
import scipy.linalg

from streamsketch import UniversalSet
from streamsketch.dask import leverage_scores, sketch

D = 64
EPS = 0.02


def chunk(i: int, rows: int) -> np.ndarray:
    """Row chunk ``i``: Gaussian rows, a weak last direction, and a few loud or rare rows."""
    rng = np.random.default_rng([7, i])
    X = rng.standard_normal((rows, D))
    X[:, -1] *= 1e-3
    loud = rng.choice(rows, 3, replace=False)
    X[loud] *= np.array([[8.0], [20.0], [45.0]])
    X[loud[0] + 1 if loud[0] + 1 < rows else 0, -1] = 6.0  # a key alone in the weak direction
    return X


def tall_matrix(n: int, n_chunks: int) -> da.Array:
    rows = n // n_chunks
    parts = [
        da.from_delayed(dask.delayed(chunk)(i, rows), (rows, D), dtype=np.float64)
        for i in range(n_chunks)
    ]
    return da.concatenate(parts, axis=0)


def _exact_block(block: np.ndarray, L: np.ndarray) -> np.ndarray:
    Z = scipy.linalg.solve_triangular(L, block.T, lower=True)
    return np.einsum("ij,ij->j", Z, Z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument(
        "--scheduler", choices=["threads", "sync", "distributed"], default="threads"
    )
    args = parser.parse_args()
    A = tall_matrix(args.rows, args.chunks)
    n = A.shape[0]
    print(f"A: {n} x {D} float64 ({A.nbytes / 2**30:.2f} GiB) in {A.numblocks[0]} row chunks")

    with contextlib.ExitStack() as stack:
        if args.scheduler == "distributed":
            import distributed

            cluster = stack.enter_context(
                distributed.LocalCluster(processes=False, n_workers=2, dashboard_address=None)
            )
            stack.enter_context(distributed.Client(cluster))
        else:
            stack.enter_context(dask.config.set(scheduler=args.scheduler))

        t0 = time.perf_counter()
        est = leverage_scores(A, seed=0).compute()
        t_sketch = time.perf_counter() - t0

        t0 = time.perf_counter()
        G = (A.T @ A).compute()  # exact Gram matrix, reduced by dask over the chunks
        L = np.linalg.cholesky(G)
        exact = A.map_blocks(_exact_block, L=L, drop_axis=1, dtype=np.float64).compute()
        t_exact = time.perf_counter() - t0

        t0 = time.perf_counter()
        us = sketch(A, lambda: UniversalSet(D, EPS))
        t_set = time.perf_counter() - t0

    ratio = est / exact
    heavy = exact >= EPS
    print(f"\nsketched leverage (CountSketch + QR, two passes): {t_sketch:.1f} s")
    print(f"exact leverage (Gram + Cholesky, two passes):      {t_exact:.1f} s")
    print(f"estimate / exact over all {n} rows: min {ratio.min():.4f}, max {ratio.max():.4f}")
    print("  (documented factor for the default sketch size: within 1 +- 0.5)")
    print(
        f"  rows with exact leverage >= {EPS}: {ratio[heavy].min():.4f} .. {ratio[heavy].max():.4f}"
    )
    print(f"sum of exact scores = {exact.sum():.6f} (rank {D})")

    want = np.flatnonzero(heavy)
    print(
        f"\nuniversal set (eps = {EPS}) by dask tree reduction: {us.n_kept} keys in {t_set:.1f} s"
    )
    print(f"same as the keys with exact leverage >= eps: {np.array_equal(us.indices, want)}")
    print(f"kept rows: {us.indices.tolist()}")
    if not (np.array_equal(us.indices, want) and 0.5 < ratio.min() and ratio.max() < 1.5):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
