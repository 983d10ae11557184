"""Oblivious linear sketches, mergeable by addition."""

from .countsketch import CountSketch, countsketch

__all__ = ["CountSketch", "countsketch"]
