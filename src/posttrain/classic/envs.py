"""Gymnasium environments for the classic-control study: vector envs, group starts, normalisers."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv


@dataclass(frozen=True)
class EnvSpec:
    """What the policy needs to know about an environment's spaces."""

    obs_dim: int
    action_dim: int  # number of discrete actions, or the size of a continuous action
    continuous: bool
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None


def env_spec(env_id: str) -> EnvSpec:
    """Read the observation / action spaces of ``env_id`` (flat Box observations only)."""
    env = gym.make(env_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"{env_id}: only flat Box observations are supported, got {obs_space}")
        if isinstance(act_space, gym.spaces.Discrete):
            return EnvSpec(int(obs_space.shape[0]), int(act_space.n), continuous=False)
        if isinstance(act_space, gym.spaces.Box):
            low = act_space.low.astype(np.float32)
            high = act_space.high.astype(np.float32)
            return EnvSpec(int(obs_space.shape[0]), int(act_space.shape[0]), True, low, high)
        raise ValueError(f"{env_id}: unsupported action space {act_space}")
    finally:
        env.close()


def make_vector_env(env_id: str, num_envs: int) -> SyncVectorEnv:
    """A SyncVectorEnv in SAME_STEP autoreset mode.

    Gymnasium 1.x defaults to NEXT_STEP autoreset, where the step *after* a done only returns the
    reset observation (its action is ignored and its reward is a fake 0). SAME_STEP resets inside the
    done step instead: the returned observation is already the next episode's first one and the true
    last observation is in ``info["final_obs"]`` (needed to bootstrap a time-limit truncation), so
    every step of the rollout is a real transition.
    """
    return SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)],
        copy=False,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )


def group_start_seeds(
    rng: np.random.Generator, num_groups: int, group_size: int, same_start: bool
) -> np.ndarray:
    """Reset seeds ``[num_groups * group_size]`` for one round of complete-episode rollouts.

    ``same_start``: the G members of a group share one seed, so they start from the identical reset
    state and differ only by the policy's sampling, as GRPO's samples of one prompt do. Otherwise
    every member gets its own seed (G parallel environments from different random starts).
    """
    if same_start:
        return np.repeat(rng.integers(0, 2**31 - 1, size=num_groups), group_size)
    return rng.integers(0, 2**31 - 1, size=num_groups * group_size)


class RunningMeanStd:
    """Running mean and variance of a stream of batches (Chan et al. 1979 parallel update)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = 1e-4

    def update(self, batch: np.ndarray) -> None:
        batch_mean, batch_var, n = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total


class ObservationNormalizer:
    """obs -> clip((obs - mean) / sqrt(var + eps), -clip, clip) with running statistics; float32.

    Disabled, it only casts to float32 (MuJoCo returns float64).
    """

    def __init__(self, obs_dim: int, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.stats = RunningMeanStd((obs_dim,))
        self.clip, self.eps = clip, eps

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, dtype=np.float32)
        if update:
            self.stats.update(np.atleast_2d(obs))
        normed = (obs - self.stats.mean) / np.sqrt(self.stats.var + self.eps)
        return np.clip(normed, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (Engstrom et al. 2020, "Implementation
    Matters in Deep Policy Gradients"); keeps the critic's targets O(1) on MuJoCo. Disabled: identity."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool, clip: float = 10.0) -> None:
        self.enabled, self.gamma, self.clip = enabled, gamma, clip
        self.stats = RunningMeanStd(())
        self.running_return = np.zeros(num_envs)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rewards
        self.running_return = self.running_return * self.gamma + rewards
        self.stats.update(self.running_return)
        self.running_return[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.stats.var + 1e-8), -self.clip, self.clip)
