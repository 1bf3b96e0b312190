"""Clipped value loss, explained variance and entropy: hand values and autograd checks."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.value import (
    clipped_value_loss,
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
)

# token 0: inside the clip range; 1: clipped from above and the clipped term dominates;
# 2: clipped from below and the clipped term dominates; 3: clipped but the unclipped term dominates;
# 4: masked (garbage values).
VALUES = [[0.9, 2.0, 0.2, 2.0, 7.0]]
OLD_VALUES = [[0.8, 1.5, 0.8, 1.5, -3.0]]
RETURNS = [[1.5, 3.0, 0.0, 1.0, 100.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])


def test_clipped_value_loss_hand_values_and_gradients() -> None:
    values = torch.tensor(VALUES, requires_grad=True)
    loss, metrics = clipped_value_loss(
        values, torch.tensor(OLD_VALUES), torch.tensor(RETURNS), MASK, cliprange_value=0.2
    )
    # 0: 0.5*0.6^2; 1: v_clip = 1.7 -> 0.5*1.3^2; 2: v_clip = 0.6 -> 0.5*0.6^2; 3: 0.5*1.0^2
    torch.testing.assert_close(loss, torch.tensor([[0.18, 0.845, 0.18, 0.5, 0.0]]))
    assert metrics["vf_clipfrac"].item() == pytest.approx(0.5)
    assert not metrics["vf_clipfrac"].requires_grad
    loss.sum().backward()
    assert values.grad is not None
    # d/dv 0.5 (v - R)^2 = v - R where unclipped dominates; 0 where the clipped term does or masked
    torch.testing.assert_close(values.grad, torch.tensor([[-0.6, 0.0, 0.0, 1.0, 0.0]]))


def test_value_loss_without_clipping() -> None:
    values = torch.tensor(VALUES, requires_grad=True)
    loss, metrics = clipped_value_loss(values, torch.tensor(OLD_VALUES), torch.tensor(RETURNS), MASK)
    torch.testing.assert_close(loss, torch.tensor([[0.18, 0.5, 0.02, 0.5, 0.0]]))
    assert metrics["vf_clipfrac"].item() == 0.0
    loss.sum().backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[-0.6, -1.0, 0.2, 1.0, 0.0]]))


def test_value_loss_masked_positions_are_zero_even_if_non_finite() -> None:
    values = torch.tensor([[1.0, float("inf")]])
    loss, _ = clipped_value_loss(
        values, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), cliprange_value=0.5
    )
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.0]]))


def test_explained_variance_hand_values() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # residual [0, 0, 0, -1]: Var = 0.25 (unbiased); Var[R] = 5/3 -> 1 - 0.15
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -7.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    # a critic worse than the mean is negative
    assert explained_variance(-returns, returns, mask).item() < 0


def test_explained_variance_constant_returns_is_zero_not_nan() -> None:
    returns = torch.full((2, 3), 1.0)
    result = explained_variance(torch.randn(2, 3), returns, torch.ones(2, 3))
    assert result.item() == 0.0
    assert explained_variance(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_explained_variance_is_detached() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    result = explained_variance(values, torch.randn(2, 3), torch.ones(2, 3))
    assert result.dim() == 0 and not result.requires_grad


def test_entropy_matches_explicit_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (3, 4)
    torch.testing.assert_close(entropy, expected)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), expected)


def test_entropy_of_uniform_is_log_vocab() -> None:
    for vocab in (2, 7, 1000):
        entropy = entropy_from_logits(torch.full((2, 3, vocab), 4.2))
        torch.testing.assert_close(entropy, torch.full((2, 3), math.log(vocab)))


def test_entropy_is_stable_for_huge_logits_and_banned_tokens() -> None:
    logits = torch.tensor([[[1e4, 1e4, -1e4, float("-inf")]]])
    entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy, torch.tensor([[math.log(2.0)]]))
    peaked = entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0]]]))
    assert torch.isfinite(peaked).all() and peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_of_bf16_logits_is_float32() -> None:
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    entropy = entropy_from_logits(logits, chunk_size=1)
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, entropy_from_logits(logits.float()))


def test_entropy_gradient() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=1), (logits,))


def test_entropy_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.randn(2, 3, 4), chunk_size=0)


def test_entropy_bonus_lowers_loss_as_entropy_rises() -> None:
    entropy = torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(entropy_bonus(entropy), torch.tensor([[-0.5, -2.0]]))
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], requires_grad=True)
    entropy_bonus(entropy_from_logits(logits)).sum().backward()
    assert logits.grad is not None
    # descending the bonus moves the logits toward uniform: the largest logit goes down
    assert logits.grad[0, 0, 0] > 0 and logits.grad[0, 0, 2] < 0
