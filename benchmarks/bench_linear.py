"""Linear sketches against the peers a user would otherwise pick, in one process.

(a) ``streamsketch.linear.countsketch.countsketch(A, 512, seed=0)`` against
    ``scipy.linalg.clarkson_woodruff_transform(A, 512, seed=0)`` on a
    200 000 x 128 standard normal ``A``, with ``A.sum(axis=0)`` (one read of
    ``A``) as the memory-bandwidth floor.
(b) ``TensorSketch(64, 4, 1024).transform(X)`` against sklearn's
    ``PolynomialCountSketch(degree=4, gamma=1, coef0=0, n_components=1024)``
    ``.fit(X).transform(X)`` on 20 000 unit-norm rows of width 64, plus the
    mean absolute error of each map's ``<phi(x), phi(y)>`` against the exact
    ``<x, y>^4`` on random pairs (both maps are the same estimator, so the
    errors should agree up to noise).

Every timing is the best of several repeats after a warm-up call (numba
compilation and FFT planning excluded); the candidates are timed in
alternation so that a noisy machine slows them alike. Prints a markdown table
and writes it, with a bar plot, to ``benchmarks/results/linear.{md,png}``.

Usage: ``python benchmarks/bench_linear.py [--quick] [--repeats N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scipy
import scipy.linalg
import sklearn
from _common import best_times, load_average, machine
from sklearn.kernel_approximation import PolynomialCountSketch

from streamsketch._parallel import num_threads
from streamsketch.linear.countsketch import countsketch
from streamsketch.linear.tensorsketch import TensorSketch


def pair_errors(
    make_features: Callable[[np.ndarray, int], np.ndarray],
    X: np.ndarray,
    pairs: np.ndarray,
    seeds: range,
) -> np.ndarray:
    """|<phi(x_i), phi(x_j)> - <x_i, x_j>^4| for every pair and seed, shape (seeds, pairs)."""
    rows, inverse = np.unique(pairs.ravel(), return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    sub = X[rows]
    exact = np.einsum("ij,ij->i", sub[inverse[:, 0]], sub[inverse[:, 1]]) ** 4
    out = np.empty((len(seeds), len(pairs)))
    for k, seed in enumerate(seeds):
        Z = make_features(sub, seed)
        est = np.einsum("ij,ij->i", Z[inverse[:, 0]], Z[inverse[:, 1]])
        out[k] = np.abs(est - exact)
    return out


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run streamsketch kernels on one thread (sklearn's transform is serial too)."""
    old = os.environ.get("STREAMSKETCH_NUM_THREADS")
    os.environ["STREAMSKETCH_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["STREAMSKETCH_NUM_THREADS"]
        else:
            os.environ["STREAMSKETCH_NUM_THREADS"] = old


def bench_countsketch(A: np.ndarray, m: int, repeats: int) -> dict[str, float]:
    """Times of countsketch, scipy's clarkson_woodruff_transform and A.sum(axis=0)."""
    return best_times(
        {
            "ours": lambda: countsketch(A, m, seed=0),
            "scipy": lambda: scipy.linalg.clarkson_woodruff_transform(A, m, seed=0),
            "sum": lambda: A.sum(axis=0),
        },
        repeats,
    )[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output folder",
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    n_cs, d_cs, m_cs = (20_000, 128, 512) if args.quick else (200_000, 128, 512)
    n_ts, d_ts, p_ts, m_ts = (4_000, 64, 4, 1024) if args.quick else (20_000, 64, 4, 1024)
    n_pairs, n_seeds = (100, 2) if args.quick else (300, 10)

    load_before = load_average()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, float, str, float]] = []

    # (a) CountSketch
    cs_case = f"CountSketch S·A, A {n_cs}x{d_cs}, m={m_cs}"
    t = bench_countsketch(rng.standard_normal((n_cs, d_cs)), m_cs, repeats)
    rows.append((cs_case, "scipy.linalg.clarkson_woodruff_transform", t["ours"], "", t["scipy"]))
    cs_sum = t["sum"]

    # (b) TensorSketch
    X = rng.standard_normal((n_ts, d_ts))
    X /= np.linalg.norm(X, axis=1, keepdims=True)

    def ours_ts(Y: np.ndarray, seed: int = 0) -> np.ndarray:
        return TensorSketch(d_ts, p_ts, m_ts, seed=seed).transform(Y)

    def sklearn_ts(Y: np.ndarray, seed: int = 0) -> np.ndarray:
        pcs = PolynomialCountSketch(
            degree=p_ts, gamma=1.0, coef0=0, n_components=m_ts, random_state=seed
        )
        return pcs.fit(Y).transform(Y)

    def ours_ts_serial() -> np.ndarray:
        with single_thread():
            return ours_ts(X)

    t = best_times(
        {
            "ours": lambda: ours_ts(X),
            "ours_1": ours_ts_serial,
            "sklearn": lambda: sklearn_ts(X),
        },
        repeats,
    )[0]
    ts_case = f"TensorSketch p={p_ts}, X {n_ts}x{d_ts}, m={m_ts}"
    peer = "sklearn PolynomialCountSketch fit+transform"
    rows.append((ts_case, peer, t["ours"], "", t["sklearn"]))
    rows.append((ts_case + " (1 thread)", peer, t["ours_1"], "", t["sklearn"]))

    pairs = rng.integers(0, n_ts, size=(4 * n_pairs, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]][:n_pairs]
    err_ours = pair_errors(ours_ts, X, pairs, range(n_seeds))
    err_sk = pair_errors(sklearn_ts, X, pairs, range(n_seeds))
    exact_mean = float(np.mean(np.einsum("ij,ij->i", X[pairs[:, 0]], X[pairs[:, 1]]) ** 4))

    # -- report ------------------------------------------------------------
    load_after = load_average()
    lines = [
        "# Linear sketches vs peers",
        "",
        f"Machine: {machine()}, "
        f"streamsketch threads {num_threads()}; "
        f"numpy {np.__version__}, scipy {scipy.__version__}, sklearn {sklearn.__version__}. "
        f"Best of {repeats} (after a warm-up){', --quick sizes' if args.quick else ''}. "
        f"1-min load average {load_before:.2f} before, {load_after:.2f} after "
        "(other processes on the machine slow the threaded runs most).",
        "",
        "| case | peer | streamsketch (s) | peer (s) | speedup |",
        "|---|---|---|---|---|",
    ]
    for case, peer, ours, _, theirs in rows:
        lines.append(f"| {case} | {peer} | {ours:.4f} | {theirs:.4f} | {theirs / ours:.2f}x |")
    lines += [
        "",
        f"Memory-bandwidth floor for (a): `A.sum(axis=0)` takes {cs_sum:.4f} s; "
        f"countsketch runs at {cs_sum / rows[0][2]:.2f}x that speed "
        f"({rows[0][2] / cs_sum:.1f} sums' time).",
        "",
        f"TensorSketch inner-product error against exact <x,y>^{p_ts} on {len(pairs)} random pairs "
        f"x {n_seeds} seeds (unit rows; mean exact value {exact_mean:.2e}):",
        "",
        "| map | mean abs error | std error of the mean | per-seed MAE |",
        "|---|---|---|---|",
    ]
    for name, err in (("streamsketch TensorSketch", err_ours), ("sklearn", err_sk)):
        per_seed = ", ".join(f"{v:.4f}" for v in err.mean(axis=1))
        lines.append(
            f"| {name} | {err.mean():.4f} | {err.std(ddof=1) / np.sqrt(err.size):.4f} | "
            f"{per_seed} |"
        )
    lines.append("")
    lines.append(
        f"Error ratio streamsketch / sklearn: {err_ours.mean() / err_sk.mean():.3f} "
        "(same estimator; differences are sampling noise)."
    )
    report = "\n".join(lines) + "\n"
    print(report)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.md").write_text(report)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(
        ["countsketch", "scipy CWT", "A.sum (floor)"],
        [rows[0][2], rows[0][4], cs_sum],
        color=["tab:blue", "tab:orange", "tab:gray"],
    )
    axes[0].set_title(f"CountSketch, {n_cs}x{d_cs} -> {m_cs}")
    axes[1].bar(
        ["TensorSketch", "TensorSketch\n1 thread", "sklearn PCS"],
        [rows[1][2], rows[2][2], rows[1][4]],
        color=["tab:blue", "tab:cyan", "tab:orange"],
    )
    axes[1].set_title(f"TensorSketch p={p_ts}, {n_ts}x{d_ts} -> {m_ts}")
    for ax in axes:
        ax.set_ylabel("seconds (best of repeats)")
    fig.tight_layout()
    fig.savefig(args.out / "linear.png", dpi=120)
    print(f"wrote {args.out / 'linear.md'} and {args.out / 'linear.png'}")


if __name__ == "__main__":
    main()
