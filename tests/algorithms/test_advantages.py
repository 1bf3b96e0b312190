"""Advantage estimators: hand-computed values on tiny batches and invariants checked by hypothesis."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from posttrain.algorithms.advantages import (
    gae,
    grpo,
    grpo_passk,
    opo,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from posttrain.algorithms.masked import masked_whiten
from posttrain.algorithms.registry import ADVANTAGES

ALL_ESTIMATORS = ["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "grpo_passk", "opo"]
GROUP_ESTIMATORS = ["grpo", "rloo", "reinforce_pp_baseline", "grpo_passk", "opo"]


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def ids(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.long)


def close(actual: Tensor, expected: list[list[float]] | Tensor, atol: float = 1e-5) -> None:
    expected_t = expected if isinstance(expected, Tensor) else t(expected)
    torch.testing.assert_close(actual, expected_t, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


def test_gae_skips_tool_tokens_and_carries_value_across_them() -> None:
    # Trainable tokens at 0, 2, 4; the values (9) on the tool tokens must be ignored.
    rewards = t([[0, 0, 1, 0, 2]])
    mask = t([[1, 0, 1, 0, 1]])
    values = t([[1, 9, 2, 9, 3]])
    advantages, returns = gae(rewards, mask, values=values, gamma=0.5, lam=0.5)
    # delta_4 = 2 - 3 = -1; delta_2 = 1 + 0.5*3 - 2 = 0.5; delta_0 = 0 + 0.5*2 - 1 = 0
    # A_4 = -1; A_2 = 0.5 + 0.25*(-1) = 0.25; A_0 = 0 + 0.25*0.25 = 0.0625
    close(advantages, [[0.0625, 0, 0.25, 0, -1]])
    close(returns, [[1.0625, 0, 2.25, 0, 2]])


def test_gae_credits_tool_token_reward_to_preceding_trainable_token() -> None:
    rewards = t([[0, 0, 3, 0, 1], [5, 0, 1, 0, 0]])
    mask = t([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]])
    advantages, _ = gae(rewards, mask, values=torch.zeros(2, 5), gamma=0.5, lam=1.0)
    # Row 0: credited rewards (0, 3, 1) on tokens 0, 1, 4; gamma applies per trainable step.
    # Row 1: the reward 5 precedes every trainable token and is dropped.
    close(advantages, [[1.75, 3.5, 0, 0, 1], [0, 0.5, 1, 0, 0]])


def test_gae_empty_row_gives_zeros() -> None:
    rewards = t([[1, 2, 3], [4, 5, 6]])
    mask = t([[0, 0, 0], [1, 1, 1]])
    values = t([[1, 1, 1], [0, 0, 0]])
    advantages, returns = gae(rewards, mask, values=values, bootstrap_values=torch.tensor([7.0, 0.0]))
    close(advantages[0:1], [[0, 0, 0]])
    close(returns[0:1], [[0, 0, 0]])
    close(advantages[1:2], [[15, 11, 6]])


def test_gae_bootstraps_last_trainable_token() -> None:
    rewards = torch.zeros(1, 3)
    mask = t([[1, 1, 0]])
    values = t([[1, 2, 0]])
    advantages, returns = gae(
        rewards, mask, values=values, bootstrap_values=torch.tensor([6.0]), gamma=0.5, lam=0.5
    )
    # delta_1 = 0.5*6 - 2 = 1; delta_0 = 0.5*2 - 1 = 0; A_0 = 0.25 * 1
    close(advantages, [[0.25, 1, 0]])
    close(returns, [[1.25, 3, 0]])


@pytest.mark.parametrize(
    ("rewards", "mask", "values", "bootstrap", "td_errors"),
    [
        # t0: 1 + 0.9*1 - 0.5; t2: 0 + 0.9*2 - 1; t3: 2 + 0.9*0.5 - 2 (value 7 on the tool token skipped)
        ([1, 0, 0, 2], [1, 0, 1, 1], [0.5, 7, 1, 2], 0.5, [1.4, 0, 0.8, 0.45]),
        # t1: 1 + 0.9*3 - 2 (the reward 1 on the tool token 2 is credited to t1); t3: 0 + 0.9*0 - 3
        ([0, 0, 1, 0], [0, 1, 0, 1], [5, 2, 5, 3], 0.0, [0, 1.7, 0, -3]),
    ],
)
def test_gae_with_lambda_zero_is_one_step_td_error(
    rewards: list[float], mask: list[float], values: list[float], bootstrap: float, td_errors: list[float]
) -> None:
    advantages, _ = gae(
        t([rewards]),
        t([mask]),
        values=t([values]),
        bootstrap_values=torch.tensor([bootstrap]),
        gamma=0.9,
        lam=0,
    )
    close(advantages, [td_errors])


def test_gae_chains_segments_like_one_concatenated_row() -> None:
    # One episode split into two segments, given in reverse row order. Segment 1 opens with a tool
    # token whose reward belongs to segment 0's last trainable token.
    seg0_r, seg0_m, seg0_v = [0, 1, 0], [1, 1, 0], [1, 2, 8]
    seg1_r, seg1_m, seg1_v = [2, 0, 3], [0, 1, 1], [8, 4, 5]
    chained_adv, chained_ret = gae(
        t([seg1_r, seg0_r]),
        t([seg1_m, seg0_m]),
        values=t([seg1_v, seg0_v]),
        bootstrap_values=torch.tensor([1.5, 100.0]),  # segment 0's own bootstrap is not used
        episode_ids=ids([7, 7]),
        segment_index=ids([1, 0]),
        gamma=0.9,
        lam=0.8,
    )
    one_adv, one_ret = gae(
        t([seg0_r + seg1_r]),
        t([seg0_m + seg1_m]),
        values=t([seg0_v + seg1_v]),
        bootstrap_values=torch.tensor([1.5]),
        gamma=0.9,
        lam=0.8,
    )
    close(torch.cat([chained_adv[1], chained_adv[0]]).unsqueeze(0), one_adv)
    close(torch.cat([chained_ret[1], chained_ret[0]]).unsqueeze(0), one_ret)
    # Hand check with gamma = lam = 1: credited rewards (0, 3, 0, 3) on values (1, 2, 4, 5), bootstrap 1.5
    # -> A = total return-to-go + bootstrap - V = (7.5 - 1, 7.5 - 2, 4.5 - 4, 4.5 - 5).
    advantages, _ = gae(
        t([seg1_r, seg0_r]),
        t([seg1_m, seg0_m]),
        values=t([seg1_v, seg0_v]),
        bootstrap_values=torch.tensor([1.5, 100.0]),
        episode_ids=ids([7, 7]),
        segment_index=ids([1, 0]),
    )
    close(advantages, [[0, 0.5, -0.5], [6.5, 5.5, 0]])


def test_gae_chain_skips_a_segment_without_trainable_tokens() -> None:
    rewards = t([[0, 0], [0, 0], [0, 1]])
    mask = t([[1, 0], [0, 0], [0, 1]])
    values = t([[1, 0], [9, 9], [0, 2]])
    advantages, _ = gae(
        rewards,
        mask,
        values=values,
        episode_ids=ids([0, 0, 0]),
        segment_index=ids([0, 1, 2]),
        gamma=0.5,
        lam=1.0,
    )
    # Token of segment 0 bootstraps from V = 2 at segment 2: delta = 0.5*2 - 1 = 0, plus 0.5 * A(seg 2 = -1).
    close(advantages, [[-0.5, 0], [0, 0], [0, -1]])


def test_gae_whiten_whitens_advantages_but_not_returns() -> None:
    rewards = t([[0, 1, 0, 2], [1, 0, 0, 0]])
    mask = t([[1, 1, 0, 1], [1, 0, 1, 0]])
    values = t([[0.5, 0.1, 0, -1], [0.3, 0, 0.2, 0]])
    raw_adv, raw_ret = gae(rewards, mask, values=values, gamma=0.9, lam=0.7)
    adv, ret = gae(rewards, mask, values=values, gamma=0.9, lam=0.7, whiten=True)
    close(ret, raw_ret)
    close(adv, masked_whiten(raw_adv, mask))
    trainable = adv[mask > 0]
    assert abs(float(trainable.mean())) < 1e-6
    assert float(trainable.std()) == pytest.approx(1.0, abs=1e-4)
    assert bool((adv[mask == 0] == 0).all())


def test_gae_needs_both_chaining_ids() -> None:
    with pytest.raises(ValueError, match="segment_index"):
        gae(torch.zeros(2, 2), torch.ones(2, 2), values=torch.zeros(2, 2), episode_ids=ids([0, 0]))
    with pytest.raises(ValueError, match="same"):
        gae(
            torch.zeros(2, 2),
            torch.ones(2, 2),
            values=torch.zeros(2, 2),
            episode_ids=ids([0, 0]),
            segment_index=ids([1, 1]),
        )


# --------------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------------


def test_reinforce_pp_whitens_return_to_go() -> None:
    rewards = t([[0, 1, 0, 2], [1, 5, 0, 0]])
    mask = t([[1, 1, 0, 1], [1, 0, 0, 0]])
    advantages, returns = reinforce_pp(rewards, mask)
    # Row 1: the 5 on a tool token is credited to token 0.
    close(returns, [[3, 3, 0, 2], [6, 0, 0, 0]])
    # Trainable returns (3, 3, 2, 6): mean 3.5, unbiased std sqrt(3) (eps negligible).
    s = math.sqrt(3.0)
    close(advantages, [[-0.5 / s, -0.5 / s, 0, -1.5 / s], [2.5 / s, 0, 0, 0]], atol=1e-4)


def test_reinforce_pp_discounts_per_trainable_step() -> None:
    _, returns = reinforce_pp(t([[0, 1, 0, 2]]), t([[1, 1, 0, 1]]), gamma=0.5)
    close(returns, [[1, 2, 0, 2]])


# --------------------------------------------------------------------------------------------------
# Group estimators
# --------------------------------------------------------------------------------------------------


def group_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Six single-row episodes: group 0 scores (1, 0, 0), group 1 (2), group 2 (1, 1)."""
    rewards = t([[0, 1], [0, 0], [0, 0], [2, 0], [0.5, 0.5], [1, 0]])
    mask = t([[1, 1], [1, 0], [0, 1], [1, 1], [1, 1], [0, 1]])
    return rewards, mask, ids([0, 0, 0, 1, 2, 2])


