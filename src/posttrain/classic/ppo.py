"""PPO with a learned critic on gymnasium vector environments, built on ``posttrain.algorithms``.

The same functions that train LLMs do the math here: ``ADVANTAGES["gae"]`` over rows split at
episode ends (``segments.py``), ``POLICY_LOSSES["ppo_clip"]``, ``value.clipped_value_loss``,
``aggregate.aggregate_loss`` and ``masked.masked_whiten``. Minibatches are flat samples laid out as
``[M, 1]`` rows (one action per row), so every loss sees the ``[batch, time]`` contract.
(Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from posttrain.algorithms.aggregate import aggregate_loss
from posttrain.algorithms.masked import masked_whiten
from posttrain.algorithms.registry import ADVANTAGES, POLICY_LOSSES
from posttrain.algorithms.value import clipped_value_loss
from posttrain.classic.config import RunResult, TrainConfig, final_return
from posttrain.classic.envs import ObservationNormalizer, RewardScaler, env_spec, make_vector_env
from posttrain.classic.policy import Agent
from posttrain.classic.segments import SegmentLayout, bootstrap_grid

ProgressFn = Callable[[int], None]


@dataclass
class Samples:
    """Flat training samples ``[M, ...]``; ``old_values`` / ``returns`` are unused without a critic."""

    obs: Tensor
    actions: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    old_values: Tensor
    returns: Tensor


def make_agent(config: TrainConfig, with_critic: bool) -> tuple[Agent, torch.optim.Adam]:
    """Agent and Adam (eps 1e-5) for ``config``'s environment, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    spec = env_spec(config.env_id)
    agent = Agent(spec.obs_dim, spec.action_dim, spec.continuous, config.hidden, with_critic)
    return agent, torch.optim.Adam(agent.parameters(), lr=config.lr, eps=1e-5)


def anneal(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_done: int) -> None:
    """Linear learning-rate decay to 0 at ``total_steps``."""
    if config.anneal_lr:
        frac = max(1.0 - steps_done / config.total_steps, 0.0)
        for group in optimizer.param_groups:
            group["lr"] = frac * config.lr


def minibatch_loss(agent: Agent, batch: Samples, config: TrainConfig, with_critic: bool) -> Tensor:
    """pg + vf_coef * value loss - ent_coef * entropy on a minibatch laid out as ``[M, 1]`` rows."""
    logprobs, entropy, values = agent.evaluate(batch.obs, batch.actions)
    loss_mask = torch.ones_like(logprobs).unsqueeze(1)
    advantages = batch.advantages.unsqueeze(1)
    if config.norm_adv and with_critic:
        advantages = masked_whiten(advantages, loss_mask)
    per_token, _ = POLICY_LOSSES.call(
        "ppo_clip",
        {
            "logprobs": logprobs.unsqueeze(1),
            "old_logprobs": batch.old_logprobs.unsqueeze(1),
            "advantages": advantages,
            "loss_mask": loss_mask,
        },
        {"clip_low": config.clip, "clip_high": config.clip},
    )
    loss = aggregate_loss(per_token, loss_mask, "token-mean")
    loss = loss - config.ent_coef * aggregate_loss(entropy.unsqueeze(1), loss_mask, "token-mean")
    if with_critic:
        value_loss, _ = clipped_value_loss(
            values.unsqueeze(1),
            batch.old_values.unsqueeze(1),
            batch.returns.unsqueeze(1),
            loss_mask,
            cliprange_value=config.clip_value,
        )
        loss = loss + config.vf_coef * aggregate_loss(value_loss, loss_mask, "token-mean")
    return loss


