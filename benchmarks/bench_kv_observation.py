"""Perplexity of SketchCache as one of its arguments varies, on several texts.

The observation window (``SketchCache(observation_window=w, pool_kernel=p)``)
ranks a prompt's keys by the exact attention of its last ``w`` queries and,
at every decoding step, keeps a candidate while either the scorer or those
recent queries rank it high. This script measures what that costs or gains
in perplexity on the ``streamsketch eval`` protocol (real text, a prefill,
teacher-forced decoding one token at a time) at several text offsets, one
cache at a time, with the full cache as reference. Retrieval is measured by
``bench_kv_retrieval.py``. ``--vary interval 1 16`` measures instead what
re-ranking the selected keys only every ``interval`` decoding steps costs.

Usage: ``python benchmarks/bench_kv_observation.py [--tokens 1536] [--prefill 512]
[--total 256] [--offsets 60000 0 20000] [--vary observation_window 0 8 16] [--pool 15]
[--output PATH]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import load_average, machine
from transformers import DynamicCache

from streamsketch.kv import SketchCache, enable
from streamsketch.kv.model import decode_nll, load_model, long_text_ids, perplexity

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--total", type=int, default=256)
    ap.add_argument("--offsets", type=int, nargs="+", default=[60000, 0, 20000])
    ap.add_argument(
        "--vary",
        nargs="+",
        default=["observation_window", "0", "8", "16"],
        metavar=("ARGUMENT", "VALUE"),
        help="a SketchCache integer argument and the values it takes",
    )
    ap.add_argument("--pool", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "kv_observation.md")
    args = ap.parse_args()
    name, values = args.vary[0], [int(v) for v in args.vary[1:]]
    if name not in ("observation_window", "interval", "pool_kernel") or not values:
        ap.error("--vary takes observation_window, interval or pool_kernel and values")
    torch.set_num_threads(args.threads)
    started, load = time.time(), load_average()
    model, tokenizer = load_model()
    enable(model)
    rows: dict[int, list[tuple[float, float]]] = {w: [] for w in values}
    fulls = []
    for offset in args.offsets:
        ids = long_text_ids(tokenizer, args.tokens, offset=offset)
        full = perplexity(decode_nll(model, ids, args.prefill, DynamicCache())[0])
        fulls.append(full)
        print(f"offset {offset}: full {full:.3f}", flush=True)
        for w in values:
            kwargs = {"pool_kernel": args.pool, name: w}
            cache = SketchCache(args.total, **kwargs)
            nll, seconds = decode_nll(model, ids, args.prefill, cache)
            ppl = perplexity(nll)
            ms = 1000 * seconds / (args.tokens - args.prefill - 1)
            rows[w].append((ppl, ms))
            print(
                f"offset {offset}: {name} {w} {ppl:.3f} ({100 * (ppl / full - 1):+.2f}%)",
                flush=True,
            )
    cols = " | ".join(f"offset {o}" for o in args.offsets)
    lines = [
        f"# `{name}`: perplexity against the full cache",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), CPU {machine()}, float32, {args.threads} threads; "
        f"pydoc_data.topics, {args.tokens} tokens at each offset, prefill {args.prefill}, "
        f"teacher-forced decoding; `SketchCache({args.total})` (default split and scorer) "
        f"with `{name}` as listed, other arguments at their defaults (`pool_kernel={args.pool}`). "
        f"Load average "
        f"{load:.2f} at the start; {time.time() - started:.0f} s. Command: `python "
        f"benchmarks/bench_kv_observation.py --tokens {args.tokens} --prefill {args.prefill} "
        f"--total {args.total} --offsets {' '.join(map(str, args.offsets))} --vary {name} "
        f"{' '.join(map(str, values))} --pool {args.pool} "
        f"--output benchmarks/results/{args.output.name}`.",
        "",
        "Each cell: perplexity vs full (ms per decoded token, one run; timings shared the "
        "machine with nothing else of this session's but are not interleaved: read "
        "`bench_kv_decode.py` for speed).",
        "",
        f"| {name} | {cols} | mean vs full |",
        "|---|" + "---|" * (len(args.offsets) + 1),
        "| full cache | " + " | ".join(f"{f:.3f}" for f in fulls) + " | |",
    ]
    for w, cells in rows.items():
        rel = [100 * (p / f - 1) for (p, _), f in zip(cells, fulls, strict=True)]
        text = " | ".join(f"{r:+.2f}% ({ms:.0f} ms)" for r, (_, ms) in zip(rel, cells, strict=True))
        lines.append(f"| {w} | {text} | {sum(rel) / len(rel):+.2f}% |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