@pytest.mark.parametrize(
    ("scale", "episode_advantages"),
    [
        # group 0: mean 1/3, unbiased std 1/sqrt(3)
        ("group", [2 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), 0, 0, 0]),
        ("none", [2 / 3, -1 / 3, -1 / 3, 0, 0, 0]),
        # batch scores (1, 0, 0, 2, 1, 1): unbiased std sqrt(17 / 30)
        ("batch", [x / math.sqrt(17 / 30) for x in (2 / 3, -1 / 3, -1 / 3, 0, 0, 0)]),
    ],
)
def test_grpo_group_scores(scale: str, episode_advantages: list[float]) -> None:
    rewards, mask, group_ids = group_batch()
    advantages, returns = grpo(rewards, mask, group_ids=group_ids, scale=scale)
    expected = torch.tensor(episode_advantages).unsqueeze(1) * mask
    close(advantages, expected, atol=1e-5)
    close(returns, expected, atol=1e-5)


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_equal_rewards_give_exact_zero(name: str) -> None:
    # float64 0.1 + 0.1 + 0.1 != 0.3: s - mean leaves a residue of ~1e-17 that a division by a
    # std of the same size (epsilon = 0) would blow up to O(1).
    rewards = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.1, 0.0]], dtype=torch.float64)
    data = {"token_rewards": rewards, "loss_mask": torch.ones(3, 2), "group_ids": ids([4, 4, 4])}
    settings_to_try: list[dict[str, Any]] = [{}]
    if name in ("grpo", "grpo_passk"):
        settings_to_try.append({"epsilon": 0.0})
    if name == "grpo":
        settings_to_try += [{"scale": "batch"}, {"scale": "none"}]
    for hparams in settings_to_try:
        advantages, returns = ADVANTAGES.call(name, data, hparams)
        assert advantages.dtype == torch.float64
        assert bool((advantages == 0).all()), hparams
        assert bool((returns == 0).all()), hparams


