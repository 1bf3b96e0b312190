"""The step's off-policy corrections (``algo.rollout_correction``): importance weights of the
trainer's log-probs over the sampler's, and DeepSeek-V3.2's off-policy sequence mask. The formulas
are ``algorithms/corrections.py``'s; this applies them to a step's ``Batch``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.algorithms.corrections import off_policy_sequence_mask, rollout_correction
from posttrain.data.batch import Batch

if TYPE_CHECKING:
    from posttrain.train.step import TrainState


def correction_weights(state: TrainState, batch: Batch) -> dict[str, float]:
    """``algo.rollout_correction``: per-token importance weights of the trainer's log-probs (before
    the update) over the sampler's, times their keep mask, into ``batch.correction_weights``; the
    policy loss of each token is multiplied by them (Yao et al. 2025, truncated / masked IS)."""
    correction = state.config.algo.rollout_correction
    if correction is None or correction.mode == "none":
        return {}
    assert batch.old_logprobs is not None
    weights, keep, metrics = rollout_correction(
        batch.old_logprobs,
        batch.rollout_logprobs,
        batch.loss_mask,
        level=correction.level,
        mode=correction.mode,
        threshold=correction.threshold,
        lower=correction.lower,
    )
    batch.correction_weights = weights * keep
    return {f"correction/{name}": float(value) for name, value in metrics.items()}


def corrected(
    state: TrainState, per_token: torch.Tensor, logprobs: torch.Tensor, micro: Batch
) -> torch.Tensor:
    """The per-token policy loss ``[batch, time]`` times ``algo.rollout_correction``'s importance
    weights, and its DeepSeek-V3.2 off-policy sequence mask (against the sampler's log-probs)."""
    correction = state.config.algo.rollout_correction
    if correction is None:
        return per_token
    if micro.correction_weights is not None:
        per_token = per_token * micro.correction_weights
    if correction.sequence_mask_delta is not None:
        assert micro.advantages is not None
        keep = off_policy_sequence_mask(
            logprobs.detach(),
            micro.rollout_logprobs,
            micro.advantages,
            micro.loss_mask,
            delta=correction.sequence_mask_delta,
        )
        per_token = per_token * keep
    return per_token
