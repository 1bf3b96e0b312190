"""Critic loss, critic diagnostics and policy entropy.

All per-token tensors are ``[batch, time]`` and 0 where ``loss_mask == 0``; per-token losses are
reduced with an aggregation (``algorithms/aggregate.py``) like the policy loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_mean, masked_var


def _float_mask(loss_mask: Tensor) -> Tensor:
    return loss_mask if loss_mask.is_floating_point() else loss_mask.to(torch.float32)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    *,
    cliprange_value: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss (Schulman et al. 2017), per token ``[batch, time]``.

    With ``c = cliprange_value``::

        v_clipped = old_values + clamp(values - old_values, -c, c)
        loss      = 0.5 * max((values - returns)^2, (v_clipped - returns)^2)

    and ``0.5 * (values - returns)^2`` when ``c`` is None. Where the clipped term is the larger,
    ``v_clipped`` is constant in ``values`` and the gradient is 0: the critic cannot move further
    than ``c`` from its rollout-time estimate in one update. 0 where ``loss_mask == 0``.

    Metrics: ``vf_clipfrac``, the fraction of trainable tokens where the clipped term is strictly
    larger (those that get no gradient).
    """
    mask = _float_mask(loss_mask)
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        per_token = 0.5 * unclipped
        clipfrac = values.new_zeros(())
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        clipped = (v_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(mask.dtype), mask)
    per_token = torch.where(mask > 0, per_token, 0.0)
    return per_token, {"vf_clipfrac": clipfrac.detach()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over counted entries: a 0-dim detached tensor.

    1 is a perfect critic, 0 is no better than predicting the mean return, < 0 is worse than that.
    Choice: when Var[returns] is 0 (constant returns, fewer than two counted entries) the ratio is
    undefined; we return 0.0 instead of NaN so that logged curves and averages stay finite.
    """
    with torch.no_grad():
        counted = _float_mask(mask)
        var_returns = masked_var(returns, counted)
        var_residual = masked_var(returns - values, counted)
        if not bool(var_returns > 0):
            return returns.new_zeros(())
        return 1.0 - var_residual / var_returns


def entropy_from_logits(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of the softmax distribution at each position: ``[batch, time, vocab] -> [batch, time]``.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, with z shifted by its (detached) maximum: it never
    forms log(0), does not cancel for large logits, and ``-inf`` logits (banned tokens) contribute
    0. Computed in float32 (or the input's wider type) ``chunk_size`` rows at a time, so a bf16
    ``[B, T, V]`` tensor is never upcast in full. Differentiable.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1], dtype=compute_dtype)
    step = logits.shape[0] if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    lowest = torch.finfo(compute_dtype).min
    chunks = []
    for chunk in logits.split(step, dim=0):
        z = chunk.to(compute_dtype)
        # entropy is shift-invariant; centring on the max avoids cancellation between two ~max terms
        z = z - z.detach().amax(dim=-1, keepdim=True)
        probs = torch.softmax(z, dim=-1)
        # clamping -inf to the lowest finite value keeps 0 * z at 0 instead of NaN
        expected_logit = (probs * z.clamp(min=lowest)).sum(dim=-1)
        chunks.append(torch.logsumexp(z, dim=-1) - expected_logit)
    return torch.cat(chunks, dim=0)


def entropy_bonus(entropy: Tensor) -> Tensor:
    """Per-token loss ``-entropy`` ``[batch, time]``: the trainer adds ``coef * aggregate(...)`` of it,
    so minimising the total loss raises the policy's entropy."""
    return -entropy
