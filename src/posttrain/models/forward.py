"""Per-token log-probabilities (and entropies) of a causal LM, aligned to token positions.

Alignment (docs/interfaces.md): ``logprobs[b, t] = log pi(tokens[b, t] | tokens[b, :t])``; the
value is 0 at ``t = 0``, at padding, and at the first real token of a left-padded row (it has no
context either). Position ids are rebuilt from the attention mask, so a row gives the same
per-token values whether the batch is left- or right-padded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each token counted over real tokens only: ``cumsum(mask) - 1`` clamped at 0.

    ``attention_mask``: ``[batch, time]`` (1 = real token). Returns int64 ``[batch, time]``; the
    first real token of every row has position 0 whatever the padding side. Rotary models are
    invariant to a per-row offset anyway; models with learned absolute positions (GPT-2) are not.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def predicted_token_mask(attention_mask: Tensor) -> Tensor:
    """1 where token t is real and was predicted from a real token t-1, else 0.

    ``attention_mask``: ``[batch, time]``. Returns bool ``[batch, time]``; column 0 is always False.
    These are the positions where a next-token distribution exists, so logprobs, entropies and
    values are defined there and 0 elsewhere.
    """
    real = attention_mask.bool()
    predicted = torch.zeros_like(real)
    predicted[:, 1:] = real[:, 1:] & real[:, :-1]
    return predicted


def shift_to_tokens(per_prediction: Tensor, attention_mask: Tensor) -> Tensor:
    """Move a ``[batch, time-1]`` quantity computed from positions ``0..T-2`` to the token it predicts.

    Output ``[batch, time]``: ``out[:, t] = per_prediction[:, t-1]`` where ``predicted_token_mask`` is
    set, 0 elsewhere (``torch.where`` so a non-finite value at padding cannot leak through).
    """
    shifted = torch.zeros(
        per_prediction.shape[0],
        per_prediction.shape[1] + 1,
        dtype=per_prediction.dtype,
        device=per_prediction.device,
    )
    shifted[:, 1:] = per_prediction
    return torch.where(predicted_token_mask(attention_mask), shifted, torch.zeros_like(shifted))


def causal_lm_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, logits_to_keep: int = 0
) -> Tensor:
    """Logits of a HF causal LM with position ids taken from the mask: ``[batch, time, vocab]``, or
    ``[batch, logits_to_keep, vocab]`` for the last positions only (0 = all; HF's own argument)."""
    extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **extra,
    )
    return outputs.logits


