"""The algorithm core: pure tensor functions registered by name, and presets that combine them.

Importing this package registers every estimator, loss, KL estimator and aggregation.
"""

from posttrain.algorithms import advantages, aggregate, distill, kl, losses  # noqa: F401  (registration)
from posttrain.algorithms.presets import PRESETS, AlgorithmPreset, get_preset
from posttrain.algorithms.registry import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PRESETS",
    "AlgorithmPreset",
    "get_preset",
]