def test_grpo_scores_episode_over_all_its_rows() -> None:
    # Episode 10 has two rows (the reward sits on its last segment); episode 11 one row; same group.
    rewards = t([[0, 0], [0, 1], [0, 0]])
    mask = t([[1, 1], [0, 1], [1, 0]])
    advantages, _ = grpo(rewards, mask, group_ids=ids([0, 0, 0]), episode_ids=ids([10, 10, 11]))
    a = 1 / math.sqrt(2) / (1 + 1e-6 * math.sqrt(2))  # (1 - 0.5) / (std sqrt(0.5) + eps)
    close(advantages, [[a, a], [0, a], [-a, 0]])


def test_group_estimators_require_group_ids() -> None:
    for name in GROUP_ESTIMATORS:
        with pytest.raises(ValueError, match="group_ids"):
            ADVANTAGES.call(name, {"token_rewards": torch.ones(2, 2), "loss_mask": torch.ones(2, 2)})


def test_grpo_rejects_unknown_scale_and_inconsistent_groups() -> None:
    with pytest.raises(ValueError, match="scale"):
        grpo(torch.ones(2, 2), torch.ones(2, 2), group_ids=ids([0, 0]), scale="token")
    with pytest.raises(ValueError, match="group_ids"):
        grpo(torch.ones(2, 2), torch.ones(2, 2), group_ids=ids([0, 1]), episode_ids=ids([3, 3]))


