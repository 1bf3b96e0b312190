import pytest
import torch

from posttrain.classic.baselines import EpisodeBatch, episode_advantages, to_go_advantages


def _batch() -> EpisodeBatch:
    # four episodes in two groups; lengths 2, 3, 1, 2; reward 1 per step except episode 3 (2 per step)
    loss_mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rewards = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [2, 2, 0]])
    zeros = torch.zeros(4, 3)
    return EpisodeBatch(zeros.unsqueeze(-1), zeros, zeros, rewards, loss_mask, torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize(
    ("algo", "scores"),
    [
        ("none", [2.0, 3.0, 1.0, 4.0]),
        ("batch_mean", [-0.5, 0.5, -1.5, 1.5]),
        ("rloo", [-1.0, 1.0, -3.0, 3.0]),
        ("ema", [1.0, 2.0, 0.0, 3.0]),
    ],
)
def test_episode_advantages_hand_computed(algo: str, scores: list[float]) -> None:
    batch = _batch()
    advantages = episode_advantages(batch, algo, gamma=1.0, ema_baseline=1.0)
    expected = torch.tensor(scores).unsqueeze(1) * batch.loss_mask
    assert torch.allclose(advantages, expected)


def test_grpo_episode_advantages_use_group_std() -> None:
    batch = _batch()
    advantages = episode_advantages(batch, "grpo", gamma=1.0, ema_baseline=None)
    # group 0 scores (2, 3): mean 2.5, unbiased std 0.7071 -> -+0.7071
    assert advantages[0, 0] == pytest.approx(-0.7071, abs=1e-3)
    assert advantages[1, 2] == pytest.approx(0.7071, abs=1e-3)
    assert advantages[0, 2] == 0.0  # padding


def test_discounted_episode_score() -> None:
    batch = _batch()
    advantages = episode_advantages(batch, "none", gamma=0.5, ema_baseline=None)
    assert advantages[1, 0] == pytest.approx(1 + 0.5 + 0.25)


def test_to_go_baseline_compares_same_time_index() -> None:
    batch = _batch()
    # returns-to-go (gamma 1): ep0 [2, 1], ep1 [3, 2, 1], ep2 [1], ep3 [4, 2]
    none = to_go_advantages(batch, "none", gamma=1.0, ema_baseline=None)
    assert torch.equal(none, torch.tensor([[2.0, 1, 0], [3, 2, 1], [1, 0, 0], [4, 2, 0]]))
    rloo = to_go_advantages(batch, "rloo", gamma=1.0, ema_baseline=None)
    # t=0 group 0: 2 vs 3 -> -1, +1; t=1 group 0: 1 vs 2 -> -1, +1; t=2 group 0: alone -> 0
    # group 1: t=0: 1 vs 4 -> -3, +3; t=1: ep3 alone -> 0
    assert torch.equal(rloo, torch.tensor([[-1.0, -1, 0], [1, 1, 0], [-3, 0, 0], [3, 0, 0]]))
    batch_mean = to_go_advantages(batch, "batch_mean", gamma=1.0, ema_baseline=None)
    # t=0 over all four: mean 2.5
    assert torch.allclose(batch_mean[:, 0], torch.tensor([-0.5, 0.5, -1.5, 1.5]))
