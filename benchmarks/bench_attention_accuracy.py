"""Accuracy of the approximate attention functions against exact attention.

Relative error ``||out - exact||_F / ||exact||_F`` (over all batches, heads,
queries and channels), causal, of

- ``lev_attention`` with ``f="softmax"`` and a key ``budget`` (plus sinks and a
  window), against exact softmax attention;
- ``lev_attention`` with ``f=("poly", 2)`` and a leverage threshold ``eps``,
  against exact degree-2 polynomial attention (where its guarantee holds);
- ``hyper_attention`` against exact softmax attention;
- ``polysketch_attention`` (degree 4) against exact degree-4 polynomial
  attention, its target, and against softmax for information;
- a trivial baseline, the causal running mean of the values (uniform
  attention), against softmax: any useful approximation must beat it.

Inputs: (a) post-RoPE q, k, v of SmolLM2-135M on Python's reference
documentation, captured by ``benchmarks/capture_qkv.py`` into
``benchmarks/data/qkv_n<N>.pt`` (9 query / 3 KV heads, head dim 64; every
captured layer is a row), and (b) standard Gaussian q, k, v of shape
``(1, 8, n, 64)``, at n = 4096 and 16384.

The exact reference is computed on blocks of queries (each block against its
causal prefix of keys) so memory stays ``O(block * n)`` per head at 16384.

Writes ``benchmarks/results/attention_accuracy.md``.

Usage: ``python benchmarks/bench_attention_accuracy.py [--quick] [--n 4096 16384]
[--data benchmarks/data] [--layers 1 20] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine

from streamsketch.attention.exact import exact_attention
from streamsketch.attention.hyper import hyper_attention
from streamsketch.attention.lev import lev_attention
from streamsketch.attention.polysketch import polysketch_attention

HERE = Path(__file__).resolve().parent


def exact_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: object, block: int = 512
) -> torch.Tensor:
    """Causal exact attention, one block of queries at a time (n_q == n_k)."""
    n = q.shape[2]
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)
    for s in range(0, n, block):
        e = min(s + block, n)
        # bottom-right alignment: query s+i of the block sees keys <= s+i of the prefix [0, e)
        out[:, :, s:e] = exact_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], f=f, causal=True)
    return out


def causal_mean(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uniform causal attention: query i gets the mean of v_0..v_i (KV heads repeated)."""
    rep = q.shape[1] // v.shape[1]
    csum = v.float().cumsum(dim=2).repeat_interleave(rep, dim=1)
    count = torch.arange(1, v.shape[2] + 1, dtype=torch.float32)[:, None]
    return csum / count


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def methods(args: argparse.Namespace) -> list[tuple[str, str, Callable]]:
    """(name, reference, fn(q, k, v)) for every approximation."""
    lev_soft = (
        f"lev_attention softmax, budget={args.lev_budget}, sinks={args.lev_sinks}, "
        f"window={args.lev_window}"
    )
    lev_poly = f"lev_attention f=('poly', 2), eps={args.lev_eps}"
    hyper = (
        f"hyper_attention block={args.hyper_block}, sample={args.hyper_sample}, "
        f"min_seq_len={args.hyper_min_seq_len}"
    )
    poly = f"polysketch_attention degree=4, sketch_size={args.sketch_size}, block={args.ps_block}"
    return [
        (
            lev_soft,
            "softmax",
            lambda q, k, v: lev_attention(
                q,
                k,
                v,
                budget=args.lev_budget,
                sinks=args.lev_sinks,
                window=args.lev_window,
                causal=True,
            ),
        ),
        (
            lev_poly,
            "poly 2",
            lambda q, k, v: lev_attention(q, k, v, eps=args.lev_eps, f=("poly", 2), causal=True),
        ),
        (
            hyper,
            "softmax",
            lambda q, k, v: hyper_attention(
                q,
                k,
                v,
                causal=True,
                block_size=args.hyper_block,
                sample_size=args.hyper_sample,
                min_seq_len=args.hyper_min_seq_len,
                seed=0,
            ),
        ),
        (
            poly,
            "poly 4",
            lambda q, k, v: polysketch_attention(
                q,
                k,
                v,
                degree=4,
                sketch_size=args.sketch_size,
                block_size=args.ps_block,
                causal=True,
                seed=0,
            ),
        ),
        (poly, "softmax (info)", None),  # same output as the row above, other reference
        ("uniform causal mean (baseline)", "softmax", lambda q, k, v: causal_mean(q, v)),
    ]


