"""Attention mass kept at a fixed total: scorers against references that read the future.

The DESIGN.md §4 protocol (2 048 tokens of ``pydoc_data.topics``, prefill
1 792, 256 decode queries, all 30 layers and 9 query heads of SmolLM2) at
one total of keys per head (128 by default), for several splits of that
total into sinks / selected / window:

- ``oracle_mass_kept``: every query picks its own best older keys (needs the
  whole past at every step; no cache of this size can do it);
- ``foresight_mass_kept``: an eviction-only cache (the only kind a
  constant-memory cache can be) that knows all future queries, or only the
  next ``horizon`` of them;
- the library's causal scorers through ``attention_mass_kept``.

Writes ``benchmarks/results/kv_mass_bounds.md`` (or ``--output``).

Usage: ``python benchmarks/bench_kv_mass_bounds.py [--tokens 2048] [--prefill 1792]
[--total 128] [--windows 62 32 16] [--scorers query leverage+query] [--threads 2]
[--output benchmarks/results/kv_mass_bounds.md]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine

from streamsketch.kv import KeySelector
from streamsketch.kv.evaluate import attention_mass_kept, foresight_mass_kept, oracle_mass_kept
from streamsketch.kv.model import load_model, long_text_ids, record_attention_inputs

HERE = Path(__file__).resolve().parent
SINKS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1792)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--total", type=int, default=128)
    ap.add_argument("--windows", type=int, nargs="+", default=[62, 32, 16])
    ap.add_argument("--horizons", type=int, nargs="*", default=[32, 1])
    ap.add_argument("--scorers", nargs="*", default=["query", "leverage+query"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "kv_mass_bounds.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model(torch.device("cpu"), torch.float32)
    ids = long_text_ids(tokenizer, args.tokens, offset=args.offset)
    queries, keys, values, scale = record_attention_inputs(model, ids)
    h_kv, d = keys[0].shape[1], keys[0].shape[3]
    prefill = args.prefill

    def mean_over_layers(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        vals = [float(fn(q, k, v).mean()) for q, k, v in zip(queries, keys, values, strict=True)]
        return sum(vals) / len(vals)

    methods: list[tuple[str, Callable[[int, int], float]]] = [
        (
            "oracle: each query picks its own best older keys",
            lambda b, w: mean_over_layers(
                lambda q, k, v: oracle_mass_kept(
                    q, k, budget=b, sinks=SINKS, window=w, prefill=prefill, scale=scale
                )
            ),
        )
    ]
    for horizon in [None, *args.horizons]:
        label = (
            "all future queries"
            if horizon is None
            else "the next query"
            if horizon == 1
            else f"the next {horizon} queries"
        )
        methods.append(
            (
                f"foresight eviction, knows {label}",
                lambda b, w, h=horizon: mean_over_layers(
                    lambda q, k, v: foresight_mass_kept(
                        q,
                        k,
                        budget=b,
                        sinks=SINKS,
                        window=w,
                        prefill=prefill,
                        horizon=h,
                        scale=scale,
                    )
                ),
            )
        )
    for name in args.scorers:
        methods.append(
            (
                f"`{name}` (causal scorer)",
                lambda b, w, s=name: mean_over_layers(
                    lambda q, k, v: attention_mass_kept(
                        q,
                        k,
                        v,
                        lambda: KeySelector(
                            h_kv, d, b, sinks=SINKS, window=w, scorer=s, scale=scale
                        ),
                        prefill=prefill,
                        scale=scale,
                    )
                ),
            )
        )
    splits = [(args.total - SINKS - w, w) for w in args.windows]
    table: dict[str, list[float]] = {}
    for label, fn in methods:
        table[label] = [fn(b, w) for b, w in splits]
        cells = ", ".join(
            f"{SINKS}/{b}/{w}: {m:.3f}" for (b, w), m in zip(splits, table[label], strict=True)
        )
        print(f"{label}: {cells}", flush=True)

    head = " | ".join(f"{SINKS}/{b}/{w}" for b, w in splits)
    lines = [
        "# Attention mass kept: causal scorers against references that read the future",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF); pydoc_data.topics tokens {args.offset}.."
        f"{args.offset + args.tokens}, prefill {prefill}, then one token at a time; total "
        f"{args.total} keys per head; mean over all layers, query heads and decode steps. "
        f"CPU {machine()}, {args.threads} threads; {time.time() - started:.0f} s. Command: "
        f"`python benchmarks/bench_kv_mass_bounds.py --tokens {args.tokens} --prefill {prefill} "
        f"--offset {args.offset} --total {args.total} --windows "
        f"{' '.join(map(str, args.windows))} --horizons {' '.join(map(str, args.horizons))} "
        f"--scorers {' '.join(args.scorers)}`.",
        "",
        f"| method (sinks/selected/window) | {head} |",
        "|---|" + "---|" * len(splits),
    ]
    for label, vals in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f}" for m in vals) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
