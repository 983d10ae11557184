"""Pass-key retrieval through a compressed KV cache: does the cache keep what a question asks for?

A five-digit key is hidden at several depths of filler text (two kinds: plain
sentences of this script's own, and Python reference prose, which holds
numbers of its own), in contexts of several lengths; the question comes at
the end, and the model answers greedily. A trial counts as recalled when
the key's five digits appear in the first ``--answer`` generated tokens.

Two modes:

- ``inside``: the question is part of the prompt, which is prefilled in one
  call (as ``model.generate`` does), so the cache compresses the prompt
  knowing the question's queries;
- ``after``: the context is prefilled and compressed first, then the question
  is fed as a second chunk: what survives must be found without knowing the
  question.

A one-chunk prefill through ``SketchCache`` gives every layer the same
queries, keys and values as the full cache (each layer compresses after its
own attention), so the prefill is run once per prompt with a recording hook
and each cache is then filled from the recording (the same calls the cache
gets from the model: ``update`` and then the queries). The answer is decoded
through the model for each cache. Writes ``benchmarks/results/kv_retrieval.md``.

Usage: ``python benchmarks/bench_kv_retrieval.py [--contexts 1024 2048 4096]
[--depths 0.1 0.5 0.9] [--fillers plain prose] [--total 256] [--modes inside after]
[--caches full window default ...] [--threads 2] [--output PATH]``
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import load_average, machine
from transformers import DynamicCache

from streamsketch.kv import SketchCache
from streamsketch.kv.model import load_model, record_attention_inputs

HERE = Path(__file__).resolve().parent

# Plain filler: a few short sentences without digits, shuffled in every block, so the needle
# stands out the way it does in the usual pass-key test.
_PLAIN = [
    "The lake is calm.",
    "The road is long.",
    "The stars are bright.",
    "Here we stand.",
    "Back and forth we go.",
]
PREAMBLE = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def filler_ids(tokenizer: Any, kind: str, n_tokens: int, seed: int) -> list[int]:
    """At least ``n_tokens`` token ids of filler of ``kind`` (``plain`` or ``prose``)."""
    rng = random.Random(seed)
    if kind == "plain":
        out: list[int] = []
        while len(out) < n_tokens:
            sentences = _PLAIN[:]
            rng.shuffle(sentences)
            out += tokenizer(" " + " ".join(sentences)).input_ids
        return out
    if kind == "prose":
        from pydoc_data.topics import topics

        names = sorted(topics)
        rng.shuffle(names)
        text = "\n\n".join(topics[name] for name in names[:60])
        out = tokenizer(text).input_ids
        if len(out) < n_tokens:
            raise ValueError("not enough prose")
        start = rng.randrange(0, len(out) - n_tokens)
        return out[start : start + n_tokens]
    raise ValueError(f"filler must be plain or prose, got {kind!r}")


def make_prompt(
    tokenizer: Any, context: int, depth: float, kind: str, seed: int
) -> tuple[list[int], list[int], str]:
    """``(context_ids, question_ids, key)``: a ``context``-token preamble and filler, the needle
    at ``depth`` of the filler."""
    key = str(random.Random(1000 + seed).randrange(10000, 100000))
    needle_ids = tokenizer(needle(key)).input_ids
    question_ids = tokenizer(QUESTION).input_ids
    pre = tokenizer(PREAMBLE).input_ids
    body = context - len(needle_ids) - len(pre)
    fill = filler_ids(tokenizer, kind, body, seed)[:body]
    at = int(depth * body)
    return pre + fill[:at] + needle_ids + fill[at:], question_ids, key


class Recorded:
    """The queries, keys and values of every layer for one forward, and its last logits."""

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        seen: list[torch.Tensor] = []
        # The recording forward's own logits (one forward per prompt, not two).
        handle = model.register_forward_hook(lambda m, a, out: seen.append(out.logits[:, -1]))
        try:
            self.q, self.k, self.v, _ = record_attention_inputs(model, ids)
        finally:
            handle.remove()
        self.logits = seen[-1].float()

    def fill(self, cache: Any) -> None:
        """Feed the recording to ``cache`` layer by layer as the model's forward would."""
        for i, (q, k, v) in enumerate(zip(self.q, self.k, self.v, strict=True)):
            cache.update(k, v, i)
            layer = cache.layers[i]
            observe = getattr(layer, "observe", None)
            if observe is not None:
                observe(q)


