import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.classic.ppo import gae_over_rollout
from posttrain.classic.segments import SegmentLayout, bootstrap_grid


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_rows_time_round_trip(steps: int, envs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dones = torch.rand(steps, envs, generator=gen) < 0.3
    grid = torch.randn(steps, envs, generator=gen)
    layout = SegmentLayout.from_dones(dones)
    rows = layout.to_rows(grid)
    assert torch.equal(layout.to_time(rows), grid)
    # every real step appears exactly once, and rows never cross an episode end
    assert int(layout.loss_mask.sum()) == steps * envs
    assert layout.flat_index.shape[0] == int(dones[:-1].sum()) + envs


def test_rows_split_at_dones_hand_built() -> None:
    # env 0: done at t=1 -> rows [t0, t1], [t2, t3]; env 1: no done -> one row [t0..t3]
    dones = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    grid = torch.arange(8.0).reshape(4, 2)  # grid[t, n] = 2t + n
    layout = SegmentLayout.from_dones(dones)
    rows = layout.to_rows(grid)
    expected = torch.tensor([[0.0, 2.0, 0.0, 0.0], [4.0, 6.0, 0.0, 0.0], [1.0, 3.0, 5.0, 7.0]])
    assert torch.equal(rows, expected)
    assert torch.equal(layout.loss_mask.sum(1), torch.tensor([2.0, 2.0, 4.0]))
    assert torch.equal(layout.at_row_ends(grid), torch.tensor([2.0, 6.0, 7.0]))


def _one_env_gae(terminated: list[bool], truncated: list[bool]) -> torch.Tensor:
    rewards = torch.ones(3, 1)
    values = torch.zeros(3, 1)
    final_values = torch.full((3, 1), 10.0)  # V(final obs) wherever an episode ended
    advantages, returns = gae_over_rollout(
        rewards,
        values,
        torch.tensor(terminated).unsqueeze(1),
        torch.tensor(truncated).unsqueeze(1),
        final_values,
        torch.tensor([2.0]),  # V(obs after the rollout's last step)
        gamma=0.5,
        lam=1.0,
    )
    assert torch.equal(advantages, returns)  # values are 0
    return advantages.squeeze(1)


def test_truncation_bootstraps_and_termination_does_not() -> None:
    # Episode ends after step 1, then step 2 is cut off by the rollout (bootstrap V = 2).
    truncated = _one_env_gae([False, False, False], [False, True, False])
    # A1 = 1 + 0.5 * 10 = 6, A0 = 1 + 0.5 * 6 = 4, A2 = 1 + 0.5 * 2 = 2
    assert torch.allclose(truncated, torch.tensor([4.0, 6.0, 2.0]))
    terminated = _one_env_gae([False, True, False], [False, False, False])
    # A1 = 1, A0 = 1 + 0.5 * 1 = 1.5; the next episode does not leak back
    assert torch.allclose(terminated, torch.tensor([1.5, 1.0, 2.0]))
    both = _one_env_gae([False, True, False], [False, True, False])
    assert torch.allclose(both, terminated)  # termination wins


def test_bootstrap_grid_precedence() -> None:
    term = torch.tensor([[False, True], [False, True]])
    trunc = torch.tensor([[True, False], [False, True]])
    finals = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    grid = bootstrap_grid(term, trunc, finals, torch.tensor([3.0, 4.0]))
    assert torch.equal(grid, torch.tensor([[5.0, 0.0], [3.0, 0.0]]))
