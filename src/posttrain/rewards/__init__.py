"""Reward functions: built-in verifiers, resolution by name or import path, and batch scoring."""

from posttrain.rewards.functions import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    RewardSpec,
    RewardSpecError,
    RewardTerm,
    resolve_reward_fn,
    resolve_reward_specs,
    score_completions,
)
from posttrain.rewards.verifiers import arithmetic_exact, countdown, format_answer_tag, math_verify

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunctionError",
    "RewardSpec",
    "RewardSpecError",
    "RewardTerm",
    "arithmetic_exact",
    "countdown",
    "format_answer_tag",
    "math_verify",
    "resolve_reward_fn",
    "resolve_reward_specs",
    "score_completions",
]
