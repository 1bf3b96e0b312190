"""Policy losses: one per-token surrogate, varied only in where the importance ratio lives.

Every loss is registered in ``POLICY_LOSSES`` and follows one contract::

    fn(logprobs, old_logprobs, advantages, loss_mask, *, <hparams>) -> (per_token_loss, metrics)

- ``logprobs`` [batch, time]: log pi_theta of the sampled tokens (carries the gradient),
- ``old_logprobs`` [batch, time]: log pi_old, the behaviour policy that sampled them (no gradient),
- ``advantages`` [batch, time]: per-token advantages (constant along a row for group estimators),
- ``loss_mask`` [batch, time]: 1.0 on trainable tokens, 0.0 elsewhere.

``per_token_loss`` [batch, time] is to be minimised, is exactly 0 where ``loss_mask == 0`` and is not
reduced: an aggregation (``aggregate.py``) turns it into a scalar. Sequence-level losses broadcast a
row's loss to each of its trainable tokens, so that a sequence-mean-token-mean aggregation
reproduces the paper's per-sequence objective.

``metrics`` are detached 0-dim tensors averaged over trainable tokens: always ``clipfrac`` (the
fraction of tokens whose gradient is cut or capped by a clip), ``ratio_mean``, ``ratio_max``,
``ratio_min``; two-sided clips add ``clipfrac_low`` and ``clipfrac_high``.

At r = 1 (``logprobs == old_logprobs``) ppo_clip, gspo, gspo_token, cispo, sapo and reinforce all
have the gradient of the plain policy gradient -A * log pi per token: they differ off-policy only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_max, masked_mean, masked_min
from posttrain.algorithms.registry import POLICY_LOSSES

Metrics = dict[str, Tensor]


# ----------------------------------------------------------------------------- shared pieces


def _mask_like(loss_mask: Tensor, like: Tensor) -> Tensor:
    """The mask as a float tensor of ``like``'s dtype (callers may pass bool or int masks)."""
    return loss_mask.to(dtype=like.dtype)


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, log_ratio_clamp: float) -> Tensor:
    """log(pi_theta / pi_old) [B,T], clamped to +-``log_ratio_clamp`` so that exp() cannot overflow."""
    return (logprobs - old_logprobs).clamp(min=-log_ratio_clamp, max=log_ratio_clamp)


def _masked_loss(loss: Tensor, mask: Tensor) -> Tensor:
    """``loss`` where the mask is set and exactly 0 elsewhere (even if ``loss`` is not finite there)."""
    return torch.where(mask > 0, loss, torch.zeros_like(loss))


def _zero_off_mask(mask: Tensor, logprobs: Tensor, old_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Both log-prob tensors with 0 where the mask is 0.

    A masked position may hold anything (a vocabulary-masked tool token has log-prob -inf). Losses
    that multiply a log-prob, or a weight made from one, by something that is 0 there would
    otherwise send 0 * inf = NaN back through that position into the model's parameters.
    """
    keep = mask > 0
    return torch.where(keep, logprobs, 0.0), torch.where(keep, old_logprobs, 0.0)


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row over its trainable tokens: [B,T] -> [B]; 0 for a row with none."""
    return masked_mean(values, mask, dim=-1)


def _broadcast_rows(row_values: Tensor, mask: Tensor) -> Tensor:
    """Give every trainable token of row b the value ``row_values[b]``: [B] -> [B,T], 0 elsewhere."""
    return _masked_loss(row_values.unsqueeze(-1).expand_as(mask), mask)


def _fraction(condition: Tensor, mask: Tensor) -> Tensor:
    """Fraction of trainable tokens where ``condition`` holds (detached 0-dim tensor)."""
    return masked_mean(condition.to(mask.dtype), mask).detach()


def _ratio_metrics(ratio: Tensor, mask: Tensor, **fractions: Tensor) -> Metrics:
    """The metric dict every loss returns: ratio statistics plus the given clip fractions.

    ``fractions`` maps a metric name to a boolean [B,T] condition; ``clipfrac`` defaults to 0 for
    losses without a hard clip so that every loss reports the same keys.
    """
    ratio = ratio.detach()
    metrics: Metrics = {name: _fraction(cond, mask) for name, cond in fractions.items()}
    metrics.setdefault("clipfrac", ratio.new_zeros(()))
    metrics["ratio_mean"] = masked_mean(ratio, mask)
    metrics["ratio_max"] = masked_max(ratio, mask)
    metrics["ratio_min"] = masked_min(ratio, mask)
    return metrics


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic surrogate loss -min(r A, clip(r, 1-clip_low, 1+clip_high) A).

    Shapes broadcast ([B,T] or [B]). Returns (loss, clipped_low, clipped_high): the boolean masks
    of entries where the clipped branch is taken and the gradient is therefore zero.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(min=1.0 - clip_low, max=1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return loss, clipped_low, clipped_high


# ----------------------------------------------------------------------------- token-level ratio


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate per token [B,T] (Schulman et al. 2017, arXiv:1707.06347).

    loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t),  r_t = pi_theta / pi_old.
    ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476). With
    ``dual_clip = c > 1``, tokens with A_t < 0 are further capped: loss_t = min(loss_t, -c A_t)
    (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729),
    so a huge ratio on a bad token cannot produce an unbounded update.
    """
    mask = _mask_like(loss_mask, logprobs)
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, log_ratio_clamp))
    loss, clipped_low, clipped_high = _clipped_surrogate(ratio, advantages, clip_low, clip_high)
    fractions = {
        "clipfrac": clipped_low | clipped_high,
        "clipfrac_low": clipped_low,
        "clipfrac_high": clipped_high,
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
        fractions["dual_clipfrac"] = dual_clipped
    return _masked_loss(loss, mask), _ratio_metrics(ratio, mask, **fractions)


@POLICY_LOSSES.register("cispo")
def cispo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 1e9,
    clip_high: float = 0.28,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight (MiniMax-M1, arXiv:2506.13585).

    loss_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * log pi_theta_t   [B,T].
    Unlike PPO, a clipped token keeps its gradient (only its weight is capped), so rare tokens whose
    probability jumps still learn. Defaults: ``clip_low = 1e9`` disables the lower bound as in the
    paper; the paper tunes only the upper bound and publishes no value, so ``clip_high = 0.28``
    reuses DAPO's clip-higher bound as a conservative cap on the weight.
    """
    mask = _mask_like(loss_mask, logprobs)
    logprobs, old_logprobs = _zero_off_mask(mask, logprobs, old_logprobs)
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, log_ratio_clamp))
    weight = ratio.clamp(min=1.0 - clip_low, max=1.0 + clip_high).detach()
    loss = -weight * advantages * logprobs
    below = ratio < 1.0 - clip_low
    above = ratio > 1.0 + clip_high
    metrics = _ratio_metrics(ratio, mask, clipfrac=below | above, clipfrac_low=below, clipfrac_high=above)
    return _masked_loss(loss, mask), metrics