def test_rloo_leave_one_out() -> None:
    rewards = t([[1, 0], [0, 0], [0, 0], [2, 1], [5, 0]])
    mask = t([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]])
    advantages, returns = rloo(rewards, mask, group_ids=ids([0, 0, 0, 0, 1]))
    # Scores (1, 0, 0, 3): 1 - 1, 0 - 4/3, 0 - 4/3, 3 - 1/3; the lone episode of group 1 gets 0.
    close(advantages, [[0, 0], [-4 / 3, 0], [-4 / 3, -4 / 3], [0, 8 / 3], [0, 0]])
    close(returns, advantages)


def test_reinforce_pp_baseline_centres_then_whitens_over_tokens() -> None:
    rewards = t([[1, 0], [0, 0], [2, 0]])
    mask = t([[1, 1], [1, 0], [1, 1]])
    advantages, returns = reinforce_pp_baseline(rewards, mask, group_ids=ids([0, 0, 1]))
    # Centred scores (0.5, -0.5, 0) on tokens (0.5, 0.5, -0.5, 0, 0): mean 0.1, unbiased var 0.175.
    s = math.sqrt(0.175)
    close(advantages, [[0.4 / s, 0.4 / s], [-0.6 / s, 0], [-0.1 / s, -0.1 / s]], atol=1e-4)
    close(returns, advantages)


def test_grpo_passk_credits_only_the_unique_best() -> None:
    rewards = t([[3], [1], [2], [2], [2], [1], [4]])
    mask = torch.ones(7, 1)
    group_ids = ids([0, 0, 0, 1, 1, 1, 2])
    advantages, _ = grpo_passk(rewards, mask, group_ids=group_ids)
    # Group 0: best 3, runner-up 2, std 1; group 1: tied best -> 0; group 2: alone -> 0.
    close(advantages, [[1 / (1 + 1e-6)], [0], [0], [0], [0], [0], [0]])
    unscaled, _ = grpo_passk(rewards * 2, mask, group_ids=group_ids, scale=False)
    close(unscaled, [[2], [0], [0], [0], [0], [0], [0]])


