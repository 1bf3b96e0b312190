"""The step's off-policy corrections on hand-made batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.batch import Batch
from posttrain.train.config import load_config
from posttrain.train.off_policy import corrected, correction_weights


def _state(*settings: str) -> SimpleNamespace:
    return SimpleNamespace(config=load_config(None, list(settings)))


def _batch(rollout_logprobs: list[list[float]], advantages: list[list[float]]) -> Batch:
    rows = len(rollout_logprobs)
    return Batch(
        input_ids=torch.zeros(rows, 2, dtype=torch.long),
        attention_mask=torch.ones(rows, 2, dtype=torch.long),
        loss_mask=torch.ones(rows, 2),
        rollout_logprobs=torch.tensor(rollout_logprobs),
        token_rewards=torch.zeros(rows, 2),
        group_ids=torch.zeros(rows, dtype=torch.long),
        episode_ids=torch.arange(rows),
        segment_index=torch.zeros(rows, dtype=torch.long),
        ended=torch.ones(rows, dtype=torch.bool),
        advantages=torch.tensor(advantages),
    )


def test_off_policy_sequence_mask_drops_negative_rows_that_drifted() -> None:
    """DeepSeek-V3.2's mask, by hand: row 0 drifted (mean log pi_sampler - log pi_theta = 1 > 0.5)
    with a negative advantage: dropped; row 1 drifted with a positive one: kept; row 2 negative but
    close to the sampler: kept."""
    state = _state("algo.rollout_correction.mode=none", "algo.rollout_correction.sequence_mask_delta=0.5")
    micro = _batch([[0.0, 0.0], [0.0, 0.0], [-1.2, -1.0]], [[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    kept = corrected(state, torch.ones(3, 2), torch.full((3, 2), -1.0), micro)
    assert kept.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert correction_weights(state, micro) == {} and micro.correction_weights is None  # mode none


def test_truncated_weights_by_hand_at_token_and_sequence_level() -> None:
    batch = _batch([[-1.0, -2.0]], [[1.0, 1.0]])
    batch.old_logprobs = torch.tensor([[-1.0 + math.log(3.0), -2.0 + math.log(1.5)]])  # ratios 3, 1.5
    metrics = correction_weights(_state("algo.rollout_correction.threshold=2"), batch)
    torch.testing.assert_close(batch.correction_weights, torch.tensor([[2.0, 1.5]]))
    assert metrics["correction/rollout_is_truncated_frac"] == pytest.approx(0.5)
    correction_weights(
        _state("algo.rollout_correction.level=sequence", "algo.rollout_correction.threshold=10"), batch
    )
    torch.testing.assert_close(batch.correction_weights, torch.tensor([[4.5, 4.5]]))  # 3 x 1.5
    per_token = torch.tensor([[1.0, 2.0]])
    state = _state("algo.rollout_correction.level=sequence", "algo.rollout_correction.threshold=10")
    torch.testing.assert_close(
        corrected(state, per_token, batch.old_logprobs, batch), torch.tensor([[4.5, 9.0]])
    )


def test_without_a_correction_the_loss_is_untouched() -> None:
    batch = _batch([[-1.0, -2.0]], [[1.0, 1.0]])
    per_token = torch.tensor([[1.0, 2.0]])
    assert corrected(_state(), per_token, per_token, batch) is per_token
    assert correction_weights(_state(), batch) == {}


def test_mask_mode_lower_bound_defaults_to_one_over_threshold() -> None:
    batch = _batch([[-1.0, -2.0]], [[1.0, 1.0]])
    batch.old_logprobs = batch.rollout_logprobs + math.log(0.8)  # ratio 0.8 on both tokens
    kept = correction_weights(_state("algo.rollout_correction.mode=mask"), batch)  # [0.5, 2]
    assert kept["correction/rollout_is_masked_frac"] == 0.0
    torch.testing.assert_close(batch.correction_weights, torch.ones(1, 2))
    dropped = correction_weights(
        _state("algo.rollout_correction.mode=mask", "algo.rollout_correction.lower=0.9"), batch
    )
    assert dropped["correction/rollout_is_masked_frac"] == 1.0
    torch.testing.assert_close(batch.correction_weights, torch.zeros(1, 2))
