"""How far eviction can go: perplexity of a KV cache that evicts knowing the future.

The cache has the parts of ``SketchCache(total)`` (sinks, selected, window)
and obeys its rule: a key once evicted never returns. Its scorer is not
causal: it ranks each candidate key by the attention it will receive from
all the decode queries still to come, summed over the KV head's query group,
read from a full-cache run of the same text. Causal scorers can only
predict that quantity, so this perplexity is a reference for what eviction
with the same parts can reach (Belady's rule weighted by attention; not a
proven optimum), against which the library's scorers are measured.

Protocol as ``streamsketch eval``: real text, a prefill, then teacher-forced
decoding one token at a time through the cache; perplexity over the decoded
tokens against the full cache's. ``--scorers`` adds causal scorers of the
library at the same totals for comparison.

Writes ``benchmarks/results/kv_foresight.md`` (or ``--output``).

Usage: ``python benchmarks/bench_kv_foresight.py [--tokens 3072] [--prefill 1024]
[--offset 0] [--totals 128 256 512] [--scorers leverage+query] [--uncentred] [--threads 2]
[--output benchmarks/results/kv_foresight.md]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine
from transformers import DynamicCache

from streamsketch.kv import SketchCache, enable
from streamsketch.kv.cache import SketchCacheLayer, split_total
from streamsketch.kv.evaluate import _softmax_rows
from streamsketch.kv.model import (
    decode_nll,
    load_model,
    long_text_ids,
    perplexity,
    record_attention_inputs,
)
from streamsketch.kv.scorers import Scorer

HERE = Path(__file__).resolve().parent


class FutureAttentionScorer(Scorer):
    """Scores a key by the attention it receives from the queries still to come.

    ``table (H_kv, T + 1, n)``: ``table[:, i, p]`` is the attention key ``p``
    receives from the decode queries at positions ``>= prefill + i`` in the
    full-cache run (summed over each KV head's group). After the cache has
    seen ``s`` tokens the next query is at position ``s``, so candidates are
    scored with row ``s - prefill``.
    """

    name = "future-attention"

    def __init__(self, *args: Any, table: torch.Tensor, prefill: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table, self.prefill, self.seen = table, prefill, 0

    def _observe_keys(self, keys: torch.Tensor) -> None:
        self.seen += keys.shape[2]

    def _score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        row = min(max(self.seen - self.prefill, 0), self.table.shape[1] - 1)
        future = self.table[:, row].to(positions.device)
        return torch.gather(future[None].expand(positions.shape[0], -1, -1), 2, positions)


class ForesightCache(SketchCache):
    """``SketchCache(total)`` whose layers evict with :class:`FutureAttentionScorer`."""

    def __init__(self, total: int, tables: list[torch.Tensor], prefill: int, head_dim: int) -> None:
        super().__init__(total)
        self.tables, self.prefill, self.head_dim = tables, prefill, head_dim

    def _new_layer(self, layer_idx: int) -> SketchCacheLayer:
        table = self.tables[layer_idx]
        scorer = FutureAttentionScorer(
            table.shape[0], self.head_dim, table=table, prefill=self.prefill
        )
        # KeySelector takes a Scorer instance where SketchCacheLayer passes the name.
        return SketchCacheLayer(self.budget, self.sinks, self.window, scorer, None, layer_idx)  # type: ignore[arg-type]


def future_tables(model: Any, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Per layer ``(H_kv, T + 1, n)``: attention from the decode queries at or after each step."""
    queries, keys, _, scale = record_attention_inputs(model, ids)
    n = ids.shape[1]
    tables = []
    for q, k in zip(queries, keys, strict=True):
        rows = _softmax_rows(q[:, :, prefill:], k, scale, torch.arange(prefill, n))
        per_query = rows[0].sum(1)  # (H_kv, T, n), summed over the group
        suffix = per_query.flip(1).cumsum(1).flip(1)
        tables.append(torch.cat([suffix, torch.zeros_like(suffix[:, :1])], dim=1))
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=3072)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--totals", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--scorers", nargs="*", default=[], help="causal scorers to compare")
    ap.add_argument(
        "--uncentred",
        action="store_true",
        help="also run each of --scorers with value_centred=False (the default until it "
        "measured worse)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "kv_foresight.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model(torch.device("cpu"), torch.float32)
    ids = long_text_ids(tokenizer, args.tokens, offset=args.offset)
    tables = future_tables(model, ids, args.prefill)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    enable(model)
    full = perplexity(decode_nll(model, ids, args.prefill, DynamicCache())[0])
    print(f"full cache: perplexity {full:.3f}", flush=True)
    rows = []
    for total in args.totals:
        caches = {
            "foresight eviction (reads the future)": ForesightCache(
                total, tables, args.prefill, head_dim
            )
        }
        for name in args.scorers:
            caches[f"`{name}`"] = SketchCache(total, scorer=name)
            if args.uncentred:
                caches[f"`{name}`, uncentred"] = SketchCache(
                    total, scorer=name, value_centred=False
                )
        for label, cache in caches.items():
            ppl = perplexity(decode_nll(model, ids, args.prefill, cache)[0])
            rows.append((total, label, ppl))
            print(
                f"total {total} {label}: perplexity {ppl:.3f} ({100 * (ppl / full - 1):+.1f}%)",
                flush=True,
            )
    lines = [
        "# KV-cache eviction with foresight: perplexity",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF); pydoc_data.topics tokens {args.offset}.."
        f"{args.offset + args.tokens}, prefill {args.prefill}, then teacher-forced decoding one "
        f"token at a time; CPU {machine()}, float32, {args.threads} threads; "
        f"{time.time() - started:.0f} s. Command: `python benchmarks/bench_kv_foresight.py "
        f"--tokens {args.tokens} --prefill {args.prefill} --offset {args.offset} --totals "
        f"{' '.join(map(str, args.totals))}"
        + (f" --scorers {' '.join(args.scorers)}" if args.scorers else "")
        + (" --uncentred" if args.uncentred else "")
        + "`.",
        "",
        f"Full cache: perplexity {full:.3f}. Foresight eviction: the cache's parts and "
        "eviction rule, with each key ranked by the attention the remaining decode queries "
        "give it in the full-cache run.",
        "",
        "| total keys/head | sinks/selected/window | method | perplexity | vs full |",
        "|---|---|---|---|---|",
    ]
    for total, label, ppl in rows:
        s, b, w = split_total(total)
        lines.append(
            f"| {total} | {s}/{b}/{w} | {label} | {ppl:.3f} | {100 * (ppl / full - 1):+.1f}% |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