@POLICY_LOSSES.register("sapo")
def sapo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """SAPO: a smooth sigmoid gate instead of a hard clip (Gao et al. 2025, arXiv:2511.20347).

    loss_t = -f(r_t) A_t,  f(r) = sigmoid(tau (r - 1)) * 4 / tau,  tau = tau_pos if A_t > 0 else tau_neg.
    f'(1) = 1, so on-policy the gradient is the plain policy gradient; away from r = 1 the gradient
    weight 4 sigma (1 - sigma) decays smoothly, faster for negative advantages (tau_neg > tau_pos,
    the paper's defaults 1.0 and 1.05). Metric ``soft_gate_mean`` is the mean of that weight;
    ``clipfrac`` is 0 (no hard clip).
    """
    mask = _mask_like(loss_mask, logprobs)
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, log_ratio_clamp))
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = -gate * (4.0 / tau) * advantages
    metrics = _ratio_metrics(ratio, mask)
    metrics["soft_gate_mean"] = masked_mean((4.0 * gate * (1.0 - gate)).detach(), mask)
    return _masked_loss(loss, mask), metrics


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    is_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """REINFORCE per token (Williams 1992): loss_t = -A_t * log pi_theta_t   [B,T].

    With ``is_clip`` set, each token is weighted by the truncated importance weight
    sg(min(r_t, is_clip)) to correct for samples drawn by an older policy (truncated IS as in
    IMPALA's V-trace, Espeholt et al. 2018); ``clipfrac`` is then the fraction truncated.
    """
    mask = _mask_like(loss_mask, logprobs)
    logprobs, old_logprobs = _zero_off_mask(mask, logprobs, old_logprobs)
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, log_ratio_clamp))
    loss = -advantages * logprobs
    if is_clip is None:
        return _masked_loss(loss, mask), _ratio_metrics(ratio, mask)
    loss = ratio.clamp(max=is_clip).detach() * loss
    return _masked_loss(loss, mask), _ratio_metrics(ratio, mask, clipfrac=ratio > is_clip)


