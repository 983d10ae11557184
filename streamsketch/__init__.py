"""streamsketch: streaming, mergeable sketches for numerical linear algebra and attention."""

__version__ = "0.1.0"

from .base import FeatureMap, Serializable, Sketch, load
from .linear import CountSketch, countsketch

__all__ = [
    "CountSketch",
    "FeatureMap",
    "Serializable",
    "Sketch",
    "__version__",
    "countsketch",
    "load",
]
