"""streamsketch: streaming, mergeable sketches for numerical linear algebra and attention."""

__version__ = "0.1.0"

from .base import FeatureMap, Serializable, Sketch, load
from .linear import (
    SRHT,
    CountSketch,
    GaussianSketch,
    LinearAttentionState,
    PolySketch,
    TensorSketch,
    countsketch,
)
from .rows import (
    FrequentDirections,
    MergeReduce,
    OnlineRidgeLeverage,
    UniversalSet,
    leverage_scores,
    lewis_weights,
    lp_sensitivity_bound,
)

__all__ = [
    "SRHT",
    "CountSketch",
    "FeatureMap",
    "FrequentDirections",
    "GaussianSketch",
    "LinearAttentionState",
    "MergeReduce",
    "OnlineRidgeLeverage",
    "PolySketch",
    "Serializable",
    "Sketch",
    "TensorSketch",
    "UniversalSet",
    "__version__",
    "countsketch",
    "leverage_scores",
    "lewis_weights",
    "load",
    "lp_sensitivity_bound",
]
