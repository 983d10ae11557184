"""Sketched leverage scores vs the exact numpy QR route, in one process.

Peer: ``Q = numpy.linalg.qr(A)[0]`` (reduced Householder QR) and the squared
row norms of ``Q`` (for ridge > 0: the QR of ``[A; sqrt(ridge) I]``). Ours:
``leverage_scores(A, method="sketch")`` with its defaults. Every timing is the
best of ``--repeats`` runs after one warm-up run (numba compilation, BLAS
buffers), peer and ours interleaved so that background load hits both alike.
Accuracy: the min and max of ``sketched / exact`` over all rows; the target is
a speed-up of at least 3x with every ratio inside (0.5, 1.5).

Run ``python benchmarks/bench_leverage.py`` (200 000 x 128, writes
``benchmarks/results/leverage.md``) or ``--quick`` (20 000 x 64, prints only).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
from _common import best_times, blas_info, load_average, machine

from streamsketch.rows.leverage import leverage_scores

TARGET_SPEEDUP = 3.0


def numpy_qr_scores(A: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """The peer: squared row norms of the reduced Q of A (or of [A; sqrt(ridge) I])."""
    if ridge > 0.0:
        d = A.shape[1]
        A = np.vstack([A, math.sqrt(ridge) * np.eye(d)])
        Q = np.linalg.qr(A)[0][:-d]
    else:
        Q = np.linalg.qr(A)[0]
    return np.einsum("ij,ij->i", Q, Q)


def make_matrices(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((n, d))
    coherent = rng.standard_normal((n, d))
    # A few rows with leverage ~ 1: the case where uniform sampling fails.
    coherent[rng.choice(n, 5, replace=False)] *= 1e4
    return {"gaussian": gauss, "coherent (5 rows x 1e4)": coherent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 000 x 64, 2 repeats, no file")
    parser.add_argument("--n", type=int, default=None, help="rows (default 200 000)")
    parser.add_argument("--d", type=int, default=None, help="columns (default 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown table (default benchmarks/results/leverage.md; none with --quick)",
    )
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    d = args.d or (64 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 5)
    output = args.output
    command = " ".join(["python benchmarks/bench_leverage.py", *(argv or sys.argv[1:])])
    if output is None and not args.quick:
        output = Path(__file__).resolve().parent / "results" / "leverage.md"

    env = (
        f"{machine()}, "
        f"BLAS {blas_info()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"numpy {np.__version__}, load average at start {load_average():.2f}"
    )
    print(f"leverage scores, A of shape ({n}, {d}), best of {repeats}; {env}")

    rows = []
    target_met = True
    ridge_scale = float(n)  # ridge comparable to the squared singular values (~ n)
    for name, A in make_matrices(n, d, args.seed).items():
        cases = [(name, 0.0)]
        if name == "gaussian":
            cases.append((f"{name}, ridge = {ridge_scale:g}", ridge_scale))
        for label, ridge in cases:
            fns = {
                "numpy QR (peer)": lambda A=A, r=ridge: numpy_qr_scores(A, r),
                "leverage_scores exact": lambda A=A, r=ridge: leverage_scores(A, ridge=r),
                "leverage_scores sketch (defaults)": lambda A=A, r=ridge: leverage_scores(
                    A, ridge=r, method="sketch", seed=args.seed
                ),
            }
            if ridge == 0.0 and name == "gaussian":
                # Forced JL widths below d: why the default skips the projection.
                for k in (d // 4, d // 2):
                    fns[f"leverage_scores sketch, jl_dim={k}"] = lambda A=A, k=k: leverage_scores(
                        A, method="sketch", jl_dim=k, seed=args.seed
                    )
            best, res = best_times(fns, repeats)
            exact = res["numpy QR (peer)"]
            for method, t in best.items():
                ratio = res[method] / exact
                lo, hi = float(ratio.min()), float(ratio.max())
                ok = lo > 0.5 and hi < 1.5
                speed = best["numpy QR (peer)"] / t
                rows.append((label, method, t, speed, lo, hi, ok))
                print(
                    f"{label:28s} {method:38s} {t:8.3f} s  x{speed:6.2f}  "
                    f"ratio min {lo:.4f} max {hi:.4f}  within(0.5,1.5)={ok}"
                )
                if method == "leverage_scores sketch (defaults)" and (
                    speed < TARGET_SPEEDUP or not ok
                ):
                    target_met = False
    verdict = "met" if target_met else "NOT met"
    print(f"target (sketch >= {TARGET_SPEEDUP:g}x faster, every ratio in (0.5, 1.5)): {verdict}")

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Leverage scores: sketched vs exact (numpy QR)",
            "",
            f"`{command}` — A of shape ({n}, {d}), best of {repeats} after a warm-up, "
            "peer and ours interleaved in one process.",
            "",
            f"Environment: {env}.",
            "",
            "Speed-up is relative to the numpy QR peer on the same matrix; the ratio columns "
            "are min/max over all rows of (method's score) / (numpy QR score).",
            "",
            "| matrix | method | time (s) | speed-up vs numpy QR | min ratio | max ratio "
            "| all in (0.5, 1.5) |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for label, method, t, speed, lo, hi, ok in rows:
            lines.append(
                f"| {label} | {method} | {t:.3f} | {speed:.2f}x | {lo:.4f} | {hi:.4f} "
                f"| {'yes' if ok else 'no'} |"
            )
        lines += [
            "",
            f"Target (default sketch at least {TARGET_SPEEDUP:g}x faster than numpy QR with every "
            f"score within a factor 1 ± 0.5): **{verdict}**.",
            "",
        ]
        output.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {output}")
    # --quick is a smoke run (the sketch is not much smaller than A there).
    return 0 if target_met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
