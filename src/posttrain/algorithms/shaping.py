"""Reward shaping and batch filtering from DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale")."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(
    response_lengths: Tensor,
    *,
    max_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO soft overlong punishment, added to the reward of each response: ``[batch] -> [batch]``.

    With L the response length, L_max = ``max_length`` and L_cache = ``buffer_length``::

        0                                        if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache * factor if L_max - L_cache < L <= L_max
        -factor                                  if L > L_max

    The penalty ramps linearly from 0 to -factor across the buffer, so the policy learns to stop
    before truncation without a cliff at the limit.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length <= max_length, got {buffer_length=}, {max_length=}")
    lengths = response_lengths.to(torch.promote_types(response_lengths.dtype, torch.float32))
    expected = max_length - buffer_length
    ramp = (expected - lengths) / buffer_length * penalty_factor
    penalty = torch.where(lengths <= max_length, ramp, torch.full_like(lengths, -penalty_factor))
    return torch.where(lengths <= expected, torch.zeros_like(lengths), penalty)


def dynamic_sampling_keep(scores: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: keep only groups whose scores are not all equal. ``[N] -> bool [N]``.

    A group (responses to one prompt) whose responses all score the same (accuracy 0 or 1) has zero
    group-relative advantage everywhere and contributes no gradient; DAPO drops such groups and
    samples more prompts until the batch is full. A group of one response is always dropped.
    """
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max().item()) + 1
    values = scores.to(torch.promote_types(scores.dtype, torch.float32))
    group_max = values.new_full((num_groups,), float("-inf")).scatter_reduce(0, index, values, "amax")
    group_min = values.new_full((num_groups,), float("inf")).scatter_reduce(0, index, values, "amin")
    return (group_max != group_min)[index]
