"""Attention algorithms in torch with one signature, in the style of
``torch.nn.functional.scaled_dot_product_attention``: ``q, k, v`` of shape
``(B, H, n, d)`` (``k``/``v`` may have fewer heads: grouped-query attention),
``causal: bool`` with a bottom-right aligned mask.

This subpackage imports torch; the rest of streamsketch does not.
"""

from ._layer import AttentionLayer
from .exact import exact_attention
from .hyper import HyperAttention, hyper_attention
from .lev import LevAttention, lev_attention
from .polysketch import PolySketchAttention, PolySketchMap, polysketch_attention

__all__ = [
    "AttentionLayer",
    "HyperAttention",
    "LevAttention",
    "PolySketchAttention",
    "PolySketchMap",
    "exact_attention",
    "hyper_attention",
    "lev_attention",
    "polysketch_attention",
]