def greedy(model: Any, cache: Any, first_logits: torch.Tensor, steps: int) -> list[int]:
    """``steps`` greedy tokens, starting from the logits of the last prompt token."""
    token = first_logits.argmax(-1, keepdim=True)
    out = [int(token)]
    with torch.no_grad():
        for _ in range(steps - 1):
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            out.append(int(token))
    return out


def cache_factories(total: int) -> dict[str, Callable[[], Any]]:
    return {
        "full": DynamicCache,
        "window": lambda: SketchCache(total, scorer="window"),
        "knorm": lambda: SketchCache(total, scorer="knorm"),
        "default": lambda: SketchCache(total),
        "default, no observation window": lambda: SketchCache(total, observation_window=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--fillers", nargs="+", default=["plain", "prose"])
    ap.add_argument("--total", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["inside", "after"])
    ap.add_argument("--caches", nargs="+", default=None, help="names of cache_factories")
    ap.add_argument("--answer", type=int, default=8, help="greedy tokens generated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "kv_retrieval.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    load = load_average()
    model, tokenizer = load_model()
    from streamsketch.kv import enable

    enable(model)
    factories = cache_factories(args.total)
    names = list(factories) if args.caches is None else args.caches
    hits: dict[tuple[str, str], list[bool]] = {(m, n): [] for m in args.modes for n in names}
    trials = []
    for seed, (context, depth, kind) in enumerate(
        (c, d, f) for c in args.contexts for d in args.depths for f in args.fillers
    ):
        ctx, question, key = make_prompt(tokenizer, context, depth, kind, seed)
        trial: dict[str, Any] = {"context": context, "depth": depth, "filler": kind, "key": key}
        for mode in args.modes:
            if mode == "inside":
                rec = Recorded(model, torch.tensor([ctx + question]))
                tail = None
            else:
                rec = Recorded(model, torch.tensor([ctx]))
                tail = torch.tensor([question])
            for name in names:
                cache = factories[name]()
                rec.fill(cache)
                logits = rec.logits
                if tail is not None:
                    with torch.no_grad():
                        logits = model(tail, past_key_values=cache, use_cache=True).logits[:, -1]
                answer = tokenizer.decode(greedy(model, cache, logits, args.answer))
                ok = key in answer.replace(" ", "")
                hits[(mode, name)].append(ok)
                trial[f"{mode}/{name}"] = answer
                print(f"{context} {depth} {kind} {mode} {name}: {ok} {answer!r}", flush=True)
            del rec
        trials.append(trial)
    n = len(trials)
    lines = [
        "# Pass-key retrieval through the KV cache",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), CPU {machine()}, float32; {n} prompts: contexts "
        f"{args.contexts} tokens x depths {args.depths} x fillers {args.fillers}; "
        f"{args.total} keys per head for every compressed cache; greedy answer of "
        f"{args.answer} tokens, recalled when the five digits appear in it. Load average "
        f"{load:.2f} at the start; {time.time() - started:.0f} s. Command: `python "
        f"benchmarks/bench_kv_retrieval.py --contexts {' '.join(map(str, args.contexts))} "
        f"--depths {' '.join(map(str, args.depths))} --fillers {' '.join(args.fillers)} "
        f"--total {args.total} --modes {' '.join(args.modes)} --caches {' '.join(names)}`.",
        "",
        "`inside`: the question is part of the prompt (one prefill); `after`: the context is "
        "compressed first and the question fed afterwards.",
        "",
    ]
    head = "| cache | mode | recalled | " + " | ".join(f"{c} tokens" for c in args.contexts)
    lines += [head + " |", "|---|---|---|" + "---|" * len(args.contexts)]
    per_ctx = n // len(args.contexts)
    for mode in args.modes:
        for name in names:
            h = hits[(mode, name)]
            cols = [
                f"{sum(h[i * per_ctx : (i + 1) * per_ctx])}/{per_ctx}"
                for i in range(len(args.contexts))
            ]
            lines.append(f"| {name} | {mode} | {sum(h)}/{n} | " + " | ".join(cols) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps(trials, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
