"""Aggregation weights: hand values, exact gradient accumulation, per-episode normalisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms.aggregate import (
    aggregate,
    aggregate_loss,
    aggregation_counts,
    token_weights,
)
from posttrain.algorithms.masked import masked_mean
from posttrain.algorithms.registry import AGGREGATIONS

ALL_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "episode-mean",
]

# [3, 4] with holes: row 0 has 3 trainable tokens, row 1 none, row 2 has 2.
MASK = torch.tensor(
    [
        [1.0, 1.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
    ]
)


def _kwargs(mode: str) -> dict[str, float]:
    return {"constant": 4.0} if mode == "seq-mean-token-sum-norm" else {}


def test_all_modes_registered() -> None:
    assert set(ALL_MODES) <= set(AGGREGATIONS.names())


def test_token_mean_hand_values() -> None:
    expected = MASK / 5.0
    torch.testing.assert_close(token_weights(MASK, "token-mean"), expected)


def test_token_sum_hand_values() -> None:
    weights = token_weights(MASK, "token-sum")
    torch.testing.assert_close(weights, MASK)
    assert weights.data_ptr() != MASK.data_ptr()


def test_seq_mean_token_mean_hand_values() -> None:
    # N_seq = 2 (the empty row does not count): row 0 -> 1/3/2, row 2 -> 1/2/2
    expected = torch.tensor(
        [
            [1 / 6, 1 / 6, 0.0, 1 / 6],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 1 / 4, 1 / 4, 0.0],
        ]
    )
    torch.testing.assert_close(token_weights(MASK, "seq-mean-token-mean"), expected)


def test_seq_mean_token_sum_hand_values() -> None:
    torch.testing.assert_close(token_weights(MASK, "seq-mean-token-sum"), MASK / 2.0)


def test_seq_mean_token_sum_norm_hand_values() -> None:
    # Dr.GRPO: N_seq * constant = 2 * 4
    torch.testing.assert_close(token_weights(MASK, "seq-mean-token-sum-norm", constant=4.0), MASK / 8.0)


def test_seq_mean_token_sum_norm_requires_constant() -> None:
    with pytest.raises(ValueError, match="constant"):
        token_weights(MASK, "seq-mean-token-sum-norm")


def test_arguments_a_mode_does_not_use_are_ignored() -> None:
    # the trainer passes the run's constant and episode ids whatever the mode
    weights = token_weights(MASK, "token-mean", constant=4.0, episode_ids=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(weights, MASK / 5.0)


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(KeyError, match="token-meen"):
        token_weights(MASK, "token-meen")


def test_episode_mean_hand_values() -> None:
    # rows 0 and 2 are sub-traces of episode 7 (5 tokens); episode 3 (row 1) has no trainable token
    weights = token_weights(MASK, "episode-mean", episode_ids=torch.tensor([7, 3, 7]))
    torch.testing.assert_close(weights, MASK / 5.0)
    # two episodes of 3 and 2 tokens
    weights = token_weights(MASK, "episode-mean", episode_ids=torch.tensor([7, 7, 3]))
    expected = torch.tensor(
        [
            [1 / 6, 1 / 6, 0.0, 1 / 6],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 1 / 4, 1 / 4, 0.0],
        ]
    )
    torch.testing.assert_close(weights, expected)


def test_episode_mean_without_ids_is_sequence_mean() -> None:
    torch.testing.assert_close(
        token_weights(MASK, "episode-mean"), token_weights(MASK, "seq-mean-token-mean")
    )


def test_episode_split_into_three_subtraces_weighs_like_one_row() -> None:
    # episode 0: one row of 6 tokens; episode 1: three sub-traces of 2, 3 and 1 tokens
    mask = torch.zeros(4, 6)
    mask[0, :6] = 1.0
    mask[1, :2] = 1.0
    mask[2, 1:4] = 1.0
    mask[3, 5] = 1.0
    episode_ids = torch.tensor([0, 1, 1, 1])
    weights = token_weights(mask, "episode-mean", episode_ids=episode_ids)
    assert weights[0].sum().item() == pytest.approx(0.5)
    assert weights[1:].sum().item() == pytest.approx(0.5)
    # a per-sequence mean would give the split episode three times the weight of the whole one
    per_sequence = token_weights(mask, "seq-mean-token-mean")
    assert per_sequence[1:].sum().item() == pytest.approx(0.75)


def test_count_overrides() -> None:
    torch.testing.assert_close(token_weights(MASK, "token-mean", num_tokens=10), MASK / 10.0)
    torch.testing.assert_close(
        token_weights(MASK, "seq-mean-token-sum", num_sequences=torch.tensor(4.0)), MASK / 4.0
    )
    torch.testing.assert_close(
        token_weights(MASK, "seq-mean-token-sum-norm", constant=2.0, num_sequences=5), MASK / 10.0
    )
    episode_ids = torch.tensor([7, 3, 7])
    torch.testing.assert_close(
        token_weights(MASK, "episode-mean", episode_ids=episode_ids, num_episodes=4), MASK / 20.0
    )


def test_aggregation_counts() -> None:
    counts = aggregation_counts(MASK, torch.tensor([7, 7, 3]))
    assert counts["num_tokens"].item() == 5
    assert counts["num_sequences"].item() == 2
    assert counts["num_episodes"].item() == 2
    assert aggregation_counts(MASK)["num_episodes"].item() == 2


def test_data_parallel_shards_with_global_counts_sum_to_full_batch() -> None:
    torch.manual_seed(0)
    mask = (torch.rand(6, 5) > 0.4).float()
    loss = torch.randn(6, 5)
    episode_ids = torch.tensor([0, 0, 1, 2, 2, 3])  # episodes never straddle the two shards
    shards = [slice(0, 2), slice(2, 6)]
    for mode in ALL_MODES:
        full = aggregate_loss(loss, mask, mode, episode_ids=episode_ids, **_kwargs(mode))
        per_shard = [aggregation_counts(mask[s], episode_ids[s]) for s in shards]
        totals = {k: sum(c[k] for c in per_shard) for k in per_shard[0]}  # the all-reduce
        sharded = sum(
            aggregate(
                loss[s],
                token_weights(mask[s], mode, episode_ids=episode_ids[s], **totals, **_kwargs(mode)),
            )
            for s in shards
        )
        torch.testing.assert_close(sharded, full, msg=mode)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_empty_batch_gives_zero_not_nan(mode: str) -> None:
    mask = torch.zeros(2, 3)
    loss = torch.randn(2, 3, requires_grad=True)
    weights = token_weights(mask, mode, **_kwargs(mode))
    assert torch.equal(weights, torch.zeros(2, 3))
    total = aggregate(loss, weights)
    total.backward()
    assert total.item() == 0.0
    assert loss.grad is not None and torch.equal(loss.grad, torch.zeros(2, 3))
    assert token_weights(torch.zeros(0, 3), mode, **_kwargs(mode)).shape == (0, 3)


def test_aggregate_ignores_nan_and_inf_at_masked_positions() -> None:
    loss = torch.tensor([[1.0, float("nan"), 3.0, float("inf")]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.0)


def test_bool_mask_accepted() -> None:
    torch.testing.assert_close(token_weights(MASK.bool(), "token-mean"), MASK / 5.0)


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 5))
    mask_bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    losses = draw(
        st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=rows * cols, max_size=rows * cols)
    )
    episode_ids = draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows))
    micro_batch_of_row = draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows))
    mode = draw(st.sampled_from(ALL_MODES))
    mask = torch.tensor(mask_bits, dtype=torch.float32).reshape(rows, cols)
    loss = torch.tensor(losses, dtype=torch.float32).reshape(rows, cols)
    return mask, loss, torch.tensor(episode_ids), torch.tensor(micro_batch_of_row), mode


@settings(max_examples=150, deadline=None)
@given(batches())
def test_micro_batch_accumulation_is_exact(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str],
) -> None:
    mask, loss_values, episode_ids, micro_batch_of_row, mode = batch
    weights = token_weights(mask, mode, episode_ids=episode_ids, **_kwargs(mode))
    assert torch.all(weights[mask == 0] == 0)
    assert torch.all(weights >= 0)

    full_loss = loss_values.clone().requires_grad_()
    full = aggregate(full_loss, weights)
    full.backward()

    split_loss = loss_values.clone().requires_grad_()
    accumulated = torch.zeros(())
    for mb in micro_batch_of_row.unique():
        rows = torch.nonzero(micro_batch_of_row == mb).squeeze(-1)  # any subset of rows, any order
        part = aggregate(split_loss[rows], weights[rows])
        part.backward()
        accumulated = accumulated + part.detach()

    torch.testing.assert_close(accumulated, full.detach(), atol=1e-4, rtol=1e-5)
    assert full_loss.grad is not None and split_loss.grad is not None
    torch.testing.assert_close(split_loss.grad, full_loss.grad)
    torch.testing.assert_close(full_loss.grad, weights)


@settings(max_examples=100, deadline=None)
@given(batches())
def test_normalised_modes_sum_to_one(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str],
) -> None:
    mask, _, episode_ids, _, _ = batch
    expected = 1.0 if mask.sum() > 0 else 0.0
    for mode in ("token-mean", "seq-mean-token-mean", "episode-mean"):
        total = token_weights(mask, mode, episode_ids=episode_ids).sum().item()
        assert total == pytest.approx(expected, abs=1e-5), mode


@settings(max_examples=100, deadline=None)
@given(batches())
def test_token_mean_is_masked_mean(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str],
) -> None:
    mask, loss, _, _, _ = batch
    torch.testing.assert_close(
        aggregate_loss(loss, mask, "token-mean"), masked_mean(loss, mask), atol=1e-5, rtol=1e-5
    )


@settings(max_examples=100, deadline=None)
@given(batches())
def test_each_episode_weighs_one_over_num_episodes(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str],
) -> None:
    mask, _, episode_ids, _, _ = batch
    weights = token_weights(mask, "episode-mean", episode_ids=episode_ids)
    row_tokens = mask.sum(-1)
    live = [e for e in episode_ids.unique() if row_tokens[episode_ids == e].sum() > 0]
    for episode in live:
        total = weights[episode_ids == episode].sum().item()
        assert total == pytest.approx(1.0 / len(live), abs=1e-5)
