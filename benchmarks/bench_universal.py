"""Streaming LevAttention universal set vs exact one-shot leverage (numpy QR), in one process.

Ours: ``UniversalSet(d, eps).extend(chunk)`` over the stream in chunks of
``--chunk`` rows (default 4096): constant memory, the exact heavy-key set
after every chunk. Peer: what a user without a streaming sketch would do once
at the end, with the whole key matrix in memory: ``Q = numpy.linalg.qr(K)[0]``,
leverage = squared row norms of ``Q``, keep ``>= eps``. The peer answers only
for the final prefix; ours answers at every chunk boundary. Both are timed in
the same process, best of ``--repeats`` after a warm-up, interleaved so
background load hits both alike. The final sets must agree (keys within
``1e-7`` relative of eps excepted) and ``|U| <= d / eps``.

Target: >= 100 000 rows/s for the streaming pass.

Run ``python benchmarks/bench_universal.py`` (10^6 x 64, eps 0.05, writes
``benchmarks/results/universal.md``) or ``--quick`` (2 x 10^5 x 64, prints only).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
from _common import best_times, blas_info, load_average, machine

from streamsketch.rows.universal import UniversalSet

TARGET_ROWS_PER_S = 100_000.0


def numpy_qr_heavy(K: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The peer: exact leverage of every key (reduced Householder QR), then the threshold."""
    Q = np.linalg.qr(K)[0]
    lev = np.einsum("ij,ij->i", Q, Q)
    return np.flatnonzero(lev >= eps), lev


def stream(K: np.ndarray, eps: float, chunk: int) -> UniversalSet:
    us = UniversalSet(K.shape[1], eps)
    for lo in range(0, K.shape[0], chunk):
        us.extend(K[lo : lo + chunk])
    return us


def make_keys(n: int, d: int, seed: int) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((n, d))
    # Planted heavy keys: norms 300x..3000x a typical key, i.e. leverage
    # ~0.08..0.9 against 10^6 Gaussian keys; all must be found.
    planted = rng.choice(n, 64, replace=False)
    gauss[planted] *= np.exp(rng.uniform(np.log(300), np.log(3000), 64))[:, None] / math.sqrt(
        n / 1e6
    )
    # Heavy-tailed key norms (|Cauchy| scales): a few keys dominate their
    # directions and the Gram matrix is badly conditioned.
    cauchy = rng.standard_normal((n, d)) * np.abs(rng.standard_cauchy(n))[:, None]
    return {
        "gaussian + 64 planted heavy keys": (gauss, 64),
        "key norms with Cauchy tails": (cauchy, 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2e5 x 64, 1 repeat, no file")
    parser.add_argument("--n", type=int, default=None, help="rows (default 1 000 000)")
    parser.add_argument("--d", type=int, default=64, help="key width (default 64)")
    parser.add_argument("--eps", type=float, default=0.05, help="threshold (default 0.05)")
    parser.add_argument("--chunk", type=int, default=4096, help="rows per extend (default 4096)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown table (default benchmarks/results/universal.md; none with --quick)",
    )
    args = parser.parse_args(argv)
    n = args.n or (200_000 if args.quick else 1_000_000)
    d, eps, chunk = args.d, args.eps, args.chunk
    repeats = args.repeats or (1 if args.quick else 2)
    output = args.output
    command = " ".join(["python benchmarks/bench_universal.py", *(argv or sys.argv[1:])])
    if output is None and not args.quick:
        output = Path(__file__).resolve().parent / "results" / "universal.md"

    env = (
        f"{machine()}, "
        f"BLAS {blas_info()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"numpy {np.__version__}, load average at start {load_average():.2f}"
    )
    print(
        f"universal set, keys ({n}, {d}) float64, eps {eps}, chunks of {chunk}, "
        f"best of {repeats}; {env}"
    )

    rows = []
    ok_all = True
    for name, (K, n_planted) in make_keys(n, d, args.seed).items():
        fns = {
            "numpy QR one-shot (peer)": lambda K=K: numpy_qr_heavy(K, eps),
            "UniversalSet.extend stream": lambda K=K: stream(K, eps, chunk),
        }
        best, res = best_times(fns, repeats)
        want, lev = res["numpy QR one-shot (peer)"]
        us = res["UniversalSet.extend stream"]
        got = us.indices
        clear = np.abs(lev / eps - 1) > 1e-7
        agree = np.array_equal(np.intersect1d(got, np.flatnonzero(clear)), want[clear[want]])
        rate = n / best["UniversalSet.extend stream"]
        ratio = best["numpy QR one-shot (peer)"] / best["UniversalSet.extend stream"]
        bound_ok = us.n_kept <= d / eps
        ok = agree and bound_ok and rate >= TARGET_ROWS_PER_S
        ok_all &= ok
        rows.append((name, best, rate, ratio, us.n_kept, us.nbytes, agree, n_planted, K.nbytes, ok))
        print(
            f"{name}: stream {best['UniversalSet.extend stream']:.3f} s ({rate:,.0f} rows/s), "
            f"peer {best['numpy QR one-shot (peer)']:.3f} s, peer/stream time x{ratio:.2f}; "
            f"|U| = {us.n_kept} (bound {int(d / eps)}), nbytes {us.nbytes:,} "
            f"(keys: {K.nbytes:,}); same set as exact: {agree}"
        )
    verdict = "met" if ok_all else "NOT met"
    print(f"target (>= {TARGET_ROWS_PER_S:,.0f} rows/s, exact final set, |U| <= d/eps): {verdict}")

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Universal set (LevAttention, f(x) = x^2): streaming vs exact one-shot leverage",
            "",
            f"`{command}` — keys of shape ({n}, {d}) float64, eps = {eps}, "
            f"`UniversalSet.extend` in chunks of {chunk} rows; peer: `numpy.linalg.qr` of the "
            f"whole key matrix, squared row norms of Q, threshold. Best of {repeats} after a "
            "warm-up, interleaved in one process.",
            "",
            f"Environment: {env}.",
            "",
            "The peer holds all keys and answers once, at the end; the stream holds "
            "`nbytes` and has the exact set after every chunk. 'Same set' compares the final "
            "stream set with the peer's exact one (keys within 1e-7 relative of eps excepted).",
            "",
            "| keys | stream time (s) | rows/s | numpy QR time (s) | peer / stream | kept keys "
            "| d/eps | nbytes | key matrix bytes | same set |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, best, rate, ratio, kept, nbytes, agree, _np, kbytes, _ok in rows:
            lines.append(
                f"| {name} | {best['UniversalSet.extend stream']:.3f} | {rate:,.0f} "
                f"| {best['numpy QR one-shot (peer)']:.3f} | {ratio:.2f}x | {kept} "
                f"| {int(d / eps)} | {nbytes:,} | {kbytes:,} | {'yes' if agree else 'no'} |"
            )
        lines += [
            "",
            f"Target (at least {TARGET_ROWS_PER_S:,.0f} rows/s, the exact final set, "
            f"|U| <= d/eps): **{verdict}**.",
            "",
        ]
        output.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {output}")
    return 0 if ok_all or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