def logprobs_from_logits(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    keep_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Aligned token logprobs (and entropies) from logits.

    ``logits``: ``[batch, time, vocab]``, or the last ``L <= time`` positions only (as HF's
    ``logits_to_keep`` gives them: the values are then 0 at the first ``time - L + 1`` tokens);
    ``input_ids``, ``attention_mask``: ``[batch, time]``. With ``z = logits[:, t-1] / temperature``:
    ``logprobs[:, t] = z[input_ids[:, t]] - logsumexp(z)`` and
    ``entropy[:, t] = logsumexp(z) - sum_v softmax(z)_v z_v`` (``prediction_logprobs``). Both
    float32 ``[batch, time]``. ``keep_ids`` ``[batch, time, K]``: the sampler's kept tokens for
    each token's prediction (``sampling_support``); the log-probs are then those of the truncated
    distribution.
    """
    skipped = input_ids.shape[1] - logits.shape[1]  # positions whose logits were not computed
    logprobs, entropy = prediction_logprobs(
        logits[:, :-1],
        input_ids[:, skipped + 1 :],
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        keep_ids=None if keep_ids is None else keep_ids[:, skipped + 1 :],
    )
    logprobs = shift_to_tokens(_left_pad(logprobs, skipped), attention_mask)
    if entropy is None:
        return logprobs, None
    return logprobs, shift_to_tokens(_left_pad(entropy, skipped), attention_mask)


def prediction_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    keep_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log-prob of each ``targets[b, i]`` under ``logits[b, i]`` (the logits that predict it), and the
    entropy of that distribution: ``[batch, n]`` each, from ``logits`` ``[batch, n, vocab]``.

    With ``z = logits / temperature``: ``logprob = z[target] - logsumexp(z)``,
    ``entropy = logsumexp(z) - sum_v softmax(z)_v z_v``. The gather - logsumexp form avoids keeping a
    full ``log_softmax`` tensor; ``entropy_grad=False`` computes the entropy as a metric only.

    ``keep_ids`` ``[batch, n, K]`` (-1 = none): the token set a top-k / top-p sampler kept; the
    log-prob is then of the distribution truncated to it (DeepSeek-AI 2025, arXiv:2512.02556, "keep
    sampling mask"): ``z[target] - logsumexp(z[keep_ids U {target}])``. The entropy stays the full
    distribution's (a metric and a bonus, not part of the ratio).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    scaled = logits.float() / temperature
    target_logits = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if keep_ids is None:
        log_normaliser = torch.logsumexp(scaled, dim=-1)
    else:
        log_normaliser = _kept_log_normaliser(scaled, keep_ids, targets, target_logits)
    logprobs = target_logits - log_normaliser
    if keep_ids is not None:
        log_normaliser = torch.logsumexp(scaled, dim=-1)  # the entropy below is the full one
    if not with_entropy:
        return logprobs, None
    source, normaliser = (
        (scaled, log_normaliser) if entropy_grad else (scaled.detach(), log_normaliser.detach())
    )
    expected_logit = (torch.softmax(source, dim=-1) * source).sum(dim=-1)
    return logprobs, normaliser - expected_logit


def _kept_log_normaliser(scaled: Tensor, keep_ids: Tensor, targets: Tensor, target_logits: Tensor) -> Tensor:
    """logsumexp of ``scaled`` over ``keep_ids`` and the target (counted once): ``[batch, n]``."""
    kept = scaled.gather(-1, keep_ids.clamp(min=0))
    counted = (keep_ids >= 0) & (keep_ids != targets.unsqueeze(-1))  # the target is added below
    kept = torch.where(counted, kept, torch.full_like(kept, float("-inf")))
    return torch.logsumexp(torch.cat([kept, target_logits.unsqueeze(-1)], dim=-1), dim=-1)


def sampling_support(scaled: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The tokens a top-k then top-p sampler keeps from the tempered logits ``scaled``
    ``[..., vocab]``, as transformers' warpers do (top-k: the k largest; top-p: the most likely
    tokens until their probability reaches ``top_p``, at least one): ids ``[..., K]`` by
    decreasing probability, -1 past each set's end, K the largest set."""
    order = torch.argsort(scaled, dim=-1, descending=True, stable=True)
    sorted_logits = scaled.gather(-1, order)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k > 0:
        keep[..., top_k:] = False
    if top_p < 1.0:
        masked = torch.where(keep, sorted_logits, torch.full_like(sorted_logits, float("-inf")))
        probs = torch.softmax(masked, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ahead of each one
        keep &= before < top_p
    width = max(int(keep.sum(dim=-1).max()), 1) if keep.numel() else 1
    return torch.where(keep, order, torch.full_like(order, -1))[..., :width]


def support_of_tokens(
    logits: Tensor, input_ids: Tensor, *, temperature: float, top_k: int, top_p: float
) -> Tensor:
    """``sampling_support`` of the distribution predicting each token, aligned like
    ``logprobs_from_logits``: ``[batch, time, K]``, -1 where no prediction exists. ``logits``:
    ``[batch, time, vocab]`` or the last positions only."""
    skipped = input_ids.shape[1] - logits.shape[1]
    support = sampling_support(logits[:, :-1].float() / temperature, top_k=top_k, top_p=top_p)
    aligned = torch.full((input_ids.shape[0], input_ids.shape[1], support.shape[-1]), -1, dtype=torch.long)
    aligned[:, skipped + 1 :] = support
    return aligned


def _left_pad(per_prediction: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(per_prediction, (width, 0)) if width else per_prediction


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    from_position: int = 0,
    keep_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log pi(token_t | tokens_<t) of ``model`` (and optionally the entropy of that distribution).

    ``input_ids``, ``attention_mask``: ``[batch, time]`` (left or right padding). Returns float32
    ``(logprobs [batch, time], entropy [batch, time] | None)``, 0 at t = 0 and at padding.
    ``from_position``: only tokens at ``t >= from_position`` are wanted (e.g. the first action,
    the batch's first action, as ``ActionForward`` in ``models/prefix.py`` passes); the LM head
    then skips the positions before, whose values are returned as 0. Gradients flow to the model; wrap in ``torch.no_grad()`` for
    behaviour / reference passes. ``keep_ids`` ``[batch, time, K]``: log-probs of the distribution
    truncated to the sampler's kept tokens (``prediction_logprobs``).
    """
    logits = _logits_from(model, input_ids, attention_mask, temperature, from_position)
    return logprobs_from_logits(
        logits,
        input_ids,
        attention_mask,
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        keep_ids=keep_ids,
    )


def truncated_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    from_position: int = 0,
) -> tuple[Tensor, Tensor]:
    """``token_logprobs`` of the distribution a top-k / top-p sampler draws from: the tokens it keeps
    are found from ``model``'s own logits (``support_of_tokens``) and the log-probs renormalised
    over them. Returns ``(logprobs [batch, time], keep_ids [batch, time, K])``; pass ``keep_ids``
    to ``token_logprobs`` to apply the same truncation to another model (the updated policy)."""
    logits = _logits_from(model, input_ids, attention_mask, temperature, from_position)
    keep_ids = support_of_tokens(logits, input_ids, temperature=temperature, top_k=top_k, top_p=top_p)
    logprobs, _ = logprobs_from_logits(
        logits, input_ids, attention_mask, temperature=temperature, keep_ids=keep_ids
    )
    return logprobs, keep_ids


def _logits_from(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float, from_position: int
) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    # the logits at position t - 1 predict token t
    keep = max(input_ids.shape[1] - from_position + 1, 1) if from_position > 1 else 0
    return causal_lm_logits(model, input_ids, attention_mask, logits_to_keep=keep)
