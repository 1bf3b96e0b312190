"""Batch: padded ``[batch, time]`` tensors built from Episodes, and its mini-batch views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from posttrain.data.trace import Episode


@dataclass
class Batch:
    """Right-padded tensors for one training step.

    Per token ``[batch, time]``: ``input_ids``, ``attention_mask``, ``loss_mask``,
    ``rollout_logprobs`` (sampler), ``token_rewards``; filled later by the trainer: ``old_logprobs``
    (policy before the update), ``ref_logprobs``, ``values``, ``advantages``, ``returns``,
    ``loss_weights`` / ``value_weights`` (aggregation weights computed over a whole optimizer-step
    batch), ``teacher_logprobs`` (on-policy distillation: log-prob of each sampled token under the
    row's teacher, 0 off the mask), ``correction_weights`` (``algo.rollout_correction``: the
    importance weight of the trainer's over the sampler's log-probs, times its keep mask);
    ``keep_ids`` ``[batch, time, K]`` (``rollout.keep_sampling_mask``: the tokens the top-k / top-p
    sampler kept for each token's prediction, -1 padded). Per row ``[batch]``: ``group_ids``, ``episode_ids``,
    ``segment_index``, ``ended``, ``bootstrap_values`` (V after the row's last token, for sub-traces
    cut off mid-episode).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    rollout_logprobs: Tensor
    token_rewards: Tensor
    group_ids: Tensor
    episode_ids: Tensor
    segment_index: Tensor
    ended: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    loss_weights: Tensor | None = None
    value_weights: Tensor | None = None
    bootstrap_values: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    correction_weights: Tensor | None = None
    keep_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def as_dict(self) -> dict[str, Any]:
        """Field name -> tensor for the fields that are set (for ``Registry.call``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, rows: Tensor | Sequence[int]) -> Batch:
        """The rows ``rows`` of every tensor, with trailing all-padding columns trimmed."""
        index = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[index].sum(dim=1).max().item()) if len(index) else 0
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif value.dim() >= 2:
                picked[f.name] = value[index, :width]
            else:
                picked[f.name] = value[index]
        return replace(self, **picked)

    def weightless(self) -> Batch:
        """These rows with zero aggregation weights: a forward/backward that moves nothing (a rank
        with fewer micro-batches than another runs these, as collective forwards must match)."""
        zero = {
            name: torch.zeros_like(value)
            for name in ("loss_weights", "value_weights")
            if (value := getattr(self, name)) is not None
        }
        return replace(self, **zero)


def collate_episodes(episodes: Sequence[Episode], pad_token_id: int) -> Batch:
    """Pad every sub-trace of every episode into one Batch (one row per trace, right padding).

    The episode's outcome reward is added on the last trainable token of its last sub-trace, on top
    of the traces' own per-token rewards; an episode with no trainable token keeps its outcome reward
    nowhere (it cannot be credited).
    """
    # one row per sub-trace, each episode's sub-traces in segment order
    per_episode = [sorted(episode.traces, key=lambda t: t.segment_index) for episode in episodes]
    ordered = [trace for traces in per_episode for trace in traces]
    if not ordered:
        raise ValueError("cannot build a batch from zero traces")
    width = max(len(t.tokens) for t in ordered)
    rows = len(ordered)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width))
    rollout_logprobs = torch.zeros((rows, width))
    token_rewards = torch.zeros((rows, width))
    row = 0
    for episode, traces in zip(episodes, per_episode, strict=True):
        last_action: tuple[int, int] | None = None
        for trace in traces:
            n = len(trace.tokens)
            input_ids[row, :n] = torch.tensor(trace.tokens, dtype=torch.long)
            attention_mask[row, :n] = 1
            loss_mask[row, :n] = torch.tensor(trace.loss_mask, dtype=torch.float32)
            rollout_logprobs[row, :n] = torch.tensor(trace.rollout_logprobs, dtype=torch.float32)
            if trace.token_rewards is not None:
                token_rewards[row, :n] = torch.tensor(trace.token_rewards, dtype=torch.float32)
            actions = [i for i, m in enumerate(trace.loss_mask) if m]
            if actions:
                last_action = (row, actions[-1])
            row += 1
        if last_action is not None:
            token_rewards[last_action] += float(episode.reward)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logprobs=rollout_logprobs,
        token_rewards=token_rewards,
        group_ids=torch.tensor([t.group_id for t in ordered], dtype=torch.long),
        episode_ids=torch.tensor([t.episode_id for t in ordered], dtype=torch.long),
        segment_index=torch.tensor([t.segment_index for t in ordered], dtype=torch.long),
        ended=torch.tensor([t.ended for t in ordered], dtype=torch.bool),
    )


def micro_batches(attention_mask: Tensor, size: int) -> list[Tensor]:
    """Row indices of micro-batches of at most ``size`` rows, longest rows first.

    Rows are grouped by length (``attention_mask``: ``[batch, time]``) so each micro-batch, trimmed
    by ``Batch.select``, is padded only to its own longest row. The mini-batch's gradient is their
    sum whatever the grouping; when one micro-batch holds every row, the rows keep their order.
    """
    rows = int(attention_mask.shape[0])
    if size >= rows:
        return [torch.arange(rows)]
    order = torch.argsort(attention_mask.sum(dim=1), descending=True, stable=True)
    return list(order.split(size))


def mini_batches(episode_ids: Tensor, num_mini_batches: int, generator: torch.Generator) -> list[Tensor]:
    """Row indices of ``num_mini_batches`` random mini-batches that never split an episode.

    Episodes (not rows) are shuffled and split into near-equal parts; each part holds every row
    (sub-trace) of its episodes, so GAE chaining and episode-mean aggregation see whole episodes.
    ``episode_ids`` is ``[batch]``; the result is a list of int64 row-index tensors.
    """
    episodes, episode_of_row = torch.unique(episode_ids, return_inverse=True)
    num_episodes = int(episodes.numel())
    if not 1 <= num_mini_batches <= num_episodes:
        raise ValueError(
            f"num_mini_batches must be in [1, {num_episodes}] (episodes), got {num_mini_batches}"
        )
    order = torch.randperm(num_episodes, generator=generator)
    # tensor_split, unlike chunk, always gives exactly num_mini_batches parts (sizes differ by <= 1)
    parts = torch.tensor_split(order, num_mini_batches)
    return [torch.nonzero(torch.isin(episode_of_row, part)).flatten() for part in parts]
