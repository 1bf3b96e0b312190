"""Per-token KL(pi_theta || pi_ref) estimators and KL-coefficient controllers.

Estimators are registered in ``KL_ESTIMATORS`` with the contract
``fn(logprobs, ref_logprobs) -> kl [batch, time]`` (neither masked nor reduced), where
``log_ratio = logprobs - ref_logprobs`` on tokens sampled from pi_theta (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

- ``k1 = log_ratio``: unbiased, high variance, can be negative;
- ``k2 = 0.5 * log_ratio^2``: biased but low variance, >= 0; its gradient log_ratio * grad log pi
  is the on-policy gradient of KL(pi_theta || pi_ref);
- ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased, low variance, >= 0;
- ``k1_st``, ``k3_st``: the value of k1 / k3 with the gradient of k2 (straight-through), so the
  logged penalty is unbiased while the loss term has the correct KL gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.registry import KL_ESTIMATORS

# exp(-log_ratio) overflows float32 beyond ~88; 20 keeps k3 finite with room for its gradient.
K3_LOG_RATIO_CLAMP = 20.0


@KL_ESTIMATORS.register("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi_theta - log pi_ref   [B,T] (Schulman 2020)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi_theta - log pi_ref)^2   [B,T] (Schulman 2020)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(-d) - 1 + d with d = clamp(log pi_theta - log pi_ref, -20, 20)   [B,T] (Schulman 2020).

    Equals (q/p - 1) - log(q/p) for p = pi_theta, q = pi_ref, which is >= 0 since log x <= x - 1.
    expm1 keeps that sign in floating point: exp(-d) - 1 would round to 0 for tiny d and leave -d.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


def _straight_through(value: Tensor, gradient_source: Tensor) -> Tensor:
    """``value`` in the forward pass, ``gradient_source``'s gradient in the backward pass."""
    return gradient_source + (value - gradient_source).detach()


@KL_ESTIMATORS.register("k1_st")
def k1_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Value of k1, gradient of k2: k2 + sg(k1 - k2)   [B,T]."""
    return _straight_through(k1(logprobs, ref_logprobs), k2(logprobs, ref_logprobs))


@KL_ESTIMATORS.register("k3_st")
def k3_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Value of k3, gradient of k2: k2 + sg(k3 - k2)   [B,T]."""
    return _straight_through(k3(logprobs, ref_logprobs), k2(logprobs, ref_logprobs))


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k3",
    *,
    importance_ratio: Tensor | None = None,
) -> Tensor:
    """Per-token KL estimate [B,T] with the named estimator, optionally importance-weighted.

    Tokens sampled by pi_old rather than pi_theta give a biased estimate of KL(pi_theta || pi_ref);
    weighting by sg(pi_theta / pi_old) (``importance_ratio`` [B,T]) makes it unbiased again
    (DeepSeek-V3.2, arXiv:2512.02556, "unbiased KL estimate"). The weight carries no gradient.
    """
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)
    if importance_ratio is None:
        return kl
    result: Tensor = kl * importance_ratio.detach()
    return result


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op so it can stand in for the adaptive one."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient unchanged."""

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional control of the KL coefficient towards a target KL (Ziegler et al. 2019, arXiv:1909.08593).

    After ``n_steps`` samples with measured KL ``current_kl``:
        error = clip(current_kl / target - 1, -0.2, 0.2);  coef *= 1 + error * n_steps / horizon.
    The clip bounds each update so one noisy KL measurement cannot swing the coefficient.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if init_coef < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Raise the coefficient when the KL is above target, lower it when below."""
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The mutable state (the coefficient); target and horizon come from the config."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