def update(
    agent: Agent, optimizer: torch.optim.Optimizer, samples: Samples, config: TrainConfig, with_critic: bool
) -> None:
    """``epochs`` passes over shuffled minibatches, gradient norm clipped to ``max_grad_norm``."""
    size = samples.obs.shape[0]
    minibatch = max(size // config.minibatches, 1)
    for _ in range(config.epochs):
        order = torch.randperm(size)
        for start in range(0, size - minibatch + 1, minibatch):
            idx = order[start : start + minibatch]
            batch = Samples(*(t[idx] for t in vars(samples).values()))
            loss = minibatch_loss(agent, batch, config, with_critic)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
            optimizer.step()


def gae_over_rollout(
    rewards: Tensor,
    values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    final_values: Tensor,
    next_values: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """GAE for a ``[T, N]`` rollout through the registry's ``gae`` -> (advantages, returns) ``[T, N]``.

    Columns are split into rows at episode ends; a row bootstraps from V(final obs) on time-limit
    truncation, V(next obs) at the rollout's cut-off and 0 on termination (``segments.py``).
    """
    layout = SegmentLayout.from_dones(terminated | truncated)
    boot = bootstrap_grid(terminated, truncated, final_values, next_values)
    advantages, returns = ADVANTAGES.call(
        "gae",
        {
            "token_rewards": layout.to_rows(rewards),
            "loss_mask": layout.loss_mask,
            "values": layout.to_rows(values),
            "bootstrap_values": layout.at_row_ends(boot),
        },
        {"gamma": gamma, "lam": lam, "whiten": False},
    )
    return layout.to_time(advantages), layout.to_time(returns)


def train_ppo(config: TrainConfig, progress: ProgressFn | None = None) -> RunResult:
    """Train PPO for ``config.total_steps`` environment steps; returns the learning curve."""
    torch.set_num_threads(1)
    spec = env_spec(config.env_id)
    agent, optimizer = make_agent(config, with_critic=True)
    envs = make_vector_env(config.env_id, config.num_envs)
    obs_norm = ObservationNormalizer(spec.obs_dim, config.normalize_obs)
    reward_scale = RewardScaler(config.num_envs, config.gamma, config.normalize_reward)
    n, horizon = config.num_envs, config.rollout_steps
    obs_buf = torch.zeros(horizon, n, spec.obs_dim)
    act_buf = torch.zeros((horizon, n, spec.action_dim) if spec.continuous else (horizon, n))
    logp_buf, val_buf = torch.zeros(horizon, n), torch.zeros(horizon, n)
    rew_buf = np.zeros((horizon, n), dtype=np.float32)
    term_buf, trunc_buf = np.zeros((horizon, n), dtype=bool), np.zeros((horizon, n), dtype=bool)

    raw_obs, _ = envs.reset(seed=config.seed)
    obs = torch.from_numpy(obs_norm(raw_obs))
    episode_return = np.zeros(n)
    curve: list[tuple[int, float]] = []
    steps, start = 0, time.perf_counter()
    while steps < config.total_steps:
        anneal(optimizer, config, steps)
        truncated_at: list[tuple[int, int, np.ndarray]] = []
        with torch.no_grad():
            for t in range(horizon):
                obs_buf[t] = obs
                actions, logp_buf[t], val_buf[t] = agent.act(obs)
                act_buf[t] = actions
                env_actions = actions.numpy()
                if spec.continuous:
                    env_actions = np.clip(env_actions, spec.action_low, spec.action_high)
                raw_obs, reward, term, trunc, info = envs.step(env_actions)
                steps += n
                done = term | trunc
                rew_buf[t] = reward_scale(reward, done)
                term_buf[t], trunc_buf[t] = term, trunc
                episode_return += reward
                for i in np.flatnonzero(done).tolist():
                    curve.append((steps, float(episode_return[i])))
                    episode_return[i] = 0.0
                    if trunc[i] and not term[i]:
                        truncated_at.append((t, int(i), info["final_obs"][i]))
                obs = torch.from_numpy(obs_norm(raw_obs))
            final_values = torch.zeros(horizon, n)
            if truncated_at:
                final_obs = np.stack([obs_norm(o, update=False) for _, _, o in truncated_at])
                finals = agent.value(torch.from_numpy(final_obs))
                for (t, i, _), v in zip(truncated_at, finals):
                    final_values[t, i] = v
            advantages, returns = gae_over_rollout(
                torch.from_numpy(rew_buf),
                val_buf,
                torch.from_numpy(term_buf),
                torch.from_numpy(trunc_buf),
                final_values,
                agent.value(obs),
                config.gamma,
                config.lam,
            )
        samples = Samples(
            obs_buf.reshape(horizon * n, -1),
            act_buf.reshape(horizon * n, *act_buf.shape[2:]),
            logp_buf.reshape(-1),
            advantages.reshape(-1),
            val_buf.reshape(-1),
            returns.reshape(-1),
        )
        update(agent, optimizer, samples, config, with_critic=True)
        if progress is not None:
            progress(steps)
    envs.close()
    wall = time.perf_counter() - start
    return RunResult(
        config.env_id, "ppo", config.seed, steps, wall, final_return(curve, config.final_window), curve
    )