@POLICY_LOSSES.register("kimi")
def kimi(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    tau: float = 1.0,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """Kimi's mirror-descent squared loss, per token (Kimi k1.5, arXiv:2501.12599, Sec. 2.3.2; K2).

    The KL-regularised update pi* ∝ pi_old exp(r / tau) implies r - tau log Z = tau log(pi*/pi_old);
    k1.5 regresses that identity with a squared loss, the mean group reward standing in for
    tau log Z. Written per token with A_t = r - mean(r):

        loss_t = 0.5 * (A_t - tau * log(pi_theta_t / pi_old_t))^2   [B,T].

    Its gradient is -tau (A_t - tau log r_t) grad log pi_t: at r = 1 the policy gradient scaled by
    tau, with a pull back towards pi_old growing with |log r|. (k1.5's stated gradient is this one
    divided by tau, i.e. the same direction.) The papers give no value for tau; 1.0 makes the
    on-policy gradient equal to the plain policy gradient.
    """
    mask = _mask_like(loss_mask, logprobs)
    log_ratio = _log_ratio(logprobs, old_logprobs, log_ratio_clamp)
    loss = 0.5 * (advantages - tau * log_ratio) ** 2
    return _masked_loss(loss, mask), _ratio_metrics(torch.exp(log_ratio), mask)


# ----------------------------------------------------------------------------- sequence-level ratio


@POLICY_LOSSES.register("gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """GSPO: one length-normalised importance ratio per sequence (Zheng et al. 2025, arXiv:2507.18071).

    s_i = exp(mean_t log(pi_theta / pi_old)) over row i's trainable tokens,
    loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), broadcast to the row's
    trainable tokens [B,T]. A_i is the masked row mean of ``advantages`` (equal to the row's value
    for group estimators). Defaults are the paper's (3e-4, 4e-4). Metrics count tokens, so a
    clipped sequence contributes all its tokens to ``clipfrac``.
    """
    mask = _mask_like(loss_mask, logprobs)
    seq_ratio = torch.exp(_row_mean(_log_ratio(logprobs, old_logprobs, log_ratio_clamp), mask))
    seq_advantage = _row_mean(advantages, mask)
    seq_loss, clipped_low, clipped_high = _clipped_surrogate(seq_ratio, seq_advantage, clip_low, clip_high)
    per_token = seq_ratio.unsqueeze(-1).expand_as(mask)
    metrics = _ratio_metrics(
        per_token,
        mask,
        clipfrac=(clipped_low | clipped_high).unsqueeze(-1).expand_as(mask),
        clipfrac_low=clipped_low.unsqueeze(-1).expand_as(mask),
        clipfrac_high=clipped_high.unsqueeze(-1).expand_as(mask),
    )
    return _broadcast_rows(seq_loss, mask), metrics


@POLICY_LOSSES.register("gspo_token")
def gspo_token(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """GSPO-token: GSPO with per-token advantages (Zheng et al. 2025, arXiv:2507.18071).

    s_{i,t} = sg[s_i] * pi_theta_t / sg[pi_theta_t]: numerically s_i, but its gradient flows through
    token t alone, so each token can carry its own advantage A_{i,t}:
    loss_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - clip_low, 1 + clip_high) A_{i,t})   [B,T].
    With advantages constant along a row, values equal gspo's and so do the gradients of any
    aggregation that weights a row's tokens equally.
    """
    mask = _mask_like(loss_mask, logprobs)
    logprobs, old_logprobs = _zero_off_mask(mask, logprobs, old_logprobs)
    seq_log_ratio = _row_mean(_log_ratio(logprobs, old_logprobs, log_ratio_clamp), mask).detach()
    # exp(lp - sg(lp)) == 1 in value but carries d log pi_t into the gradient.
    token_ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + logprobs - logprobs.detach())
    loss, clipped_low, clipped_high = _clipped_surrogate(token_ratio, advantages, clip_low, clip_high)
    metrics = _ratio_metrics(
        token_ratio,
        mask,
        clipfrac=clipped_low | clipped_high,
        clipfrac_low=clipped_low,
        clipfrac_high=clipped_high,
    )
    return _masked_loss(loss, mask), metrics


@POLICY_LOSSES.register("gmpo")
def gmpo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """GMPO: geometric mean of token-level clipped ratios (Zhao et al. 2025, arXiv:2507.20673).

    With sigma_i = sgn(A_i) and the clip taken in log space,
        objective_i = A_i * exp( mean_t [ sigma_i * min(sigma_i log r_t, sigma_i clip(log r_t, -clip_low,
                                                                                      clip_high)) ] ),
    i.e. the geometric mean of PPO-style pessimistically clipped token ratios; loss_i = -objective_i
    broadcast to the row's trainable tokens [B,T]. A_i is the masked row mean of ``advantages``.
    Defaults (0.4, 0.4) are the paper's clip range (e^-0.4, e^0.4).
    """
    mask = _mask_like(loss_mask, logprobs)
    log_ratio = _log_ratio(logprobs, old_logprobs, log_ratio_clamp)
    seq_advantage = _row_mean(advantages, mask)
    sign = torch.sign(seq_advantage).unsqueeze(-1)
    clipped_log_ratio = log_ratio.clamp(min=-clip_low, max=clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped_log_ratio)
    objective = seq_advantage * torch.exp(_row_mean(pessimistic, mask))
    clipped_low = (sign < 0) & (log_ratio < -clip_low)
    clipped_high = (sign > 0) & (log_ratio > clip_high)
    metrics = _ratio_metrics(
        torch.exp(log_ratio),
        mask,
        clipfrac=clipped_low | clipped_high,
        clipfrac_low=clipped_low,
        clipfrac_high=clipped_high,
    )
    return _broadcast_rows(-objective, mask), metrics
