"""Run configuration, per-environment defaults and the result of one training run."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

CRITIC_FREE_ALGOS = ("grpo", "rloo", "batch_mean", "ema", "none")
ALGOS = ("ppo", *CRITIC_FREE_ALGOS)


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
    return replace(TrainConfig(env_id=env_id, algo=algo), **values)


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
