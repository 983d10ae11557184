"""The multi-head attention layer that every algorithm's ``nn.Module`` shares."""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["AttentionLayer"]


class AttentionLayer(nn.Module, abc.ABC):
    """Projections and heads around an attention function; subclasses supply ``_attend``.

    Parameters
    ----------
    embed_dim : int
        Model width ``E``; must be divisible by ``num_heads``.
    num_heads : int
        Query heads ``H``; head dim ``d = E // H``.
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention), a divisor of ``num_heads``;
        default ``num_heads``.
    causal : bool, default True
    bias : bool, default False
        Bias in the four projections.

    ``forward(x)`` maps ``(B, n, E) -> (B, n, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = bool(causal)
        kv_dim = self.head_dim * num_kv_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @abc.abstractmethod
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, H, n, d), (B, H_kv, n, d), (B, H_kv, n, d) -> (B, H, n, d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (B, n, {self.embed_dim}), got {tuple(x.shape)}")
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = self._attend(q, k, v)
        proj: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(B, n, self.embed_dim))
        return proj
