"""Speed of the approximate attention functions against ``scaled_dot_product_attention``.

Causal attention, ``B = 1, H = 8, d = 64``, standard Gaussian q, k, v in
float32, n in {4096, 8192, 16384, 32768}: ``hyper_attention``,
``polysketch_attention`` (degree 4) and ``lev_attention`` (softmax, budget
mode) timed against ``torch.nn.functional.scaled_dot_product_attention``
(``is_causal=True``; on CPU a fused O(n^2) kernel, on CUDA the flash kernel)
in the same process, in alternation, best of a few repeats after a warm-up
at the smallest size. Reports the time ratio ``SDPA / method`` (> 1: faster
than SDPA) and the growth exponent of each method's time in n, the slope of
a least-squares line through ``(log n, log t)``.

Writes ``benchmarks/results/attention_speed.{md,png}`` (``_quick`` suffix
with ``--quick``).

Usage: ``python benchmarks/bench_attention.py [--quick] [--device cpu|cuda]
[--dtype float32|bfloat16|float16] [--n 4096 8192 16384 32768] [--threads 2]
[--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from _common import load_average, machine

from streamsketch.attention.hyper import hyper_attention
from streamsketch.attention.lev import lev_attention
from streamsketch.attention.polysketch import polysketch_attention

HERE = Path(__file__).resolve().parent


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return run


def candidates(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace
) -> dict[str, Callable[[], object]]:
    return {
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "hyper_attention": lambda: hyper_attention(
            q,
            k,
            v,
            causal=True,
            block_size=args.hyper_block,
            sample_size=args.hyper_sample,
            min_seq_len=args.hyper_min_seq_len,
            seed=0,
        ),
        "polysketch_attention": lambda: polysketch_attention(
            q,
            k,
            v,
            degree=4,
            sketch_size=args.sketch_size,
            block_size=args.ps_block,
            causal=True,
            seed=0,
        ),
        "lev_attention": lambda: lev_attention(
            q,
            k,
            v,
            budget=args.lev_budget,
            sinks=args.lev_sinks,
            window=args.lev_window,
            causal=True,
        ),
    }


def repeats_for(n: int, quick: bool) -> int:
    """Fewer repeats where one SDPA call already takes seconds (O(n^2))."""
    if quick:
        return 2
    return 5 if n <= 4096 else 3 if n <= 16384 else 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 1024, 2048, 4096 (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda if available)")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="q, k, v dtype (SDPA's flash kernel on CUDA needs bfloat16 or float16)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--hyper-block", type=int, default=256)
    ap.add_argument("--hyper-sample", type=int, default=256)
    ap.add_argument("--hyper-min-seq-len", type=int, default=1024)
    ap.add_argument("--sketch-size", type=int, default=32)
    ap.add_argument("--ps-block", type=int, default=256)
    ap.add_argument("--lev-budget", type=int, default=256)
    ap.add_argument("--lev-sinks", type=int, default=4)
    ap.add_argument("--lev-window", type=int, default=64)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    ns = sorted(args.n or ([1024, 2048, 4096] if args.quick else [4096, 8192, 16384, 32768]))
    B, H, d = 1, 8, 64
    run = timer(device)

    gen = torch.Generator(device=device).manual_seed(0)

    def qkv(n: int) -> list[torch.Tensor]:
        return [torch.randn(B, H, n, d, generator=gen, device=device).to(dtype) for _ in range(3)]

    for fn in candidates(*qkv(ns[0]), args).values():  # warm-up: allocator, lazy init
        run(fn)
    load_before = load_average()
    times: dict[str, dict[int, float]] = {}
    for n in ns:
        fns = candidates(*qkv(n), args)
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(repeats_for(n, args.quick)):
            for name, fn in fns.items():
                best[name] = min(best[name], run(fn))
        for name, t in best.items():
            times.setdefault(name, {})[n] = t
        print(
            f"n={n}: "
            + ", ".join(f"{name} {t:.4g}s ({best['SDPA'] / t:.2f}x)" for name, t in best.items())
        )
    load_after = load_average()

    log_n = np.log(np.array(ns, dtype=float))
    slopes = {
        name: float(np.polyfit(log_n, np.log([t[n] for n in ns]), 1)[0]) if len(ns) > 1 else np.nan
        for name, t in times.items()
    }
    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"CPU {machine()}, torch threads {torch.get_num_threads()}"
    )
    lines = [
        "# Attention speed against torch scaled_dot_product_attention",
        "",
        f"{where}; torch {torch.__version__}. Causal, B={B}, H={H}, d={d}, {args.dtype}, "
        "Gaussian q, k, v. Best of "
        + ", ".join(f"{repeats_for(n, args.quick)} (n={n})" for n in ns)
        + " after a warm-up. 1-min load average "
        f"{load_before:.2f} before, {load_after:.2f} after.",
        "",
        "Settings: "
        f"hyper_attention block_size={args.hyper_block}, sample_size={args.hyper_sample}, "
        f"min_seq_len={args.hyper_min_seq_len}; polysketch_attention degree=4, "
        f"sketch_size={args.sketch_size}, block_size={args.ps_block}; lev_attention "
        f"budget={args.lev_budget}, sinks={args.lev_sinks}, window={args.lev_window}.",
        "",
        "Time in seconds (speedup = SDPA time / method time):",
        "",
        "| n | " + " | ".join(times) + " |",
        "|---|" + "---|" * len(times),
    ]
    for n in ns:
        cells = [
            f"{times[name][n]:.4g}"
            + ("" if name == "SDPA" else f" ({times['SDPA'][n] / times[name][n]:.2f}x)")
            for name in times
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Growth exponent (log-log slope of time vs n, n = {ns[0]}..{ns[-1]}):",
        "",
        "| method | exponent |",
        "|---|---|",
        *[f"| {name} | {s:.2f} |" for name, s in slopes.items()],
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "attention_speed"
        + ("_quick" if args.quick else "")
        + ("" if device.type == "cpu" else f"_{device.type}")
        + ("" if args.dtype == "float32" else f"_{args.dtype}")
    )
    (args.out / f"{stem}.md").write_text(report)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, t in times.items():
        ax.loglog(ns, [t[n] for n in ns], "o-", label=f"{name} (slope {slopes[name]:.2f})")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_title(f"causal attention, B={B}, H={H}, d={d}, {device.type}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
