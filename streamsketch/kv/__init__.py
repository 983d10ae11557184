"""Sketch-driven KV-cache decoding: constant memory per head, fused attention kernels untouched.

``KeySelector`` (plain torch) keeps ``sinks + budget + window`` keys per head
chosen by a streaming scorer; ``SketchCache`` is a transformers ``Cache``
built on it, and ``enable(model)`` installs the attention hook that feeds the
queries to query-aware scorers. ``SketchCache`` and ``enable`` need
``transformers`` and are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .scorers import (
    SCORERS,
    AccumulatedAttentionScorer,
    KNormScorer,
    LeverageScorer,
    QueryGaussianScorer,
    QueryMeanScorer,
    Scorer,
    WindowScorer,
    make_scorer,
)
from .selector import KeySelector

__all__ = [
    "SCORERS",
    "AccumulatedAttentionScorer",
    "KNormScorer",
    "KeySelector",
    "LeverageScorer",
    "QueryGaussianScorer",
    "QueryMeanScorer",
    "Scorer",
    "SketchCache",
    "SketchCacheLayer",
    "WindowScorer",
    "disable",
    "enable",
    "make_scorer",
]

_LAZY = {
    "SketchCache": "cache",
    "SketchCacheLayer": "cache",
    "enable": "hook",
    "disable": "hook",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
