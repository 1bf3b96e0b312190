"""Critic-free arms on the PPO code: group-relative, leave-one-out, batch-mean, EMA and no baseline.

Rollouts are complete episodes played in rounds of ``num_groups x group_size`` environments; a
group is either G members reset with one seed (identical start state, like GRPO's samples of one
prompt) or G different random starts. Each episode is one row ``[episodes, max_len]``; advantages
come from ``posttrain.algorithms`` where it has the estimator:

* ``grpo``  ``ADVANTAGES["grpo"]`` scale "group": (s - mean_g) / std_g (Shao et al. 2024);
* ``rloo``  ``ADVANTAGES["rloo"]``: s - mean of the other members (Ahmadian et al. 2024);
* ``batch_mean``  ``ADVANTAGES["grpo"]`` with the whole batch as one group and scale "none";
* ``ema``   s - b, b an exponential moving average of past batch means (Williams 1992 baseline);
* ``none``  s itself (plain REINFORCE, Williams 1992).

The score s is the whole-episode (discounted) return, broadcast to every step (``return_mode =
"episode"``), or the per-step return-to-go G_t from ``ADVANTAGES["reinforce_pp"]``
(``"to_go"``); in that case the baselines compare G_t with the other members' G_t at the same time
index (one-step rows whose group is (group, t)). Updates use the PPO clipped surrogate, advantages
divided (not shifted) by their batch std so that no arm gets a hidden mean baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from posttrain.algorithms.registry import ADVANTAGES
from posttrain.classic.config import RunResult, TrainConfig, final_return
from posttrain.classic.envs import EnvSpec, ObservationNormalizer, env_spec, group_start_seeds
from posttrain.classic.policy import Agent
from posttrain.classic.ppo import ProgressFn, Samples, anneal, make_agent, update


@dataclass
class EpisodeBatch:
    """Complete episodes as padded rows: obs ``[E, L, obs_dim]``, actions ``[E, L(, A)]``,
    old_logprobs / rewards / loss_mask ``[E, L]``, group_ids ``[E]``."""

    obs: Tensor
    actions: Tensor
    old_logprobs: Tensor
    rewards: Tensor
    loss_mask: Tensor
    group_ids: Tensor

    @property
    def steps(self) -> int:
        return int(self.loss_mask.sum())


def play_round(
    envs: list[gym.Env],
    seeds: np.ndarray,
    agent: Agent,
    spec: EnvSpec,
    obs_norm: ObservationNormalizer,
) -> list[dict[str, list]]:
    """Play one complete episode in every env, env i reset with ``seeds[i]``; step only live envs.

    Returns per env a dict of per-step lists ``obs``, ``actions``, ``logprobs``, ``rewards``.
    """
    trajectories: list[dict[str, list]] = [
        {"obs": [], "actions": [], "logprobs": [], "rewards": []} for _ in envs
    ]
    current = [env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)]
    live = list(range(len(envs)))
    with torch.no_grad():
        while live:
            obs = obs_norm(np.stack([current[i] for i in live]))
            actions, logprobs, _ = agent.act(torch.from_numpy(obs))
            env_actions = actions.numpy()
            if spec.continuous:
                env_actions = np.clip(env_actions, spec.action_low, spec.action_high)
            still_live = []
            for k, i in enumerate(live):
                next_obs, reward, term, trunc, _ = envs[i].step(env_actions[k])
                traj = trajectories[i]
                traj["obs"].append(obs[k])
                traj["actions"].append(actions[k])
                traj["logprobs"].append(float(logprobs[k]))
                traj["rewards"].append(float(reward))
                current[i] = next_obs
                if not (term or trunc):
                    still_live.append(i)
            live = still_live
    return trajectories


def pad_episodes(trajectories: list[dict[str, list]], group_ids: list[int]) -> EpisodeBatch:
    """Stack per-episode lists into zero-padded ``[E, L]`` rows with a loss mask."""
    lengths = [len(t["rewards"]) for t in trajectories]
    episodes, longest = len(trajectories), max(lengths)
    first_action = trajectories[0]["actions"][0]
    obs = torch.zeros(episodes, longest, len(trajectories[0]["obs"][0]))
    actions = torch.zeros(episodes, longest, *first_action.shape, dtype=first_action.dtype)
    old_logprobs, rewards, loss_mask = (torch.zeros(episodes, longest) for _ in range(3))
    for e, (traj, length) in enumerate(zip(trajectories, lengths)):
        obs[e, :length] = torch.from_numpy(np.stack(traj["obs"]))
        actions[e, :length] = torch.stack(traj["actions"])
        old_logprobs[e, :length] = torch.tensor(traj["logprobs"])
        rewards[e, :length] = torch.tensor(traj["rewards"])
        loss_mask[e, :length] = 1.0
    return EpisodeBatch(obs, actions, old_logprobs, rewards, loss_mask, torch.tensor(group_ids))


def discount_weights(loss_mask: Tensor, gamma: float) -> Tensor:
    """gamma^t per step ``[E, L]``: summed rewards times these give the discounted episode return."""
    steps = torch.arange(loss_mask.shape[1], dtype=loss_mask.dtype)
    return (gamma**steps).unsqueeze(0) * loss_mask


def episode_advantages(batch: EpisodeBatch, algo: str, gamma: float, ema_baseline: float | None) -> Tensor:
    """Whole-episode-return advantages ``[E, L]`` (the episode's score on each of its steps)."""
    rewards = batch.rewards * discount_weights(batch.loss_mask, gamma)
    data = {"token_rewards": rewards, "loss_mask": batch.loss_mask, "group_ids": batch.group_ids}
    if algo in ("grpo", "rloo"):
        hparams = {"scale": "group"} if algo == "grpo" else {}
        return ADVANTAGES.call(algo, data, hparams)[0]
    if algo == "batch_mean":
        data["group_ids"] = torch.zeros_like(batch.group_ids)
        return ADVANTAGES.call("grpo", data, {"scale": "none"})[0]
    scores = rewards.sum(dim=1, keepdim=True) * batch.loss_mask
    if algo == "ema":
        return (scores - (ema_baseline or 0.0)) * batch.loss_mask
    return scores


def to_go_advantages(batch: EpisodeBatch, algo: str, gamma: float, ema_baseline: float | None) -> Tensor:
    """Return-to-go advantages ``[E, L]``: G_t minus the arm's baseline at the same time index."""
    _, to_go = ADVANTAGES.call(
        "reinforce_pp", {"token_rewards": batch.rewards, "loss_mask": batch.loss_mask}, {"gamma": gamma}
    )
    if algo == "none":
        return to_go
    if algo == "ema":
        return (to_go - (ema_baseline or 0.0)) * batch.loss_mask
    real = batch.loss_mask > 0
    time_index = torch.arange(batch.loss_mask.shape[1]).expand_as(real)
    groups = batch.group_ids.unsqueeze(1).expand_as(real) if algo != "batch_mean" else torch.zeros_like(real)
    # Each step becomes a one-step row whose group is (group, t): comparable states share a baseline.
    step_group = groups.long() * batch.loss_mask.shape[1] + time_index
    data = {
        "token_rewards": to_go[real].unsqueeze(1),
        "loss_mask": torch.ones(int(real.sum()), 1),
        "group_ids": step_group[real],
    }
    estimator, hparams = {
        "grpo": ("grpo", {"scale": "group"}),
        "rloo": ("rloo", {}),
        "batch_mean": ("grpo", {"scale": "none"}),
    }[algo]
    advantages = torch.zeros_like(to_go)
    advantages[real] = ADVANTAGES.call(estimator, data, hparams)[0].squeeze(1)
    return advantages


def batch_score_mean(batch: EpisodeBatch, return_mode: str, gamma: float) -> float:
    """Mean score of the batch, the quantity an EMA baseline tracks."""
    if return_mode == "episode":
        return float((batch.rewards * discount_weights(batch.loss_mask, gamma)).sum(1).mean())
    to_go = ADVANTAGES.call(
        "reinforce_pp", {"token_rewards": batch.rewards, "loss_mask": batch.loss_mask}, {"gamma": gamma}
    )[1]
    return float(to_go.sum() / batch.loss_mask.sum())


def collect_batch(
    envs: list[gym.Env],
    agent: Agent,
    spec: EnvSpec,
    obs_norm: ObservationNormalizer,
    config: TrainConfig,
    rng: np.random.Generator,
    first_group: int,
) -> tuple[EpisodeBatch, list[float]]:
    """Rounds of complete episodes until at least ``min_batch_steps`` steps; (batch, episode returns)."""
    trajectories: list[dict[str, list]] = []
    group_ids: list[int] = []
    steps, group = 0, first_group
    while steps < config.min_batch_steps:
        seeds = group_start_seeds(rng, config.num_groups, config.group_size, config.same_start)
        played = play_round(envs, seeds, agent, spec, obs_norm)
        trajectories += played
        group_ids += [group + i // config.group_size for i in range(len(played))]
        group += config.num_groups
        steps += sum(len(t["rewards"]) for t in played)
    returns = [sum(t["rewards"]) for t in trajectories]
    return pad_episodes(trajectories, group_ids), returns


def train_critic_free(config: TrainConfig, progress: ProgressFn | None = None) -> RunResult:
    """Train a critic-free arm (``config.algo``) for ``config.total_steps`` environment steps."""
    torch.set_num_threads(1)
    spec = env_spec(config.env_id)
    agent, optimizer = make_agent(config, with_critic=False)
    envs = [gym.make(config.env_id) for _ in range(config.num_groups * config.group_size)]
    obs_norm = ObservationNormalizer(spec.obs_dim, config.normalize_obs)
    rng = np.random.default_rng(config.seed)
    gamma = config.critic_free_gamma()
    estimate = episode_advantages if config.return_mode == "episode" else to_go_advantages
    ema: float | None = None
    curve: list[tuple[int, float]] = []
    steps, groups_used, start = 0, 0, time.perf_counter()
    while steps < config.total_steps:
        anneal(optimizer, config, steps)
        batch, returns = collect_batch(envs, agent, spec, obs_norm, config, rng, groups_used)
        groups_used = int(batch.group_ids.max()) + 1
        for length, ret in zip(batch.loss_mask.sum(1).tolist(), returns):
            steps += int(length)
            curve.append((steps, ret))
        advantages = estimate(batch, config.algo, gamma, ema)
        mean_score = batch_score_mean(batch, config.return_mode, gamma)
        ema = mean_score if ema is None else config.ema_decay * ema + (1 - config.ema_decay) * mean_score
        real = batch.loss_mask > 0
        flat_adv = advantages[real]
        if config.norm_adv and flat_adv.numel() > 1:
            flat_adv = flat_adv / (flat_adv.std() + 1e-8)
        zeros = torch.zeros_like(flat_adv)
        samples = Samples(
            batch.obs[real], batch.actions[real], batch.old_logprobs[real], flat_adv, zeros, zeros
        )
        update(agent, optimizer, samples, config, with_critic=False)
        if progress is not None:
            progress(steps)
    for env in envs:
        env.close()
    wall = time.perf_counter() - start
    return RunResult(
        config.env_id, config.algo, config.seed, steps, wall, final_return(curve, config.final_window), curve
    )
