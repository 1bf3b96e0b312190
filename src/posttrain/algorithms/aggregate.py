"""Aggregation: how a per-token loss ``[batch, time]`` becomes the scalar that is minimised.

The normalisers (token counts, sequence counts, episode counts) are computed ONCE over the whole
optimizer-step batch and folded into a weights tensor ``[batch, time]``:

    weights = token_weights(loss_mask, mode, ...)        # once per optimizer step
    loss_mb = aggregate(per_token_loss_mb, weights[mb])  # for each micro-batch ``mb`` of rows

Because ``aggregate`` is a plain weighted sum, the micro-batch losses add up to the full-batch
loss exactly, and so do their gradients: gradient accumulation is exact whatever the split.

Data parallel: each rank holds a slice of the rows. Compute the counts of ``aggregation_counts`` on
every rank, all-reduce (sum) them, and pass them as ``num_tokens`` / ``num_sequences`` /
``num_episodes``; the per-rank losses then sum to the global loss. Frameworks that *average*
gradients over ranks (DDP, FSDP) need the loss multiplied by the world size. For ``episode-mean``
all rows of an episode must sit on the same rank, since the per-episode token count is local.

Rows with no trainable token and empty batches get weight 0 (never NaN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms.registry import AGGREGATIONS

Count = float | int | Tensor


def _float_mask(loss_mask: Tensor) -> Tensor:
    return loss_mask if loss_mask.is_floating_point() else loss_mask.to(torch.float32)


def _as_count(value: Count, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where the denominator is not positive (nothing to count)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


def _num_sequences(mask: Tensor, override: Count | None) -> Tensor:
    """N_seq: rows with at least one trainable token (or the caller's global count)."""
    if override is not None:
        return _as_count(override, mask)
    return (mask.sum(dim=-1) > 0).sum().to(mask.dtype)


def _episode_index(episode_ids: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """Dense episode index ``[batch]`` in ``0..E-1``; without ids every row is its own episode."""
    if episode_ids is None:
        return torch.arange(batch_size, device=device)
    _, inverse = torch.unique(episode_ids, return_inverse=True)
    return inverse.to(device)


def _episode_token_counts(mask: Tensor, episode_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """(trainable tokens of each episode ``[E]``, dense episode index of each row ``[batch]``)."""
    index = _episode_index(episode_ids, mask.shape[0], mask.device)
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    tokens = mask.new_zeros(num_groups).index_add_(0, index, mask.sum(dim=-1))
    return tokens, index


def aggregation_counts(loss_mask: Tensor, episode_ids: Tensor | None = None) -> dict[str, Tensor]:
    """The batch counts the aggregations normalise by (all-reduce them for data parallel).

    Returns ``num_tokens`` (trainable tokens), ``num_sequences`` (rows with a trainable token) and
    ``num_episodes`` (episodes with a trainable token; rows without ``episode_ids`` are their own).
    """
    mask = _float_mask(loss_mask)
    episode_tokens, _ = _episode_token_counts(mask, episode_ids)
    return {
        "num_tokens": mask.sum(),
        "num_sequences": _num_sequences(mask, None),
        "num_episodes": (episode_tokens > 0).sum().to(mask.dtype),
    }


@AGGREGATIONS.register("token-mean")
def token_mean_weights(loss_mask: Tensor, *, num_tokens: Count | None = None) -> Tensor:
    """w = m / sum(m): every trainable token in the batch counts equally (DAPO, Yu et al. 2025)."""
    mask = _float_mask(loss_mask)
    total = mask.sum() if num_tokens is None else _as_count(num_tokens, mask)
    return _safe_divide(mask, total)


@AGGREGATIONS.register("token-sum")
def token_sum_weights(loss_mask: Tensor) -> Tensor:
    """w = m: the plain sum over trainable tokens (no normaliser)."""
    return _float_mask(loss_mask).clone()


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean_weights(loss_mask: Tensor, *, num_sequences: Count | None = None) -> Tensor:
    """w_bt = m_bt / sum_t(m_bt) / N_seq: mean over each row, then over rows (GRPO, Shao et al. 2024)."""
    mask = _float_mask(loss_mask)
    per_row = _safe_divide(mask, mask.sum(dim=-1, keepdim=True))
    return _safe_divide(per_row, _num_sequences(mask, num_sequences))


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum_weights(loss_mask: Tensor, *, num_sequences: Count | None = None) -> Tensor:
    """w = m / N_seq: sum over each row, mean over rows."""
    mask = _float_mask(loss_mask)
    return _safe_divide(mask, _num_sequences(mask, num_sequences))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm_weights(
    loss_mask: Tensor, *, constant: float | None = None, num_sequences: Count | None = None
) -> Tensor:
    """w = m / (N_seq * constant): Dr.GRPO's length-unbiased constant normaliser (Liu et al. 2025).

    ``constant`` is fixed for the run (e.g. the maximum response length), so a row's weight no
    longer depends on its own length.
    """
    if constant is None or not constant > 0:
        raise ValueError(
            f"aggregation 'seq-mean-token-sum-norm' needs a positive `constant` "
            f"(e.g. the maximum response length), got {constant!r}"
        )
    mask = _float_mask(loss_mask)
    return _safe_divide(mask, _num_sequences(mask, num_sequences) * constant)


@AGGREGATIONS.register("episode-mean")
def episode_mean_weights(
    loss_mask: Tensor, *, episode_ids: Tensor | None = None, num_episodes: Count | None = None
) -> Tensor:
    """w_bt = m_bt / (trainable tokens of b's episode) / N_episodes.

    Token mean inside each episode over all its rows (sub-traces after compaction), then a mean
    over episodes: an episode weighs 1 / N_episodes however many sub-traces it was cut into.
    ``episode_ids`` is ``[batch]``; without it every row is its own episode.
    """
    mask = _float_mask(loss_mask)
    episode_tokens, index = _episode_token_counts(mask, episode_ids)
    count = (episode_tokens > 0).sum().to(mask.dtype) if num_episodes is None else num_episodes
    per_episode = _safe_divide(mask, episode_tokens[index].unsqueeze(-1))
    return _safe_divide(per_episode, _as_count(count, mask))


def token_weights(
    loss_mask: Tensor,
    mode: str,
    *,
    episode_ids: Tensor | None = None,
    constant: float | None = None,
    num_tokens: Count | None = None,
    num_sequences: Count | None = None,
    num_episodes: Count | None = None,
) -> Tensor:
    """Aggregation weights ``[batch, time]`` for the whole optimizer-step batch, 0 where masked.

    ``mode`` names a function of ``AGGREGATIONS``. ``num_*`` replace the counts taken from this
    batch (pass all-reduced counts under data parallel). Each mode receives only the arguments it
    names, so a caller may always pass ``episode_ids`` and ``constant`` whatever the mode.
    """
    fields = {
        "loss_mask": loss_mask,
        "episode_ids": episode_ids,
        "constant": constant,
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "num_episodes": num_episodes,
    }
    weights: Tensor = AGGREGATIONS.call(mode, {k: v for k, v in fields.items() if v is not None})
    return weights


def aggregate(per_token_loss: Tensor, weights: Tensor) -> Tensor:
    """sum_bt(per_token_loss_bt * weights_bt): a scalar.

    Positions with weight 0 contribute exactly 0 even if the loss there is inf or NaN (padding).
    """
    weighted = torch.where(weights != 0, per_token_loss * weights, 0.0)
    return weighted.sum()


def aggregate_loss(per_token_loss: Tensor, loss_mask: Tensor, mode: str, **kwargs: Any) -> Tensor:
    """aggregate(per_token_loss, token_weights(loss_mask, mode, **kwargs)) for a whole batch."""
    return aggregate(per_token_loss, token_weights(loss_mask, mode, **kwargs))
