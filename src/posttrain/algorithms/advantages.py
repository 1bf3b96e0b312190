"""Advantage estimators: where the learning signal of every algorithm comes from.

Every estimator has the contract

    fn(token_rewards, loss_mask, *, <batch fields it uses>, <hyper-parameters>)
        -> (advantages [batch, time], returns [batch, time])

with both outputs exactly 0 where ``loss_mask == 0`` and detached from autograd. Batch fields are
``values`` / ``token_rewards`` / ``loss_mask`` ``[batch, time]`` float, ``bootstrap_values`` ``[batch]``
float and ``group_ids`` / ``episode_ids`` / ``segment_index`` ``[batch]`` int64; call them by name
through ``ADVANTAGES.call(name, data, hparams)``.

Two families:

* token-level estimators (``gae``, ``reinforce_pp``) run a reverse discounted scan over the trainable
  tokens only: tool and environment tokens are skipped (the running value carries across them), a
  reward on a skipped token is credited to the closest preceding trainable token, and the sub-traces
  (segments) of one episode are chained in ``segment_index`` order into one sequence;
* group estimators (``grpo``, ``rloo``, ``reinforce_pp_baseline``, ``grpo_passk``, ``opo``) score each
  episode by the sum of its rewards over all its rows, compare it with the other episodes of its
  group (same prompt) and broadcast the episode's advantage to every trainable token of every row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_whiten
from posttrain.algorithms.registry import ADVANTAGES

GRPO_SCALES = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------------
# Token-level pieces: chaining segments, compacting trainable tokens, the reverse discounted scan.
# ---------------------------------------------------------------------------------------------------


def _chain_layout(
    episode_ids: Tensor | None, segment_index: Tensor | None, batch_size: int, device: torch.device
) -> Tensor:
    """Row index of segment k of chain c as a ``[chains, max_segments]`` int64 tensor, -1 = no row.

    Without ids every row is its own chain. With ids, rows of one episode form one chain ordered by
    ``segment_index``.
    """
    if episode_ids is None and segment_index is None:
        return torch.arange(batch_size, device=device).unsqueeze(1)
    if episode_ids is None or segment_index is None:
        raise ValueError("segment chaining needs both episode_ids and segment_index (or neither)")
    _, chain_of_row = torch.unique(episode_ids, return_inverse=True)
    # Order rows by (chain, segment): a stable sort on the minor key, then on the major key.
    order = torch.argsort(segment_index, stable=True)
    order = order[torch.argsort(chain_of_row[order], stable=True)]
    sorted_chain, sorted_segment = chain_of_row[order], segment_index[order]
    same = (sorted_chain[1:] == sorted_chain[:-1]) & (sorted_segment[1:] == sorted_segment[:-1])
    if bool(same.any()):
        raise ValueError("two rows share the same (episode_ids, segment_index)")
    counts = torch.bincount(chain_of_row)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(batch_size, device=device) - starts[sorted_chain]
    layout = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=device)
    layout[sorted_chain, rank] = order
    return layout


def _rows_to_chains(rows: Tensor, layout: Tensor) -> Tensor:
    """``[batch, time]`` -> ``[chains, max_segments * time]``: segments laid end to end, zero padded."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # row -1 reads the zero row
    return padded[layout].reshape(layout.shape[0], -1)


def _chains_to_rows(chains: Tensor, layout: Tensor, time: int) -> Tensor:
    """Inverse of ``_rows_to_chains``: ``[chains, max_segments * time]`` -> ``[batch, time]``."""
    batch = int((layout >= 0).sum())
    out = chains.new_zeros(batch + 1, time)  # padding slots land in the extra row, then dropped
    out[layout.reshape(-1)] = chains.reshape(-1, time)
    return out[:batch]


def _discounted_reverse_cumsum(x: Tensor, discount: float) -> Tensor:
    """y[:, i] = x[:, i] + discount * y[:, i + 1] over ``[rows, steps]``, y = 0 past the end."""
    steps = x.t().contiguous()
    out = torch.empty_like(steps)
    running = steps.new_zeros(steps.shape[1])
    for i in range(steps.shape[0] - 1, -1, -1):
        running = torch.add(steps[i], running, alpha=discount)
        out[i] = running
    return out.t()


