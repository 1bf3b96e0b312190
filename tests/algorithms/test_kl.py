"""KL estimators (values, bias, straight-through gradients), kl_penalty and the KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from posttrain.algorithms import kl
from posttrain.algorithms.registry import KL_ESTIMATORS

DTYPE = torch.float64


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=DTYPE)


REF = t([[-1.0, -2.0, -0.5, -3.0]])
LOG_RATIO = t([[0.0, 0.5, -1.0, 2.0]])


def leaf_logprobs() -> Tensor:
    return (REF + LOG_RATIO).requires_grad_(True)


def test_registry_holds_the_estimators() -> None:
    assert {"k1", "k2", "k3", "k1_st", "k3_st"} <= set(KL_ESTIMATORS.names())


def test_hand_computed_values() -> None:
    logprobs = REF + LOG_RATIO
    torch.testing.assert_close(kl.k1(logprobs, REF), LOG_RATIO)
    torch.testing.assert_close(kl.k2(logprobs, REF), t([[0.0, 0.125, 0.5, 2.0]]))
    k3_expected = [math.exp(-d) - 1.0 + d for d in LOG_RATIO[0].tolist()]
    torch.testing.assert_close(kl.k3(logprobs, REF), t([k3_expected]))
    assert kl.k3(logprobs, REF)[0, 0] == 0  # identical policies: zero divergence


def test_k3_clamps_the_log_ratio() -> None:
    logprobs = t([[0.0, 0.0]])
    ref = t([[-200.0, 200.0]])  # log-ratios +200 and -200
    value = kl.k3(logprobs, ref)
    torch.testing.assert_close(value, t([[math.exp(-20.0) - 1.0 + 20.0, math.exp(20.0) - 1.0 - 20.0]]))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-60.0, 0.0), min_size=1, max_size=8),
    st.lists(st.floats(-60.0, 0.0), min_size=1, max_size=8),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_k3_and_k2_are_nonnegative(
    logprobs: list[float], ref_logprobs: list[float], dtype: torch.dtype
) -> None:
    n = min(len(logprobs), len(ref_logprobs))
    lp = torch.tensor([logprobs[:n]], dtype=dtype)
    ref = torch.tensor([ref_logprobs[:n]], dtype=dtype)
    for name in ("k2", "k3", "k3_st"):
        value = KL_ESTIMATORS.get(name)(lp, ref)
        assert torch.isfinite(value).all(), name
        assert (value >= 0).all(), name


def categorical_pair() -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(6, dtype=DTYPE, requires_grad=True)
    ref_log_probs = torch.log_softmax(torch.randn(6, dtype=DTYPE), -1)
    return logits, ref_log_probs


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum()


@pytest.mark.parametrize("name", ["k1", "k3", "k1_st", "k3_st"])
def test_unbiased_estimators_have_expectation_kl(name: str) -> None:
    """E_{x ~ p}[k(x)] computed exactly over a categorical's support equals KL(p || q)."""
    logits, log_q = categorical_pair()
    log_p = torch.log_softmax(logits, -1).detach()
    expectation = (log_p.exp() * KL_ESTIMATORS.get(name)(log_p, log_q)).sum()
    torch.testing.assert_close(expectation, exact_kl(log_p, log_q))


def test_k2_is_biased() -> None:
    logits, log_q = categorical_pair()
    log_p = torch.log_softmax(logits, -1).detach()
    expectation = (log_p.exp() * kl.k2(log_p, log_q)).sum()
    assert not torch.isclose(expectation, exact_kl(log_p, log_q))


def expected_score_gradient(name: str) -> tuple[Tensor, Tensor]:
    """sum_x sg(p(x)) * grad k(x): what a per-token KL loss term gives in expectation on-policy."""
    logits, log_q = categorical_pair()
    log_p = torch.log_softmax(logits, -1)
    surrogate = (log_p.exp().detach() * KL_ESTIMATORS.get(name)(log_p, log_q)).sum()
    (grad,) = torch.autograd.grad(surrogate, logits)
    (true_grad,) = torch.autograd.grad(exact_kl(torch.log_softmax(logits, -1), log_q), logits)
    return grad, true_grad


@pytest.mark.parametrize("name", ["k2", "k1_st", "k3_st"])
def test_k2_gradient_is_the_kl_gradient(name: str) -> None:
    grad, true_grad = expected_score_gradient(name)
    torch.testing.assert_close(grad, true_grad)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_plain_k1_k3_gradients_are_not_the_kl_gradient(name: str) -> None:
    grad, true_grad = expected_score_gradient(name)
    assert not torch.allclose(grad, true_grad, atol=1e-6)


