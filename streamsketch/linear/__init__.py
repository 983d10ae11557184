"""Oblivious linear sketches, mergeable by addition, and the feature-map updater."""

from .countsketch import CountSketch, countsketch
from .gaussian import GaussianSketch
from .polysketch import PolySketch
from .srht import SRHT
from .tensorsketch import TensorSketch
from .updater import LinearAttentionState

__all__ = [
    "SRHT",
    "CountSketch",
    "GaussianSketch",
    "LinearAttentionState",
    "PolySketch",
    "TensorSketch",
    "countsketch",
]