def _trainable_scan(
    token_rewards: Tensor,
    trainable: Tensor,
    values: Tensor,
    bootstrap_values: Tensor,
    episode_ids: Tensor | None,
    segment_index: Tensor | None,
    gamma: float,
    lam: float,
) -> Tensor:
    """GAE over trainable tokens only, with crediting and segment chaining; ``[batch, time]``.

    Per chain, the trainable tokens are packed into a dense sequence a_0 .. a_{n-1}, each carrying the
    rewards up to (not including) the next trainable token, then
    delta_i = r_i + gamma * V_{i+1} - V_i (V_n = bootstrap of the chain's last row) and
    A_i = delta_i + gamma * lam * A_{i+1}. With zero values and lam = 1, A is the return-to-go.
    """
    batch, time = token_rewards.shape
    layout = _chain_layout(episode_ids, segment_index, batch, token_rewards.device)
    mask = _rows_to_chains(trainable.to(token_rewards.dtype), layout) > 0
    rewards = _rows_to_chains(token_rewards, layout)
    chain_values = _rows_to_chains(torch.where(trainable, values, 0.0), layout)
    chains = layout.shape[0]

    # Token t is the k-th trainable token (1-based) of its chain, or follows it; k = 0: none before.
    step = torch.cumsum(mask.long(), dim=1)
    lengths = step[:, -1]
    longest = int(lengths.max()) if chains else 0
    dense_rewards = rewards.new_zeros(chains, longest + 1).scatter_add_(1, step, rewards)[:, 1:]
    slot = torch.where(mask, step, 0)
    dense_values = rewards.new_zeros(chains, longest + 1).scatter_add_(1, slot, chain_values)[:, 1:]

    segments_per_chain = (layout >= 0).sum(dim=1)
    last_row = layout.gather(1, (segments_per_chain - 1).unsqueeze(1)).squeeze(1)
    next_values = torch.cat([dense_values[:, 1:], dense_values.new_zeros(chains, 1)], dim=1)
    has_tokens = lengths > 0
    next_values[has_tokens, lengths[has_tokens] - 1] = bootstrap_values[last_row][has_tokens]
    # Past a chain's last trainable token rewards, values and next values are all 0, so delta is too.
    deltas = dense_rewards + gamma * next_values - dense_values
    dense_advantages = _discounted_reverse_cumsum(deltas, gamma * lam)

    padded = torch.cat([dense_advantages.new_zeros(chains, 1), dense_advantages], dim=1)
    return _chains_to_rows(padded.gather(1, slot), layout, time)


