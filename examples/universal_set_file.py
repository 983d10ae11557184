"""Stream a matrix too large to load through a LevAttention universal set, block by block.

A 400 000 x 32 float32 key matrix (about 51 MB) is written to an ``.npy`` file
and opened with ``numpy.load(mmap_mode="r")``, so only the block being read is
in memory. ``UniversalSet.extend`` consumes it 20 000 rows at a time; its state
is at most ``d / eps`` kept keys plus a ``d x d`` factor, whatever the length
of the file. At the end the set is checked against the exact leverage scores
of the whole matrix (computed here in one go only to verify): every key with
leverage at least ``eps`` -- every key that some query weights by at least
``eps`` under ``f(x) = x^2`` attention -- is in the set.

Run: ``python examples/universal_set_file.py [--rows 400000] [--eps 0.01]``
(about ten seconds on two cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from streamsketch import UniversalSet, leverage_scores


def write_keys(path: Path, n: int, d: int, seed: int) -> None:
    """Keys with a few directions that only a handful of rows use (the heavy keys)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 50_000):
        hi = min(n, lo + 50_000)
        block = rng.standard_normal((hi - lo, d)).astype(np.float32)
        block[:, d // 2 :] *= 0.01  # half the directions are nearly unused...
        out[lo:hi] = block
    rare = rng.choice(n, size=3 * d, replace=False)
    out[rare, d // 2 :] += 5 * rng.standard_normal((rare.size, d - d // 2)).astype(np.float32)
    out.flush()
    del out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--block", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.npy"
        write_keys(path, args.rows, args.dim, seed=0)
        keys = np.load(path, mmap_mode="r")
        us = UniversalSet(args.dim, eps=args.eps)
        t0 = time.perf_counter()
        for lo in range(0, keys.shape[0], args.block):
            us.extend(np.asarray(keys[lo : lo + args.block]))
        seconds = time.perf_counter() - t0
        print(
            f"streamed {us.n_seen} keys of dimension {args.dim} from a "
            f"{path.stat().st_size / 1e6:.0f} MB file in {seconds:.2f} s; kept {us.n_kept} "
            f"(bound d/eps = {args.dim / args.eps:.0f}), state {us.nbytes / 1e3:.0f} kB"
        )
        # Verification only: the exact leverage of every key of the whole matrix.
        lev = leverage_scores(np.asarray(keys, dtype=np.float64))
    heavy = np.flatnonzero(lev >= args.eps)
    missing = np.setdiff1d(heavy, us.indices)
    print(f"{heavy.size} keys have leverage >= eps; missing from the set: {missing.size}")
    if missing.size:
        raise SystemExit("a heavy key is missing from the universal set")


if __name__ == "__main__":
    main()
