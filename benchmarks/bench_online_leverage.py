"""OnlineRidgeLeverage.extend against a row-by-row Sherman–Morrison loop, quiet and under load.

Peer: the textbook online ridge leverage in numpy, one row at a time:
``u = x^T P x``, score ``u / (1 + u)``, then ``P -= (P x)(P x)^T / (1 + u)``
(``P = (K^T K + ridge I)^{-1}`` of the rows so far). Ours:
``OnlineRidgeLeverage(d, ridge).extend(X)`` (blocks of rows, a few BLAS-3
calls each, on one BLAS thread up to ``d = 322``), and the same blocks with
the one-thread switch turned off (``threaded BLAS``), which shows what the
switch is for. Rows/s is the best of ``--repeats`` interleaved runs.

``--load N`` adds N processes that spin on the CPU while the timings run, to
stand in for the other jobs of a shared machine; the default runs once quiet
and once with as many spinners as CPUs. Accuracy: the largest difference
between our scores and the peer's.

Run ``python benchmarks/bench_online_leverage.py`` (writes
``benchmarks/results/online_leverage.md``) or ``--quick`` (small sizes, prints only).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
from _common import best_times, blas_info, load_average, machine

import streamsketch.rows.online as online_module
from streamsketch import OnlineRidgeLeverage

RIDGE = 1.0


def sherman_morrison_scores(X: np.ndarray, ridge: float) -> np.ndarray:
    """The peer: online ridge leverage of each row, one rank-one update per row."""
    P = np.eye(X.shape[1]) / ridge
    out = np.empty(X.shape[0])
    for i, x in enumerate(X):
        Px = P @ x
        u = float(x @ Px)
        out[i] = u / (1.0 + u)
        P -= np.outer(Px, Px) / (1.0 + u)
    return out


def ours(X: np.ndarray, threaded: bool = False) -> np.ndarray:
    saved = online_module.SINGLE_THREAD_BLAS_WORK
    if threaded:
        online_module.SINGLE_THREAD_BLAS_WORK = 0
    try:
        return OnlineRidgeLeverage(X.shape[1], RIDGE).extend(X)
    finally:
        online_module.SINGLE_THREAD_BLAS_WORK = saved


def _spin() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def run(sizes: list[tuple[int, int]], load: int, repeats: int) -> list[str]:
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    rows = []
    try:
        rng = np.random.default_rng(0)
        for d, n in sizes:
            X = rng.standard_normal((n, d))
            best, res = best_times(
                {
                    "peer": lambda X=X: sherman_morrison_scores(X, RIDGE),
                    "ours": lambda X=X: ours(X),
                    "threaded": lambda X=X: ours(X, threaded=True),
                },
                repeats,
            )
            err = float(np.abs(res["ours"] - res["peer"]).max())
            line = (
                f"| {load} | {d} | {n:,} | {n / best['peer']:,.0f} | {n / best['ours']:,.0f} | "
                f"{n / best['threaded']:,.0f} | {best['peer'] / best['ours']:.1f}x | "
                f"{best['threaded'] / best['ours']:.1f}x | {err:.1e} |"
            )
            print(line, flush=True)
            rows.append(line)
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, nargs="+", default=None, help="spinning processes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, no file by default")
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown table (default benchmarks/results/online_leverage.md; none with --quick)",
    )
    args = ap.parse_args()
    output = args.output
    if output is None and not args.quick:
        output = Path(__file__).resolve().parent / "results" / "online_leverage.md"
    loads = args.load if args.load is not None else [0, os.cpu_count() or 1]
    sizes = [(64, 4000), (256, 1000)] if args.quick else [(64, 40000), (256, 6000), (512, 3000)]
    header = [
        "| spinning processes | d | rows | peer rows/s | ours rows/s | ours, threaded BLAS "
        "rows/s | ours vs peer | one thread vs threaded | max abs. score diff. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header))
    rows = []
    for load in loads:
        rows += run(sizes, load, args.repeats)
    if output is None:
        return
    lines = [
        "# Online ridge leverage: blocked extend vs a Sherman–Morrison loop",
        "",
        f"Machine: {machine()}, {blas_info()}, load average {load_average():.1f} before the run. "
        f"Ridge {RIDGE}, Gaussian rows, best of {args.repeats}. Command: "
        f"`python {' '.join(sys.argv)}`.",
        "",
        "Peer: numpy, one rank-one update per row. Ours: `OnlineRidgeLeverage.extend`, blocks "
        "of rows on one BLAS thread up to d = 322; 'threaded BLAS': the same blocks with the "
        "one-thread switch off. Spinning processes stand in for other jobs on the machine.",
        "",
        *header,
        *rows,
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
