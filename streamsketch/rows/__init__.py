"""Row-sampling and row-summarising sketches: which rows matter."""

from .frequent_directions import FrequentDirections
from .leverage import leverage_scores
from .lewis import lewis_weights, lp_sensitivity_bound
from .merge_reduce import MergeReduce
from .online import OnlineRidgeLeverage
from .universal import UniversalSet

__all__ = [
    "FrequentDirections",
    "MergeReduce",
    "OnlineRidgeLeverage",
    "UniversalSet",
    "leverage_scores",
    "lewis_weights",
    "lp_sensitivity_bound",
]