def evaluate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace
) -> list[tuple[str, str, float, float]]:
    """(method, reference, relative error, seconds) for each method on one q, k, v."""
    refs = {
        "softmax": exact_blocked(q, k, v, "softmax"),
        "poly 2": exact_blocked(q, k, v, ("poly", 2)),
        "poly 4": exact_blocked(q, k, v, ("poly", 4)),
    }
    refs["softmax (info)"] = refs["softmax"]
    rows = []
    last_out, last_t = None, 0.0
    for name, ref, fn in methods(args):
        if fn is None:
            out, t = last_out, last_t
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(q, k, v)
            t = time.perf_counter() - t0
            last_out, last_t = out, t
        rows.append((name, ref, rel_err(out, refs[ref]), t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 1024 and 2048, Gaussian only")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="captured layers to use")
    ap.add_argument("--lev-budget", type=int, default=256)
    ap.add_argument("--lev-sinks", type=int, default=4)
    ap.add_argument("--lev-window", type=int, default=64)
    ap.add_argument("--lev-eps", type=float, default=0.05)
    ap.add_argument("--hyper-block", type=int, default=256)
    ap.add_argument("--hyper-sample", type=int, default=256)
    ap.add_argument("--hyper-min-seq-len", type=int, default=1024)
    ap.add_argument("--sketch-size", type=int, default=32)
    ap.add_argument("--ps-block", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = args.n or ([1024, 2048] if args.quick else [4096, 16384])

    table: list[tuple[str, int, str, str, str, float, float]] = []
    notes: list[str] = []
    for n in ns:
        path = args.data / f"qkv_n{n}.pt"
        if args.quick:
            pass
        elif not path.is_file():
            msg = (
                f"real q, k, v for n={n} missing ({path}); make them with "
                f"`python benchmarks/capture_qkv.py --n {n}`"
            )
            print(msg)
            notes.append(msg)
        else:
            blob = torch.load(path, weights_only=True)
            meta = blob["meta"]
            notes.append(
                f"n={n}: {meta['model']}, capture mode {meta['mode']} (trained context "
                f"{meta['trained_context']}), next-token loss first/last window "
                f"{meta['loss_first_window']:.3f}/{meta['loss_last_window']:.3f}"
            )
            for layer in args.layers or meta["layers"]:
                q, k, v = blob["q"][layer], blob["k"][layer], blob["v"][layer]
                for name, ref, err, t in evaluate(q, k, v, args):
                    table.append(("SmolLM2 real", n, f"layer {layer}", name, ref, err, t))
                    print(f"real n={n} layer {layer} | {name} | vs {ref} | {err:.4f} | {t:.2f}s")
            del blob
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 8, n, 64, generator=gen) for _ in range(3))
        for name, ref, err, t in evaluate(q, k, v, args):
            table.append(("Gaussian", n, "H=8", name, ref, err, t))
            print(f"gauss n={n} | {name} | vs {ref} | {err:.4f} | {t:.2f}s")

    lines = [
        "# Attention accuracy: relative error against exact attention",
        "",
        "`||out - exact||_F / ||exact||_F`, causal, float32, CPU "
        f"({machine()}, "
        f"torch {torch.__version__}, {args.threads} threads). Time is one call, for "
        "orientation only (see `bench_attention.py` for speed).",
        "",
        *[f"- {note}" for note in notes],
        "",
        "| data | n | heads/layer | method | reference | rel. error | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, n, where, name, ref, err, t in table:
        lines.append(f"| {data} | {n} | {where} | {name} | {ref} | {err:.4f} | {t:.2f} |")
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("attention_accuracy_quick.md" if args.quick else "attention_accuracy.md")
    target.write_text(report)
    print(report)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
