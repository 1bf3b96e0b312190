import numpy as np
import torch

from posttrain.classic.baselines import play_round
from posttrain.classic.envs import ObservationNormalizer, RunningMeanStd, env_spec, group_start_seeds
from posttrain.classic.policy import Agent


def test_group_seeds_shared_only_within_groups() -> None:
    same = group_start_seeds(np.random.default_rng(0), num_groups=3, group_size=4, same_start=True)
    assert same.shape == (12,)
    assert all(len(set(same[g * 4 : (g + 1) * 4])) == 1 for g in range(3))
    assert len(set(same)) == 3
    random = group_start_seeds(np.random.default_rng(0), num_groups=3, group_size=4, same_start=False)
    assert len(set(random)) == 12


def _first_observations(same_start: bool) -> np.ndarray:
    import gymnasium as gym

    spec = env_spec("CartPole-v1")
    torch.manual_seed(0)
    agent = Agent(spec.obs_dim, spec.action_dim, spec.continuous)
    envs = [gym.make("CartPole-v1") for _ in range(6)]
    seeds = group_start_seeds(np.random.default_rng(1), 2, 3, same_start)
    trajectories = play_round(envs, seeds, agent, spec, ObservationNormalizer(spec.obs_dim, False))
    assert all(len(t["rewards"]) >= 8 for t in trajectories)  # CartPole cannot fall sooner
    return np.stack([t["obs"][0] for t in trajectories]), trajectories


def test_same_seed_groups_start_from_identical_states() -> None:
    first, trajectories = _first_observations(same_start=True)
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(first[3], first[5])
    assert not np.array_equal(first[0], first[3])
    # identical starts, but the sampled actions make the episodes diverge
    actions = [torch.stack(t["actions"][:8]) for t in trajectories[:3]]
    assert not all(torch.equal(actions[0], a) for a in actions[1:])


def test_random_start_groups_differ() -> None:
    first, _ = _first_observations(same_start=False)
    assert len({row.tobytes() for row in first}) == 6


def test_running_mean_std_matches_numpy() -> None:
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 2))
    stats = RunningMeanStd((2,))
    for chunk in np.split(data, 3):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats.var, data.var(0), rtol=1e-4)
