"""One-pass low-rank approximation of a matrix read from disk, block by block.

A 40 000 x 500 matrix with a decaying spectrum is written to an ``.npy`` file
and opened with ``numpy.load(mmap_mode="r")``. ``low_rank(...,
method="streaming")`` reads it once, in row blocks, into a two-sided linear
sketch (Tropp, Yurtsever, Udell and Cevher 2017) and never holds the matrix;
``method="frequent-directions"`` does the same with a Frequent Directions
sketch in two passes. Both are compared with the randomized SVD of the whole
matrix in memory and with the exact truncated SVD: the script prints each
method's Frobenius error relative to the best rank-k error. The one-pass
sketch cannot revisit the matrix, so at the same oversampling it is the least
accurate (about 1.55x the best error with the default ``oversample=10`` here);
``oversample=100`` brings it to about 1.05x, which the last line shows.

Run: ``python examples/streaming_low_rank.py [--rows 40000] [--rank 20]`` (seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from streamsketch.nla import low_rank


def write_matrix(path: Path, n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = 1.0 / np.arange(1, d + 1) ** 1.0  # decaying spectrum
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, d))
    for lo in range(0, n, 10_000):
        hi = min(n, lo + 10_000)
        out[lo:hi] = (rng.standard_normal((hi - lo, d)) * s) @ V.T
    out.flush()
    del out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--cols", type=int, default=500)
    ap.add_argument("--rank", type=int, default=20)
    args = ap.parse_args()
    k = args.rank
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "A.npy"
        write_matrix(path, args.rows, args.cols, seed=0)
        A = np.load(path, mmap_mode="r")
        sv = np.linalg.svd(np.asarray(A), compute_uv=False)
        best = np.sqrt(np.sum(sv[k:] ** 2))
        print(
            f"A: {args.rows} x {args.cols} on disk ({path.stat().st_size / 1e6:.0f} MB), rank {k}"
        )
        for method in ("randomized", "streaming", "frequent-directions"):
            t0 = time.perf_counter()
            U, s, Vt = low_rank(A, k, method=method, seed=0)
            seconds = time.perf_counter() - t0
            err = np.linalg.norm(np.asarray(A) - (U * s) @ Vt)
            print(f"{method:20s} error / best rank-{k} error = {err / best:.4f}  ({seconds:.2f} s)")
        U, s, Vt = low_rank(A, k, method="streaming", oversample=100, seed=0)
        err = np.linalg.norm(np.asarray(A) - (U * s) @ Vt)
        print(f"streaming, oversample=100 error / best rank-{k} error = {err / best:.4f}")


if __name__ == "__main__":
    main()
