"""Rollout engines: sample completions and their behaviour log-probabilities from the policy."""

from posttrain.rollout.engine import Completion, RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFRolloutEngine

__all__ = ["Completion", "HFRolloutEngine", "RolloutEngine", "SamplingParams"]
