"""Shared checks and helpers of the torch attention functions.

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: queries
``(B, H, n_q, d)``, keys ``(B, H_kv, n_k, d)``, values ``(B, H_kv, n_k, d_v)``
with ``H`` a multiple of ``H_kv`` (grouped-query attention).

Causal masking is *bottom-right aligned*: query ``i`` sees keys
``j <= i + (n_k - n_q)``, which is what decoding needs (the last query sees
every key). For ``n_q == n_k`` this is the usual lower-triangular mask.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["causal_mask", "check_qkv", "expand_kv", "parse_f"]


def check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int]:
    """Validate q, k, v; return ``(H, H_kv)``. Raises TypeError/ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, n, d), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k and v must have batch size {B} like q")
    if k.shape[3] != d:
        raise ValueError(f"k must have head dim {d} like q, got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must match k in heads and length, got {tuple(v.shape)} vs {tuple(k.shape)}"
        )
    H_kv = k.shape[1]
    if H % H_kv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's heads ({H_kv})")
    return H, H_kv


def expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat KV heads to ``H`` query heads (a view when no repeat is needed)."""
    H_kv = t.shape[1]
    if H_kv == H:
        return t
    return t.repeat_interleave(H // H_kv, dim=1)


def causal_mask(
    n_q: int, n_k: int, device: torch.device, q_start: int = 0, k_start: int = 0
) -> torch.Tensor:
    """Boolean ``(n_q, n_k)`` mask, True where allowed, bottom-right aligned.

    ``q_start``/``k_start`` offset the rows/columns inside the full problem
    (used by blockwise algorithms): allowed iff ``k_start + j <= q_start + i + (N_k - N_q)``
    where the caller folds the alignment shift into ``q_start``.
    """
    qi = torch.arange(n_q, device=device)[:, None] + q_start
    kj = torch.arange(n_k, device=device)[None, :] + k_start
    return kj <= qi


def parse_f(f: Any) -> tuple[str, int]:
    """``"softmax"`` -> ("softmax", 0); ``("poly", p)`` -> ("poly", p) with integer p >= 1."""
    if f == "softmax":
        return "softmax", 0
    if isinstance(f, tuple) and len(f) == 2 and f[0] == "poly":
        p = f[1]
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"f=('poly', p) needs an integer p >= 1, got {p!r}")
        return "poly", p
    raise ValueError(f"f must be 'softmax' or ('poly', p), got {f!r}")
