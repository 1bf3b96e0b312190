"""Off-policy corrections: masks and importance weights for data the trained policy did not sample.

Two sources of off-policyness: staleness (several updates per batch, asynchronous rollouts) and the
sampler/trainer mismatch (the rollout engine, e.g. vLLM, and the training engine, e.g. FSDP,
compute slightly different probabilities for the same weights). All outputs are detached
``[batch, time]`` float tensors, 0 where ``loss_mask == 0``, to be multiplied into a per-token loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_max, masked_mean

# exp(20) ~ 5e8: far beyond any useful threshold, and finite in float32 even for long sequences.
MAX_LOG_RATIO = 20.0


def _float_mask(loss_mask: Tensor) -> Tensor:
    return loss_mask if loss_mask.is_floating_point() else loss_mask.to(torch.float32)


def off_policy_sequence_mask(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    delta: float,
) -> Tensor:
    """Off-policy sequence masking of DeepSeek-V3.2 (DeepSeek-AI 2025, arXiv:2512.02556, Eq. 9).

    The paper multiplies the clipped surrogate of token t of sequence i by

        M_it = 0  if  A_it < 0  and  (1/|o_i|) sum_t log(pi_old(o_it) / pi_theta(o_it)) > delta
        M_it = 1  otherwise,

    where pi_old is the sampling policy: negative-advantage sequences that drifted too far from the
    sampler (a KL estimate per sequence) are not pushed down, since their updates are the most
    destabilising. Here the KL is the mean of ``old_logprobs - logprobs`` over the row's trainable
    tokens, and ``keep = loss_mask * M``. With outcome advantages (constant along a row, as in
    GRPO) this drops whole rows; with per-token advantages (GAE) only the negative tokens of a
    drifted row are dropped, as in the paper's per-token ``A_it``.

    Shapes: all inputs ``[batch, time]``; returns ``keep`` ``[batch, time]`` float, detached.
    """
    with torch.no_grad():
        mask = _float_mask(loss_mask)
        row_kl = masked_mean(old_logprobs - logprobs, mask, dim=-1)
        drifted = (row_kl > delta).unsqueeze(-1)
        drop = (advantages < 0) & drifted
        return mask * (~drop).to(mask.dtype)


def _log_ratio(
    trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: str
) -> tuple[Tensor, Tensor]:
    """Clamped log(pi_trainer / pi_rollout) and the mask its statistics count.

    Token level: ``[batch, time]`` and ``mask``. Sequence level: the sum over the row's trainable
    tokens ``[batch, 1]`` and ``[batch, 1]`` marking rows with a trainable token.
    """
    per_token = torch.where(mask > 0, trainer_logprobs - rollout_logprobs, 0.0)
    if level == "token":
        return per_token.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), mask
    if level == "sequence":
        row_mask = (mask.sum(dim=-1, keepdim=True) > 0).to(mask.dtype)
        return per_token.sum(dim=-1, keepdim=True).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), row_mask
    raise ValueError(f"rollout correction level must be 'token' or 'sequence', got {level!r}")


def rollout_correction(
    trainer_logprobs: Tensor,
    rollout_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    threshold: float = 2.0,
    lower: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Importance weights for the sampler/trainer mismatch (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training": truncated importance sampling).

    ratio = exp(trainer_logprobs - rollout_logprobs) (log-ratio clamped to +-MAX_LOG_RATIO), detached.

    - ``level="token"``: one ratio per token; ``level="sequence"``: the product over the row's
      trainable tokens, exp(sum_t log-ratio), broadcast to every token of the row.
    - ``mode="truncate"``: ``weights = min(ratio, threshold)``, ``keep = loss_mask``.
    - ``mode="mask"``: ``weights = 1``, ``keep = loss_mask * [lower <= ratio <= threshold]``, with
      ``lower = 1 / threshold`` unless given (``lower`` is an error in truncate mode).

    Shapes: inputs ``[batch, time]``; returns ``(weights, keep_mask, metrics)`` with both tensors
    ``[batch, time]``, 0 where ``loss_mask == 0``. Metrics (detached scalars):
    ``rollout_is_mean`` / ``rollout_is_max`` (over trainable tokens, or over rows at sequence
    level), ``rollout_kl`` (k1 estimate of KL(rollout || trainer) per token), and
    ``rollout_is_truncated_frac`` or ``rollout_is_masked_frac``.
    """
    if mode not in ("truncate", "mask"):
        raise ValueError(f"rollout correction mode must be 'truncate' or 'mask', got {mode!r}")
    if not threshold > 0:
        raise ValueError(f"rollout correction threshold must be positive, got {threshold}")
    if mode == "truncate" and lower is not None:
        raise ValueError("`lower` only applies to mode='mask'")
    low = 1.0 / threshold if lower is None else lower
    if mode == "mask" and not 0 <= low <= threshold:
        raise ValueError(f"need 0 <= lower <= threshold, got lower={low}, threshold={threshold}")

    with torch.no_grad():
        mask = _float_mask(loss_mask)
        log_ratio, stat_mask = _log_ratio(trainer_logprobs, rollout_logprobs, mask, level)
        unit_ratio = torch.exp(log_ratio)  # one per token, or one per row at sequence level
        ratio = unit_ratio.expand_as(mask) * mask
        metrics = {
            "rollout_is_mean": masked_mean(unit_ratio, stat_mask),
            "rollout_is_max": masked_max(unit_ratio, stat_mask),
            "rollout_kl": masked_mean(torch.where(mask > 0, rollout_logprobs - trainer_logprobs, 0.0), mask),
        }
        if mode == "truncate":
            weights = torch.clamp(ratio, max=threshold)
            keep = mask.clone()
            over = (unit_ratio > threshold).to(mask.dtype)
            metrics["rollout_is_truncated_frac"] = masked_mean(over, stat_mask)
        else:
            inside = ((unit_ratio >= low) & (unit_ratio <= threshold)).to(mask.dtype)
            weights = mask.clone()
            keep = mask * inside
            metrics["rollout_is_masked_frac"] = masked_mean(1.0 - inside, stat_mask)
    return weights, keep, metrics
