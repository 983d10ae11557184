"""Oblivious linear sketches, mergeable by addition, and the feature-map updater."""

from .countsketch import CountSketch, countsketch
from .gaussian import GaussianSketch
from .srht import SRHT
from .updater import LinearAttentionState

__all__ = ["SRHT", "CountSketch", "GaussianSketch", "LinearAttentionState", "countsketch"]
