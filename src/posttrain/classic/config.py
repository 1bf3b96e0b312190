"""Run configuration, per-environment defaults and the result of one training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

CRITIC_FREE_ALGOS = ("grpo", "rloo", "batch_mean", "ema", "none")
ALGOS = ("ppo", *CRITIC_FREE_ALGOS)
GROUP_ALGOS = ("grpo", "rloo")  # a group baseline: one episode per group gives every advantage 0
RETURN_MODES = ("episode", "to_go")


def is_count(value: Any) -> bool:
    """True for a whole number >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _unit(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


# field -> (test, what it must be): a run with nonsense settings fails when it is configured, not
# after minutes of environment steps (or, worse, runs and reports a meaningless curve)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "algo": (lambda v: v in ALGOS, f"one of {list(ALGOS)}"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "return_mode": (lambda v: v in RETURN_MODES, f"one of {list(RETURN_MODES)}"),
    "lr": (_positive, "a finite number > 0"),
    "clip": (_positive, "a finite number > 0 (the PPO clip range)"),
    "clip_value": (lambda v: v is None or _positive(v), "a finite number > 0, or None (no value clipping)"),
    "max_grad_norm": (_positive, "a finite number > 0"),
    "ent_coef": (_non_negative, "a finite number >= 0"),
    "vf_coef": (_non_negative, "a finite number >= 0"),
    "gamma": (_unit, "in [0, 1] (a discount)"),
    "lam": (_unit, "in [0, 1] (GAE's lambda)"),
    "episode_gamma": (lambda v: v is None or _unit(v), "in [0, 1], or None"),
    "ema_decay": (_unit, "in [0, 1]"),
    **{
        name: (is_count, "a whole number >= 1")
        for name in (
            "total_steps",
            "num_envs",
            "rollout_steps",
            "epochs",
            "minibatches",
            "hidden",
            "group_size",
            "num_groups",
            "min_batch_steps",
            "final_window",
        )
    },
}


def check_config(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first setting of ``config`` that makes no sense, and why."""
    for item in fields(config):
        test, expected = _RULES.get(item.name, (None, ""))
        value = getattr(config, item.name)
        if test is not None and not test(value):
            raise ValueError(f"classic setting {item.name} must be {expected}, got {value!r}")
    if config.algo in GROUP_ALGOS and config.group_size < 2:
        raise ValueError(
            f"classic setting group_size must be >= 2 for {config.algo!r} (a group of one episode has "
            f"no baseline: every advantage is 0), got {config.group_size}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run. Defaults are the common PPO settings for classic control
    (Huang et al. 2022, "The 37 Implementation Details of PPO"): 4 envs x 128 steps, 4 epochs of
    4 minibatches, Adam lr 2.5e-4 (eps 1e-5) annealed to 0, gamma 0.99, GAE lambda 0.95, clip 0.2,
    entropy 0.01, value coef 0.5, max grad norm 0.5."""

    env_id: str = "CartPole-v1"
    algo: str = "ppo"
    seed: int = 0
    total_steps: int = 500_000
    num_envs: int = 4
    rollout_steps: int = 128
    epochs: int = 4
    minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    clip_value: float | None = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    norm_adv: bool = True
    normalize_obs: bool = False
    normalize_reward: bool = False
    hidden: int = 64
    # Critic-free arms: complete episodes, groups of `group_size` per `num_groups`, rounds repeated
    # until a batch holds at least `min_batch_steps` steps.
    group_size: int = 4
    num_groups: int = 2
    same_start: bool = True
    return_mode: str = "episode"  # "episode": whole-episode return; "to_go": per-step return-to-go
    episode_gamma: float | None = None  # discount of the critic-free return; None: 1.0 / gamma
    min_batch_steps: int = 512
    ema_decay: float = 0.9
    final_window: int = 20  # final return = mean of the last this many episodes

    def __post_init__(self) -> None:
        check_config(self)

    def critic_free_gamma(self) -> float:
        """Whole-episode returns are undiscounted by default, returns-to-go use ``gamma``."""
        if self.episode_gamma is not None:
            return self.episode_gamma
        return 1.0 if self.return_mode == "episode" else self.gamma


ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {},
    "Acrobot-v1": {},
    # Continuous control: 1 env x 2048 steps, 10 epochs of 32 minibatches, lr 3e-4, no entropy bonus,
    # observation and reward normalisation (the usual MuJoCo settings of the PPO paper).
    "MountainCarContinuous-v0": {
        "num_envs": 1,
        "rollout_steps": 2048,
        "epochs": 10,
        "minibatches": 32,
        "lr": 3e-4,
        "ent_coef": 0.0,
        "normalize_obs": True,
        "normalize_reward": True,
        "min_batch_steps": 2048,
    },
}
for _mujoco in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5"):
    ENV_DEFAULTS[_mujoco] = dict(ENV_DEFAULTS["MountainCarContinuous-v0"], num_groups=1)


def make_config(env_id: str, algo: str, **overrides: Any) -> TrainConfig:
    """TrainConfig for ``env_id`` with its per-environment defaults, then ``overrides`` (None = keep)."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {ALGOS}")
    values = dict(ENV_DEFAULTS.get(env_id, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(env_id=env_id, algo=algo, **values)


@dataclass
class RunResult:
    """One finished run: its learning curve (env step, episode return) and summary numbers."""

    env_id: str
    arm: str
    seed: int
    steps: int
    wall_s: float
    final_return: float
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def steps_per_sec(self) -> float:
        return self.steps / max(self.wall_s, 1e-9)


def final_return(curve: list[tuple[int, float]], window: int) -> float:
    """Mean return of the last ``window`` finished episodes (nan if none finished)."""
    if not curve:
        return float("nan")
    tail = [ret for _, ret in curve[-window:]]
    return sum(tail) / len(tail)