def test_opo_uses_length_weighted_baseline() -> None:
    rewards = t([[1, 0, 0], [0, 0, 0], [7, 0, 0]])
    mask = t([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    advantages, returns = opo(rewards, mask, group_ids=ids([0, 0, 1]))
    # Lengths (1, 3), scores (1, 0): b = (1*1 + 3*0) / 4 = 0.25; lone episode of group 1 -> 0.
    close(advantages, [[0.75, 0, 0], [-0.25, -0.25, -0.25], [0, 0, 0]])
    close(returns, advantages)


# --------------------------------------------------------------------------------------------------
# Registry contract
# --------------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    assert set(ALL_ESTIMATORS) <= set(ADVANTAGES.names())


def test_call_through_registry_passes_only_named_fields() -> None:
    rewards, mask, group_ids = group_batch()
    data = {
        "token_rewards": rewards,
        "loss_mask": mask,
        "values": torch.zeros_like(rewards),
        "bootstrap_values": torch.zeros(6),
        "group_ids": group_ids,
        "episode_ids": torch.arange(6),
        "segment_index": torch.zeros(6, dtype=torch.long),
        "old_logprobs": torch.zeros_like(rewards),
    }
    advantages, _ = ADVANTAGES.call("grpo", data, {"scale": "none"})
    close(advantages, grpo(rewards, mask, group_ids=group_ids, scale="none")[0])
    advantages, _ = ADVANTAGES.call("gae", data, {"gamma": 0.5, "lam": 0.9, "whiten": True})
    close(
        advantages, gae(rewards, mask, values=torch.zeros_like(rewards), gamma=0.5, lam=0.9, whiten=True)[0]
    )
    for name in ALL_ESTIMATORS:
        advantages, returns = ADVANTAGES.call(name, data)
        assert advantages.shape == returns.shape == rewards.shape
    with pytest.raises(TypeError, match="lambda_"):
        ADVANTAGES.call("gae", data, {"lambda_": 0.9})


@pytest.mark.parametrize("name", ALL_ESTIMATORS)
def test_outputs_are_detached(name: str) -> None:
    rewards, mask, group_ids = group_batch()
    data = {
        "token_rewards": rewards.clone().requires_grad_(),
        "loss_mask": mask,
        "values": torch.rand_like(rewards).requires_grad_(),
        "group_ids": group_ids,
    }
    advantages, returns = ADVANTAGES.call(name, data)
    assert not advantages.requires_grad
    assert not returns.requires_grad


def test_gae_is_fast_enough_for_a_training_batch() -> None:
    import time

    torch.manual_seed(0)
    batch, time_steps = 64, 512
    rewards = torch.randn(batch, time_steps)
    mask = (torch.rand(batch, time_steps) > 0.3).float()
    values = torch.randn(batch, time_steps)
    start = time.perf_counter()
    gae(
        rewards,
        mask,
        values=values,
        episode_ids=torch.arange(batch) // 4,
        segment_index=torch.arange(batch) % 4,
        gamma=0.99,
        lam=0.95,
    )
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------


def reference_gae(
    rewards: Tensor,
    mask: Tensor,
    values: Tensor,
    bootstrap: Tensor,
    episode_ids: Tensor,
    segment_index: Tensor,
    gamma: float,
    lam: float,
) -> Tensor:
    """Plain-Python GAE over each episode's concatenated segments, skipping non-trainable tokens."""
    out = torch.zeros_like(rewards)
    for episode in sorted(set(episode_ids.tolist())):
        rows = sorted(
            (int(segment_index[b]), b) for b in range(rewards.shape[0]) if int(episode_ids[b]) == episode
        )
        steps: list[tuple[int, int]] = []  # (row, time) of trainable tokens in chain order
        credited: list[float] = []
        for _, b in rows:
            for i in range(rewards.shape[1]):
                if mask[b, i] > 0:
                    steps.append((b, i))
                    credited.append(0.0)
                if credited:
                    credited[-1] += float(rewards[b, i])
        next_value, running = float(bootstrap[rows[-1][1]]), 0.0
        for (b, i), reward in zip(reversed(steps), reversed(credited)):
            delta = reward + gamma * next_value - float(values[b, i])
            running = delta + gamma * lam * running
            out[b, i] = running
            next_value = float(values[b, i])
    return out


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Tensor]:
    """Episodes of 1-3 segments in random row order; each episode belongs to one of two groups."""
    time_steps = draw(st.integers(1, 6))
    n_episodes = draw(st.integers(1, 5))
    episode_ids: list[int] = []
    segment_index: list[int] = []
    group_ids: list[int] = []
    for episode in range(n_episodes):
        group = draw(st.integers(0, 1))
        for segment in range(draw(st.integers(1, 3))):
            episode_ids.append(episode * 3 + 1)  # ids need not be dense
            segment_index.append(segment * 2)
            group_ids.append(group)
    batch = len(episode_ids)
    order = draw(st.permutations(range(batch)))
    small = st.integers(-3, 3).map(float)
    rewards = draw(
        st.lists(st.lists(small, min_size=time_steps, max_size=time_steps), min_size=batch, max_size=batch)
    )
    mask = draw(
        st.lists(
            st.lists(st.booleans(), min_size=time_steps, max_size=time_steps), min_size=batch, max_size=batch
        )
    )
    values = draw(
        st.lists(st.lists(small, min_size=time_steps, max_size=time_steps), min_size=batch, max_size=batch)
    )
    bootstrap = draw(st.lists(small, min_size=batch, max_size=batch))
    return {
        "token_rewards": torch.tensor(rewards)[list(order)],
        "loss_mask": torch.tensor(mask, dtype=torch.float32)[list(order)],
        "values": torch.tensor(values)[list(order)],
        "bootstrap_values": torch.tensor(bootstrap)[list(order)],
        "episode_ids": torch.tensor(episode_ids)[list(order)],
        "segment_index": torch.tensor(segment_index)[list(order)],
        "group_ids": torch.tensor(group_ids)[list(order)],
    }


FAST = settings(max_examples=60, deadline=None)


@FAST
@given(data=batches(), gamma=st.sampled_from([0.0, 0.5, 0.9, 1.0]), lam=st.sampled_from([0.0, 0.7, 1.0]))
def test_gae_matches_plain_python_reference(data: dict[str, Tensor], gamma: float, lam: float) -> None:
    advantages, returns = ADVANTAGES.call("gae", data, {"gamma": gamma, "lam": lam})
    expected = reference_gae(
        data["token_rewards"],
        data["loss_mask"],
        data["values"],
        data["bootstrap_values"],
        data["episode_ids"],
        data["segment_index"],
        gamma,
        lam,
    )
    close(advantages, expected, atol=1e-4)
    close(returns, (expected + data["values"]) * data["loss_mask"], atol=1e-4)


@FAST
@given(data=batches())
def test_gae_lambda_one_zero_values_is_reward_to_go(data: dict[str, Tensor]) -> None:
    rewards, mask = data["token_rewards"], data["loss_mask"]
    advantages, _ = gae(rewards, mask, values=torch.zeros_like(rewards), gamma=1.0, lam=1.0)
    # Every reward at or after a trainable token is credited to a trainable token at or after it.
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    close(advantages, reward_to_go * mask, atol=1e-4)
    _, returns = reinforce_pp(rewards, mask)
    close(returns, reward_to_go * mask, atol=1e-4)


def episode_advantages(name: str, data: dict[str, Tensor], hparams: dict[str, Any]) -> dict[int, float]:
    """Each episode's advantage, read on an all-trainable mask (the mask only affects the broadcast)."""
    full = dict(data, loss_mask=torch.ones_like(data["loss_mask"]))
    advantages, _ = ADVANTAGES.call(name, full, hparams)
    per_episode: dict[int, float] = {}
    for b, episode in enumerate(data["episode_ids"].tolist()):
        per_episode.setdefault(episode, float(advantages[b, 0]))
        assert bool((advantages[b] == advantages[b, 0]).all())
    return per_episode


def group_sums(data: dict[str, Tensor], per_episode: dict[int, float]) -> dict[int, float]:
    group_of = dict(zip(data["episode_ids"].tolist(), data["group_ids"].tolist()))
    sums: dict[int, float] = {}
    for episode, advantage in per_episode.items():
        sums[group_of[episode]] = sums.get(group_of[episode], 0.0) + advantage
    return sums


@FAST
@given(data=batches(), scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_advantages_have_zero_mean_per_group(data: dict[str, Tensor], scale: str) -> None:
    sums = group_sums(data, episode_advantages("grpo", data, {"scale": scale}))
    assert all(abs(total) < 1e-4 for total in sums.values())


@FAST
@given(data=batches())
def test_rloo_advantages_sum_to_zero_per_group(data: dict[str, Tensor]) -> None:
    sums = group_sums(data, episode_advantages("rloo", data, {}))
    assert all(abs(total) < 1e-4 for total in sums.values())


@FAST
@given(data=batches(), name=st.sampled_from(ALL_ESTIMATORS), seed=st.integers(0, 1000))
def test_estimators_are_invariant_to_row_order(data: dict[str, Tensor], name: str, seed: int) -> None:
    permutation = torch.randperm(
        data["token_rewards"].shape[0], generator=torch.Generator().manual_seed(seed)
    )
    shuffled = {key: value[permutation] for key, value in data.items()}
    advantages, returns = ADVANTAGES.call(name, data)
    shuffled_advantages, shuffled_returns = ADVANTAGES.call(name, shuffled)
    close(shuffled_advantages, advantages[permutation], atol=1e-4)
    close(shuffled_returns, returns[permutation], atol=1e-4)


@FAST
@given(data=batches(), name=st.sampled_from(ALL_ESTIMATORS), whiten=st.booleans())
def test_masked_positions_are_always_zero(data: dict[str, Tensor], name: str, whiten: bool) -> None:
    hparams: dict[str, Any] = {"whiten": whiten} if name == "gae" else {}
    advantages, returns = ADVANTAGES.call(name, data, hparams)
    off = data["loss_mask"] == 0
    assert bool((advantages[off] == 0).all())
    assert bool((returns[off] == 0).all())
    assert not bool(advantages.isnan().any() or returns.isnan().any())
