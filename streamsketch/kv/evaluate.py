"""Offline measures of a KV selector on recorded queries and keys.

``attention_mass_kept`` replays a full-cache run's queries and keys of one
layer through a :class:`~streamsketch.kv.KeySelector` (prefill, then one
token at a time) and measures, for every decode query, the fraction of its
full softmax attention mass that falls on the keys the selector holds at that
step. It exercises the real selector code path; only the attention weights
used for the measure (and, for the ``h2o`` baseline, for scoring) are
computed explicitly.

Two references frame the measure. ``oracle_mass_kept`` lets every query
pick its own best older keys, which needs the whole past at every step.
``foresight_mass_kept`` is an eviction-only cache of the same parts, the
only kind a constant-memory cache can be, that knows every future query.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .selector import KeySelector

__all__ = ["attention_mass_kept", "foresight_mass_kept", "oracle_mass_kept"]


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


def _replay_inputs(
    queries: torch.Tensor, keys: torch.Tensor, prefill: int, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Checked float32 queries and keys, the logit scale and the group size of a replay."""
    n, d = queries.shape[2], queries.shape[3]
    if not 0 < prefill < n:
        raise ValueError(f"prefill must be in (0, {n}), got {prefill}")
    scale_ = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return (
        queries.to(torch.float32),
        keys.to(torch.float32),
        scale_,
        queries.shape[1] // keys.shape[1],
    )


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
    q, k, scale, g = _replay_inputs(queries, keys, prefill, scale)
    v = values.to(torch.float32)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"values must match keys in (B, H_kv, n), got {tuple(v.shape)}")
    Hkv = k.shape[1]
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
    B, Hq, n = queries.shape[:3]
    q, k, scale, g = _replay_inputs(queries, keys, prefill, scale)
    Hkv = k.shape[1]
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


def foresight_mass_kept(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    budget: int,
    sinks: int,
    window: int,
    prefill: int,
    horizon: int | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Mass kept by an eviction-only cache that knows the future queries.

    The cache has the parts of a :class:`KeySelector` (sinks, ``budget``
    selected older keys, window) and obeys its constraint: a key once
    evicted never returns. Unlike any causal scorer it reads the decode
    queries to come. At the end of the prefill it keeps the ``budget`` older
    keys with the most attention from the next ``horizon`` decode queries
    (all of them when None), summed over each KV head's query group; at each
    decode step, when a key leaves the window, it evicts the candidate with
    the least such future attention (Belady's rule, weighted by mass). It is
    a reference for what eviction can reach, not a proven optimum: a policy
    that knows the future could still do better on some streams.

    Parameters
    ----------
    queries : torch.Tensor
        ``(B, H_q, n, d)`` queries of one layer (after RoPE).
    keys : torch.Tensor
        ``(B, H_kv, n, d)`` keys of the same run.
    budget, sinks, window : int
        The cache's parts, as in :class:`KeySelector`.
    prefill : int
        Tokens before decoding starts, ``0 < prefill < n``.
    horizon : int, optional
        Future decode queries the eviction rule reads; None for all.
    scale : float, optional
        Logit scale, ``1/sqrt(d)`` by default.
    chunk : int, default 256
        Decode queries whose full attention rows are computed at once.

    Returns
    -------
    torch.Tensor
        ``(B, H_q, n - prefill)`` float32, laid out as in
        :func:`attention_mass_kept`.

    Notes
    -----
    Cost: two passes over the full attention rows of the decode queries,
    O((n - prefill) n d H_q) each; memory O(B H_kv n (n - prefill)) floats
    for a finite ``horizon``, O(B H_kv n chunk g) otherwise.
    """
    B, Hq, n = queries.shape[:3]
    q, k, scale, g = _replay_inputs(queries, keys, prefill, scale)
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be >= 1 or None, got {horizon}")
    Hkv = k.shape[1]
    T = n - prefill

    def rows_of(c0: int, c1: int) -> torch.Tensor:
        return _softmax_rows(q[:, :, c0:c1], k, scale, torch.arange(c0, c1))

    # Attention each key receives from decode query t, summed over the group:
    # future(t) = sum over t' in [t, t + horizon) of it, from running totals.
    # With a horizon the per-query rows are kept to slide the window; without
    # one only their running total is needed.
    per_query: list[torch.Tensor] = []
    total = torch.zeros(B, Hkv, n)
    for c0 in range(prefill, n, chunk):
        r = rows_of(c0, min(c0 + chunk, n)).sum(2)  # (B, Hkv, c, n)
        if horizon is None:
            total += r.sum(2)
        else:
            per_query.extend(r.unbind(2))
    ahead = total if horizon is None else torch.stack(per_query[:horizon], 0).sum(0)

    out = torch.empty(B, Hq, T)
    kept: torch.Tensor | None = None  # (B, Hkv, m) positions of the selected older keys
    for c0 in range(prefill, n, chunk):
        c1 = min(c0 + chunk, n)
        rows = rows_of(c0, c1)  # (B, Hkv, g, c, n)
        for t in range(c0, c1):
            n_sinks = min(sinks, t + 1)
            n_window = min(window, t + 1 - n_sinks)
            lo, hi = n_sinks, t + 1 - n_window  # older keys: positions [lo, hi)
            if kept is None:
                m = min(budget, hi - lo)
                kept = ahead[:, :, lo:hi].topk(m, dim=-1).indices + lo
            elif hi > lo and n_window == window:
                # The key at hi - 1 has just left the window; keep the best `budget`.
                cand = torch.cat([kept, torch.full((B, Hkv, 1), hi - 1)], dim=2)
                m = min(budget, cand.shape[2])
                score = torch.gather(ahead, 2, cand)
                kept = torch.gather(cand, 2, score.topk(m, dim=-1).indices)
            w = rows[:, :, :, t - c0, :]  # (B, Hkv, g, n)
            mass = w[..., :n_sinks].sum(-1) + w[..., hi : t + 1].sum(-1)
            if kept.shape[2]:
                mass = mass + torch.gather(w, 3, kept[:, :, None].expand(B, Hkv, g, -1)).sum(-1)
            out[:, :, t - prefill] = mass.reshape(B, Hq)
            # Slide the look-ahead: query t is now past, query t + horizon comes into view.
            ahead = ahead - w.sum(2)
            i = t - prefill
            if horizon is not None and i + horizon < T:
                ahead = ahead + per_query[i + horizon]
    return out