@pytest.mark.parametrize(("name", "base"), [("k1_st", "k1"), ("k3_st", "k3")])
def test_straight_through_value_of_base_gradient_of_k2(name: str, base: str) -> None:
    logprobs = leaf_logprobs()
    ref = REF.clone().requires_grad_(True)
    value = KL_ESTIMATORS.get(name)(logprobs, ref)
    torch.testing.assert_close(value, KL_ESTIMATORS.get(base)(logprobs, ref))
    grad_lp, grad_ref = torch.autograd.grad(value.sum(), (logprobs, ref))
    # d k2 / d logprobs = log_ratio, d k2 / d ref = -log_ratio
    torch.testing.assert_close(grad_lp, LOG_RATIO)
    torch.testing.assert_close(grad_ref, -LOG_RATIO)
    (k2_grad,) = torch.autograd.grad(kl.k2(logprobs, REF).sum(), logprobs)
    torch.testing.assert_close(grad_lp, k2_grad)


def test_kl_penalty_default_and_named_estimators() -> None:
    logprobs = REF + LOG_RATIO
    torch.testing.assert_close(kl.kl_penalty(logprobs, REF), kl.k3(logprobs, REF))
    torch.testing.assert_close(kl.kl_penalty(logprobs, REF, "k2"), kl.k2(logprobs, REF))
    with pytest.raises(KeyError, match="k4"):
        kl.kl_penalty(logprobs, REF, "k4")


def test_kl_penalty_importance_ratio_is_a_stop_gradient_weight() -> None:
    logprobs = leaf_logprobs()
    old_logprobs = t([[-1.0, -1.5, -1.5, -1.0]])
    ratio = torch.exp(logprobs - old_logprobs)  # carries a gradient that must not be used
    value = kl.kl_penalty(logprobs, REF, "k2", importance_ratio=ratio)
    torch.testing.assert_close(value, kl.k2(logprobs, REF) * ratio)
    (grad,) = torch.autograd.grad(value.sum(), logprobs)
    torch.testing.assert_close(grad, ratio.detach() * LOG_RATIO)


def test_fixed_controller_never_moves() -> None:
    controller = kl.FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.coef == 0.05
    other = kl.FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.coef == 0.05
    with pytest.raises(ValueError):
        kl.FixedKLController(-1.0)


@pytest.mark.parametrize(
    ("current_kl", "expected_error"),
    [(6.6, 0.1), (60.0, 0.2), (5.4, -0.1), (0.0, -0.2), (6.0, 0.0)],
)
def test_adaptive_controller_update(current_kl: float, expected_error: float) -> None:
    controller = kl.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=current_kl, n_steps=100)
    assert controller.coef == pytest.approx(0.1 * (1 + expected_error * 100 / 10_000))


@settings(max_examples=100, deadline=None)
@given(current_kl=st.floats(0.0, 1e3), n_steps=st.integers(1, 5000))
def test_adaptive_controller_direction_and_clip(current_kl: float, n_steps: int) -> None:
    target, horizon = 2.0, 10_000.0
    controller = kl.AdaptiveKLController(init_coef=0.2, target=target, horizon=horizon)
    controller.update(current_kl, n_steps)
    factor = controller.coef / 0.2
    max_step = 0.2 * n_steps / horizon
    assert 1 - max_step - 1e-12 <= factor <= 1 + max_step + 1e-12
    if current_kl > target * (1 + 1e-9):
        assert factor > 1
    elif current_kl < target * (1 - 1e-9):
        assert factor < 1


def test_adaptive_controller_checkpoint_round_trip() -> None:
    controller = kl.AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)
    for _ in range(3):
        controller.update(current_kl=3.0, n_steps=10)
    assert controller.coef == pytest.approx(0.1 * 1.02**3)
    resumed = kl.AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)
    resumed.load_state_dict(controller.state_dict())
    controller.update(current_kl=0.5, n_steps=10)
    resumed.update(current_kl=0.5, n_steps=10)
    assert resumed.coef == controller.coef


def test_adaptive_controller_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        kl.AdaptiveKLController(init_coef=0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError):
        kl.AdaptiveKLController(init_coef=0.1, target=1.0, horizon=0)
