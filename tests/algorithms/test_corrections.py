"""Off-policy sequence masking and rollout-correction weights: hand values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.corrections import (
    MAX_LOG_RATIO,
    off_policy_sequence_mask,
    rollout_correction,
)

LOG_2 = math.log(2.0)


def test_off_policy_sequence_mask_hand_values() -> None:
    loss_mask = torch.tensor(
        [
            [1.0, 1.0, 0.0],  # negative advantage, KL 0.5 > 0.3: dropped
            [1.0, 1.0, 0.0],  # positive advantage, same drift: kept
            [1.0, 1.0, 1.0],  # negative advantage, KL 0.1: kept
            [1.0, 0.0, 0.0],  # negative advantage, KL 0.2 on its single token: kept
        ]
    )
    logprobs = torch.tensor(
        [
            [-1.0, -1.0, 99.0],  # the padding value must not enter the row's KL
            [-1.0, -1.0, 99.0],
            [-1.0, -1.0, -1.0],
            [-1.0, 0.0, 0.0],
        ]
    )
    old_logprobs = torch.tensor(
        [
            [-0.6, -0.4, 0.0],
            [-0.6, -0.4, 0.0],
            [-0.9, -0.8, -1.0],
            [-0.8, 0.0, 0.0],
        ]
    )
    advantages = torch.tensor([[-1.0] * 3, [1.0] * 3, [-2.0] * 3, [-1.0] * 3])
    keep = off_policy_sequence_mask(logprobs, old_logprobs, advantages, loss_mask, delta=0.3)
    expected = loss_mask.clone()
    expected[0] = 0.0
    torch.testing.assert_close(keep, expected)
    # a looser threshold keeps everything
    keep = off_policy_sequence_mask(logprobs, old_logprobs, advantages, loss_mask, delta=0.6)
    torch.testing.assert_close(keep, loss_mask)


def test_off_policy_sequence_mask_per_token_advantages() -> None:
    # Eq. 9 of DeepSeek-V3.2 conditions on A_it: in a drifted row only negative tokens are dropped
    loss_mask = torch.ones(1, 4)
    logprobs = torch.full((1, 4), -2.0)
    old_logprobs = torch.full((1, 4), -1.0)  # KL estimate 1.0
    advantages = torch.tensor([[0.5, -0.5, 0.0, -0.1]])
    keep = off_policy_sequence_mask(logprobs, old_logprobs, advantages, loss_mask, delta=0.5)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_off_policy_sequence_mask_is_detached_and_handles_empty_rows() -> None:
    logprobs = torch.zeros(2, 3, requires_grad=True)
    keep = off_policy_sequence_mask(
        logprobs, torch.ones(2, 3), -torch.ones(2, 3), torch.tensor([[0.0] * 3, [1.0] * 3]), delta=0.1
    )
    assert not keep.requires_grad
    torch.testing.assert_close(keep, torch.zeros(2, 3))


def test_token_truncate_hand_values() -> None:
    rollout = torch.zeros(1, 4)
    trainer = torch.log(torch.tensor([[0.5, 1.0, 3.0, 7.0]]))
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, keep, metrics = rollout_correction(trainer, rollout, loss_mask, threshold=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(keep, loss_mask)
    assert metrics["rollout_is_mean"].item() == pytest.approx(1.5)
    assert metrics["rollout_is_max"].item() == pytest.approx(3.0)
    assert metrics["rollout_is_truncated_frac"].item() == pytest.approx(1 / 3)
    expected_kl = -(math.log(0.5) + math.log(3.0)) / 3
    assert metrics["rollout_kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_sequence_truncate_hand_values() -> None:
    rollout = torch.tensor([[-1.0, -1.0, -5.0], [-1.0, -1.0, -1.0]])
    # row 0: log-ratio log 2 on each of two trainable tokens -> 4, truncated to 2
    # row 1: log-ratios log 2 and -log 4 -> 0.5
    trainer = rollout + torch.tensor([[LOG_2, LOG_2, 9.0], [LOG_2, -2 * LOG_2, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    weights, keep, metrics = rollout_correction(trainer, rollout, loss_mask, level="sequence", threshold=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 2.0, 0.0], [0.5, 0.5, 0.5]]))
    torch.testing.assert_close(keep, loss_mask)
    # statistics count each row once
    assert metrics["rollout_is_mean"].item() == pytest.approx(2.25)
    assert metrics["rollout_is_max"].item() == pytest.approx(4.0)
    assert metrics["rollout_is_truncated_frac"].item() == pytest.approx(0.5)


def test_token_mask_hand_values() -> None:
    rollout = torch.zeros(1, 5)
    trainer = torch.log(torch.tensor([[0.4, 1.0, 3.0, 0.6, 100.0]]))
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    weights, keep, metrics = rollout_correction(trainer, rollout, loss_mask, mode="mask", threshold=2.0)
    torch.testing.assert_close(weights, loss_mask)
    torch.testing.assert_close(keep, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]))  # keep 0.5 <= r <= 2
    assert metrics["rollout_is_masked_frac"].item() == pytest.approx(0.5)
    _, keep, _ = rollout_correction(trainer, rollout, loss_mask, mode="mask", threshold=4.0, lower=0.1)
    torch.testing.assert_close(keep, loss_mask)


def test_sequence_mask_hand_values() -> None:
    rollout = torch.zeros(3, 2)
    trainer = torch.tensor([[LOG_2, LOG_2], [LOG_2, -LOG_2], [0.0, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # row 2 has no trainable token
    _, keep, metrics = rollout_correction(trainer, rollout, loss_mask, level="sequence", mode="mask")
    torch.testing.assert_close(keep, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert metrics["rollout_is_masked_frac"].item() == pytest.approx(0.5)


def test_rollout_correction_is_detached_and_finite() -> None:
    trainer = torch.tensor([[50.0, 50.0, 50.0]], requires_grad=True)
    rollout = torch.zeros(1, 3)
    for level in ("token", "sequence"):
        weights, keep, metrics = rollout_correction(trainer, rollout, torch.ones(1, 3), level=level)
        assert not weights.requires_grad and not keep.requires_grad
        assert all(not m.requires_grad for m in metrics.values())
        assert torch.isfinite(metrics["rollout_is_max"])
        assert metrics["rollout_is_max"].item() == pytest.approx(math.exp(MAX_LOG_RATIO), rel=1e-4)


def test_rollout_correction_ignores_garbage_at_padding() -> None:
    trainer = torch.tensor([[0.0, float("inf")]])
    rollout = torch.tensor([[0.0, float("-inf")]])
    weights, _, metrics = rollout_correction(trainer, rollout, torch.tensor([[1.0, 0.0]]), level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0]]))
    assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": "episode"}, "level"),
        ({"mode": "clip"}, "mode"),
        ({"threshold": 0.0}, "threshold"),
        ({"lower": 0.5}, "lower"),
        ({"mode": "mask", "lower": 3.0}, "lower"),
    ],
)
def test_rollout_correction_rejects_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rollout_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **kwargs)  # type: ignore[arg-type]
