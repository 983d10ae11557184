"""Offline measures of a KV selector on recorded queries and keys.

``attention_mass_kept`` replays a full-cache run's queries and keys of one
layer through a :class:`~streamsketch.kv.KeySelector` (prefill, then one
token at a time) and measures, for every decode query, the fraction of its
full softmax attention mass that falls on the keys the selector holds at that
step. It exercises the real selector code path; only the attention weights
used for the measure (and, for the ``h2o`` baseline, for scoring) are
computed explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .selector import KeySelector

__all__ = ["attention_mass_kept", "oracle_mass_kept"]


def _softmax_rows(
    q: torch.Tensor, k: torch.Tensor, scale: float, upto: torch.Tensor
) -> torch.Tensor:
    """Causal softmax of queries ``(B, Hq, t, d)`` at ``upto`` over keys ``(B, Hkv, n, d)``."""
    B, Hq = q.shape[:2]
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    logits = scale * (q.reshape(B, Hkv, g * q.shape[2], -1) @ k.transpose(-1, -2))
    logits = logits.reshape(B, Hkv, g, q.shape[2], n)
    future = torch.arange(n, device=q.device)[None, :] > upto[:, None]
    logits = logits.masked_fill(future, -math.inf)
    return torch.softmax(logits, dim=-1)  # (B, Hkv, g, t, n)


def attention_mass_kept(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    make_selector: Callable[[], KeySelector],
    *,
    prefill: int,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Fraction of each decode query's softmax mass on the keys a selector keeps.

    Parameters
    ----------
    queries : torch.Tensor
        ``(B, H_q, n, d)`` queries of one layer from a full-cache run (after RoPE).
    keys, values : torch.Tensor
        ``(B, H_kv, n, d)`` the keys and values of the same run (values matter to
        value-weighted scorers).
    make_selector : callable
        Returns a fresh :class:`KeySelector` (called once).
    prefill : int
        Tokens given to the selector as one chunk before decoding starts.
    scale : float, optional
        Logit scale, ``1/sqrt(d)`` by default.
    chunk : int, default 256
        Decode queries whose full attention rows are computed at once (memory
        ``B H_q chunk n`` floats).

    Returns
    -------
    torch.Tensor
        ``(B, H_q, n - prefill)`` float32: for decode step ``t`` the mass of
        query ``t`` on the kept keys (sinks, selected, window, itself) right
        after the selector has taken token ``t``.

    Notes
    -----
    Cost: ``n - prefill`` selector updates plus O(n^2 d H_q) for the full
    attention rows of the measure.
    """
    B, Hq, n, d = queries.shape
    if not 0 < prefill < n:
        raise ValueError(f"prefill must be in (0, {n}), got {prefill}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = queries.to(torch.float32)
    k = keys.to(torch.float32)
    v = values.to(torch.float32)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"values must match keys in (B, H_kv, n), got {tuple(v.shape)}")
    Hkv = k.shape[1]
    g = Hq // Hkv
    sel = make_selector()
    needs_attention = sel.scorer.needs_attention
    out = torch.empty(B, Hq, n - prefill)

    def step(lo: int, hi: int) -> None:
        sel.append(k[:, :, lo:hi], v[:, :, lo:hi])
        sel.observe_queries(q[:, :, lo:hi])
        if needs_attention:
            assert sel.keys is not None and sel.positions is not None
            # H2O sees the attention of its own cache, as in decoding.
            pos = sel.positions[:, :, None, None, :]
            logits = scale * (
                q[:, :, lo:hi].reshape(B, Hkv, g, hi - lo, d)
                @ sel.keys[:, :, None].transpose(-1, -2)
            )
            upto = torch.arange(lo, hi)[None, None, None, :, None]
            logits = logits.masked_fill(pos > upto, -math.inf)
            sel.observe_attention(torch.softmax(logits, -1).reshape(B, Hq, hi - lo, -1))
        sel.compress()

    step(0, prefill)
    for c0 in range(prefill, n, chunk):
        c1 = min(c0 + chunk, n)
        rows = _softmax_rows(q[:, :, c0:c1], k[:, :, :c1], scale, torch.arange(c0, c1))
        for t in range(c0, c1):
            step(t, t + 1)
            assert sel.positions is not None
            w = rows[:, :, :, t - c0, :]  # (B, Hkv, g, c1)
            kept = torch.gather(w, 3, sel.positions[:, :, None, :].expand(B, Hkv, g, -1))
            out[:, :, t - prefill] = kept.sum(-1).reshape(B, Hq)
    return out


def oracle_mass_kept(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    budget: int,
    sinks: int,
    window: int,
    prefill: int,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Upper bound for :func:`attention_mass_kept`: each query picks its own best older keys.

    For decode query ``t`` the mass on the sinks, the window and the
    ``budget`` older keys of largest attention *for that query* (per KV head,
    summed over its group). No causal selector can do better with the same
    parts. Returns ``(B, H_q, n - prefill)`` float32.
    """
    B, Hq, n, d = queries.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = queries.to(torch.float32)
    k = keys.to(torch.float32)
    Hkv = k.shape[1]
    g = Hq // Hkv
    out = torch.empty(B, Hq, n - prefill)
    for c0 in range(prefill, n, chunk):
        c1 = min(c0 + chunk, n)
        rows = _softmax_rows(q[:, :, c0:c1], k[:, :, :c1], scale, torch.arange(c0, c1))
        for t in range(c0, c1):
            w = rows[:, :, :, t - c0, : t + 1]  # (B, Hkv, g, t+1)
            n_sinks = min(sinks, t + 1)
            n_window = min(window, t + 1 - n_sinks)
            fixed = w[..., :n_sinks].sum(-1) + w[..., t + 1 - n_window :].sum(-1)
            middle = w[..., n_sinks : t + 1 - n_window]
            m = middle.shape[-1]
            if m and budget:
                top = torch.topk(middle.sum(2), min(budget, m), dim=-1).indices
                fixed = fixed + torch.gather(
                    middle, 3, top[:, :, None, :].expand(B, Hkv, g, -1)
                ).sum(-1)
            out[:, :, t - prefill] = fixed.reshape(B, Hq)
    return out
