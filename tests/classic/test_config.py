"""Classic-study settings: every default and arm is valid; nonsense fails when a run is configured."""

from __future__ import annotations

import math

import pytest

from posttrain.classic.config import ALGOS, ENV_DEFAULTS, TrainConfig, make_config
from posttrain.classic.study import parse_arm


def test_every_environment_default_and_arm_is_a_valid_config() -> None:
    for env_id in ENV_DEFAULTS:
        for algo in ALGOS:
            assert make_config(env_id, algo).env_id == env_id
    for arm in ("ppo", "grpo:togo@0.99", "rloo:random", "ema@1", "none:togo@0"):
        algo, overrides = parse_arm(arm)
        make_config("CartPole-v1", algo, **overrides)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("total_steps", 0, r"total_steps must be a whole number >= 1, got 0"),
        ("num_envs", 2.5, r"num_envs must be a whole number >= 1, got 2\.5"),
        ("epochs", True, r"epochs must be a whole number >= 1, got True"),
        ("lr", 0.0, r"lr must be a finite number > 0, got 0\.0"),
        ("max_grad_norm", math.inf, r"max_grad_norm must be a finite number > 0, got inf"),
        ("ent_coef", -0.01, r"ent_coef must be a finite number >= 0, got -0\.01"),
        ("gamma", 1.01, r"gamma must be in \[0, 1\] \(a discount\), got 1\.01"),
        ("lam", math.nan, r"lam must be in \[0, 1\] \(GAE's lambda\), got nan"),
        ("clip_value", 0.0, r"clip_value must be a finite number > 0, or None"),
        ("return_mode", "togo", r"return_mode must be one of \['episode', 'to_go'\], got 'togo'"),
        ("seed", -1, r"seed must be a whole number >= 0, got -1"),
        ("ema_decay", 2.0, r"ema_decay must be in \[0, 1\], got 2\.0"),
    ],
)
def test_a_nonsense_setting_is_named(setting: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"classic setting " + message):
        make_config("CartPole-v1", "ppo", **{setting: value})


def test_a_group_baseline_needs_two_episodes_per_group() -> None:
    assert make_config("CartPole-v1", "ppo", group_size=1).group_size == 1  # ppo has no groups
    assert make_config("CartPole-v1", "batch_mean", group_size=1).group_size == 1  # the batch is the group
    for algo in ("grpo", "rloo"):
        with pytest.raises(ValueError, match=rf"group_size must be >= 2 for '{algo}'"):
            make_config("CartPole-v1", algo, group_size=1)


def test_the_dataclass_checks_itself_too() -> None:
    with pytest.raises(ValueError, match=r"classic setting algo must be one of \['ppo'"):
        TrainConfig(algo="a2c")
