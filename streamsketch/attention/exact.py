"""Exact attention, the reference every approximation is tested against."""

from __future__ import annotations

from typing import Any

import torch

from ._common import causal_mask, check_qkv, expand_kv, parse_f

__all__ = ["exact_attention", "poly_weights"]


def poly_weights(scores: torch.Tensor, p: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-normalised ``|s|^p`` weights, computed stably (scaled by the row's max ``|s|``).

    ``|s|^p`` equals ``s^p`` for even ``p``; odd ``p`` uses the absolute value so
    the weights stay non-negative (the ``f(x) = |x|^p`` of LevAttention).
    """
    a = scores.abs()
    if mask is not None:
        a = a.masked_fill(~mask, 0.0)
    top = a.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    w = (a / top) ** p
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: Any = "softmax",
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention ``sum_j w_ij v_j`` with ``w_ij`` from ``f`` of ``q_i·k_j``.

    Parameters
    ----------
    q : torch.Tensor, (B, H, n_q, d)
    k : torch.Tensor, (B, H_kv, n_k, d)
    v : torch.Tensor, (B, H_kv, n_k, d_v)
        ``H`` a multiple of ``H_kv`` (grouped-query attention).
    f : "softmax" or ("poly", p)
        ``softmax(scale * q.k)``, or polynomial attention
        ``|q.k|^p / sum_l |q.k_l|^p`` (scale-free).
    causal : bool
        Bottom-right aligned causal mask (see ``streamsketch.attention``).
    scale : float, optional
        Softmax temperature, default ``1/sqrt(d)``.

    Returns
    -------
    torch.Tensor, (B, H, n_q, d_v), dtype of ``q``.

    Notes
    -----
    Materialises the ``(n_q, n_k)`` score matrix per head: O(n_q n_k d) time
    and O(n_q n_k) memory. Meant for tests and references; use
    ``scaled_dot_product_attention`` for speed.
    """
    kind, p = parse_f(f)
    H, _ = check_qkv(q, k, v)
    k, v = expand_kv(k, H), expand_kv(v, H)
    n_q, n_k = q.shape[2], k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    mask = causal_mask(n_q, n_k, q.device, q_start=n_k - n_q) if causal else None
    scores = qc @ kc.transpose(-1, -2)
    if kind == "softmax":
        scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        if mask is not None:  # rows with no allowed key (n_q > n_k) give 0, not NaN
            w = torch.nan_to_num(w, nan=0.0)
    else:
        w = poly_weights(scores, p, mask)
    return (w @ vc).to(q.dtype)