@ADVANTAGES.register("gae")
@torch.no_grad()
def gae(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    values: Tensor,
    bootstrap_values: Tensor | None = None,
    episode_ids: Tensor | None = None,
    segment_index: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over trainable tokens (Schulman et al. 2016, GAE).

    A_t = sum_l (gamma * lam)^l delta_{t+l}, delta_t = r_t + gamma * V_{t+1} - V_t, where t steps over
    the trainable tokens of a row (tool / environment tokens are skipped; a reward on one is credited
    to the closest preceding trainable token, dropped if none). The last trainable token bootstraps
    from ``bootstrap_values`` (default 0). With ``episode_ids`` and ``segment_index`` the segments of
    one episode are chained: segment k's last token bootstraps from V at segment k+1's first trainable
    token, and only the episode's last segment uses ``bootstrap_values``.

    Shapes: token_rewards, loss_mask, values ``[batch, time]``; bootstrap_values, ids ``[batch]``.
    Returns (advantages, returns = advantages + values), both ``[batch, time]`` and 0 off the mask;
    ``whiten`` whitens the advantages over all trainable tokens of the batch (returns are not).
    """
    trainable = loss_mask > 0
    mask = trainable.to(token_rewards.dtype)
    if bootstrap_values is None:
        bootstrap_values = token_rewards.new_zeros(token_rewards.shape[0])
    advantages = _trainable_scan(
        token_rewards, trainable, values, bootstrap_values, episode_ids, segment_index, gamma, lam
    )
    returns = torch.where(trainable, advantages + values, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns


@ADVANTAGES.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    episode_ids: Tensor | None = None,
    segment_index: Tensor | None = None,
    gamma: float = 1.0,
    epsilon: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): discounted return-to-go, whitened over the batch's trainable tokens.

    G_t = sum_{t' >= t} gamma^(t' - t) r_{t'} over trainable tokens (same skipping, crediting and
    segment chaining as ``gae`` with zero values and no bootstrap); A = (G - mean) / sqrt(var + eps).
    Returns (advantages, returns = G), both ``[batch, time]`` and 0 off the mask.
    """
    trainable = loss_mask > 0
    zeros = torch.zeros_like(token_rewards)
    returns = _trainable_scan(
        token_rewards,
        trainable,
        zeros,
        zeros[:, 0],
        episode_ids,
        segment_index,
        gamma,
        1.0,
    )
    advantages = masked_whiten(returns, trainable.to(token_rewards.dtype), eps=epsilon)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# Group pieces: episode scores, group statistics, broadcast back to tokens.
# ---------------------------------------------------------------------------------------------------


def _episode_of_row(episode_ids: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """Dense episode index ``[batch]`` in 0..episodes-1; rows without ids are their own episode."""
    if episode_ids is None:
        return torch.arange(batch_size, device=device)
    return torch.unique(episode_ids, return_inverse=True)[1]


def _episode_sums(per_row: Tensor, episode_of_row: Tensor) -> Tensor:
    """Sum a ``[batch]`` quantity over the rows of each episode -> ``[episodes]`` (float64)."""
    episodes = int(episode_of_row.max()) + 1
    return per_row.new_zeros(episodes, dtype=torch.float64).index_add_(0, episode_of_row, per_row.double())


def _group_of_episode(group_ids: Tensor | None, episode_of_row: Tensor) -> Tensor:
    """Dense group index ``[episodes]``; every row of an episode must carry the same group id."""
    if group_ids is None:
        raise ValueError("group estimators need group_ids (rows from the same prompt)")
    group_of_row = torch.unique(group_ids, return_inverse=True)[1]
    episodes = int(episode_of_row.max()) + 1
    lowest = group_of_row.new_full((episodes,), group_of_row.numel()).scatter_reduce(
        0, episode_of_row, group_of_row, "amin"
    )
    highest = group_of_row.new_full((episodes,), -1).scatter_reduce(0, episode_of_row, group_of_row, "amax")
    if bool((lowest != highest).any()):
        raise ValueError("rows of one episode carry different group_ids")
    return lowest


def _group_reduce(x: Tensor, group: Tensor, reduce: str) -> Tensor:
    """Reduce ``[episodes]`` values per group ('sum', 'amax', 'amin') and read back per episode."""
    groups = int(group.max()) + 1
    if reduce == "sum":
        per_group = x.new_zeros(groups).index_add_(0, group, x)
    else:
        per_group = x.new_zeros(groups).scatter_reduce(0, group, x, reduce, include_self=False)
    return per_group[group]


def _group_mean_std(scores: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per episode: its group's size, mean score and unbiased std (0 for a group of one)."""
    size = _group_reduce(torch.ones_like(scores), group, "sum")
    mean = _group_reduce(scores, group, "sum") / size
    squares = _group_reduce((scores - mean) ** 2, group, "sum")
    std = torch.sqrt(squares / (size - 1).clamp(min=1))
    return size, mean, std


def _is_degenerate_group(scores: Tensor, group: Tensor) -> Tensor:
    """True for episodes whose group is a single episode or has all-equal scores.

    Their exact advantage is 0; forcing it avoids the tiny rounding residue of s - mean, which a
    division by a near-zero std would otherwise blow up.
    """
    return _group_reduce(scores, group, "amax") == _group_reduce(scores, group, "amin")


def _broadcast_to_tokens(
    episode_values: Tensor, episode_of_row: Tensor, loss_mask: Tensor, dtype: torch.dtype
) -> Tensor:
    """Put each episode's value on every trainable token of its rows: ``[episodes]`` -> ``[batch, time]``."""
    per_row = episode_values.to(dtype)[episode_of_row].unsqueeze(1)
    return torch.where(loss_mask > 0, per_row, torch.zeros((), dtype=dtype, device=per_row.device))


def _episode_scores(
    token_rewards: Tensor, episode_ids: Tensor | None, group_ids: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [episodes] float64, group of each episode [episodes], episode of each row [batch])."""
    episode_of_row = _episode_of_row(episode_ids, token_rewards.shape[0], token_rewards.device)
    group = _group_of_episode(group_ids, episode_of_row)
    return _episode_sums(token_rewards.sum(dim=1), episode_of_row), group, episode_of_row


@ADVANTAGES.register("grpo")
@torch.no_grad()
def grpo(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    group_ids: Tensor | None = None,
    episode_ids: Tensor | None = None,
    scale: str = "group",
    epsilon: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantage (Shao et al. 2024, DeepSeekMath GRPO; Liu et al. 2025 Dr.GRPO).

    A_i = (s_i - mean_group(s)) / (std + epsilon), s_i the episode's summed reward; std is the
    unbiased std of the group (``scale="group"``), of all episodes of the batch (``"batch"``), or no
    division at all (``"none"``, Dr.GRPO). Single-episode and all-equal groups give exactly 0.
    Returns (advantages, returns = advantages), ``[batch, time]``, broadcast to trainable tokens.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo scale must be one of {GRPO_SCALES}, got {scale!r}")
    scores, group, episode_of_row = _episode_scores(token_rewards, episode_ids, group_ids)
    _, mean, group_std = _group_mean_std(scores, group)
    centred = scores - mean
    if scale == "group":
        centred = centred / (group_std + epsilon)
    elif scale == "batch":
        batch_std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
        centred = centred / (batch_std + epsilon)
    advantages = torch.where(_is_degenerate_group(scores, group), 0.0, centred)
    token_advantages = _broadcast_to_tokens(advantages, episode_of_row, loss_mask, token_rewards.dtype)
    return token_advantages, token_advantages.clone()


@ADVANTAGES.register("rloo")
@torch.no_grad()
def rloo(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    group_ids: Tensor | None = None,
    episode_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = s_i - mean_{j != i in group} s_j.

    Equivalently n / (n - 1) * (s_i - mean_group). A group of one gives 0.
    Returns (advantages, returns = advantages), ``[batch, time]``, broadcast to trainable tokens.
    """
    scores, group, episode_of_row = _episode_scores(token_rewards, episode_ids, group_ids)
    size, mean, _ = _group_mean_std(scores, group)
    leave_one_out = size / (size - 1).clamp(min=1) * (scores - mean)
    advantages = torch.where(_is_degenerate_group(scores, group), 0.0, leave_one_out)
    token_advantages = _broadcast_to_tokens(advantages, episode_of_row, loss_mask, token_rewards.dtype)
    return token_advantages, token_advantages.clone()


@ADVANTAGES.register("reinforce_pp_baseline")
@torch.no_grad()
def reinforce_pp_baseline(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    group_ids: Tensor | None = None,
    episode_ids: Tensor | None = None,
    epsilon: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025): A = whiten_batch_tokens(s_i - mean_group(s)).

    The group-mean-centred episode score is broadcast to the trainable tokens, then whitened over all
    trainable tokens of the batch, (x - mean) / sqrt(var + epsilon).
    Returns (advantages, returns = advantages), ``[batch, time]``.
    """
    scores, group, episode_of_row = _episode_scores(token_rewards, episode_ids, group_ids)
    _, mean, _ = _group_mean_std(scores, group)
    centred = torch.where(_is_degenerate_group(scores, group), 0.0, scores - mean)
    token_centred = _broadcast_to_tokens(centred, episode_of_row, loss_mask, token_rewards.dtype)
    advantages = masked_whiten(token_centred, (loss_mask > 0).to(token_rewards.dtype), eps=epsilon)
    return advantages, advantages.clone()


@ADVANTAGES.register("grpo_passk")
@torch.no_grad()
def grpo_passk(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    group_ids: Tensor | None = None,
    episode_ids: Tensor | None = None,
    epsilon: float = 1e-6,
    scale: bool = True,
) -> tuple[Tensor, Tensor]:
    """Best-of-group credit in the spirit of Pass@k training (Chen et al. 2025, arXiv:2508.10751).

    Only the strictly best episode of a group is credited: A_best = s_max - s_second_max, divided by
    (unbiased group std + epsilon) when ``scale``; every other episode gets 0, and so does everyone
    when the best score is tied or the group has one episode.
    Returns (advantages, returns = advantages), ``[batch, time]``, broadcast to trainable tokens.
    """
    scores, group, episode_of_row = _episode_scores(token_rewards, episode_ids, group_ids)
    best = _group_reduce(scores, group, "amax")
    is_best = scores == best
    n_best = _group_reduce(is_best.double(), group, "sum")
    runner_up = _group_reduce(torch.where(is_best, float("-inf"), scores), group, "amax")
    margin = best - runner_up
    if scale:
        margin = margin / (_group_mean_std(scores, group)[2] + epsilon)
    credited = is_best & (n_best == 1) & ~_is_degenerate_group(scores, group)
    advantages = torch.where(credited, margin, 0.0)
    token_advantages = _broadcast_to_tokens(advantages, episode_of_row, loss_mask, token_rewards.dtype)
    return token_advantages, token_advantages.clone()


@ADVANTAGES.register("opo")
@torch.no_grad()
def opo(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    group_ids: Tensor | None = None,
    episode_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """On-policy RL with the optimal reward baseline (Hao et al. 2025, OPO).

    A_i = s_i - b_g, b_g = sum_j L_j s_j / sum_j L_j with L_j the number of trainable tokens of
    episode j (all its rows); a group without trainable tokens falls back to the plain mean.
    A group of one gives 0. Returns (advantages, returns = advantages), ``[batch, time]``.
    """
    scores, group, episode_of_row = _episode_scores(token_rewards, episode_ids, group_ids)
    lengths = _episode_sums((loss_mask > 0).sum(dim=1), episode_of_row)
    total_length = _group_reduce(lengths, group, "sum")
    weighted = _group_reduce(lengths * scores, group, "sum") / total_length.clamp(min=1)
    _, plain_mean, _ = _group_mean_std(scores, group)
    baseline = torch.where(total_length > 0, weighted, plain_mean)
    advantages = torch.where(_is_degenerate_group(scores, group), 0.0, scores - baseline)
    token_advantages = _broadcast_to_tokens(advantages, episode_of_row, loss_mask, token_rewards.dtype)
    return token_advantages, token_advantages.clone()
