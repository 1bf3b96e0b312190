"""Trace and Episode: what a rollout produces, before padding.

A Trace is one row of training data: a token sequence with a per-token ``loss_mask`` (1 = sampled by
the policy) and the sampler's behaviour log-probs. An Episode is the ordered list of its Traces:
one Trace for a single-turn task, several sub-traces when a long episode is compacted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Trace:
    """One row: ``tokens``, ``loss_mask`` and ``rollout_logprobs`` are aligned, one entry per token.

    ``rollout_logprobs[t]`` is the sampler's log-prob of ``tokens[t]`` (0 where ``loss_mask[t] == 0``).
    ``token_rewards[t]`` (optional, aligned too) is a reward received after token t: a per-turn reward
    on the turn's last action token, a penalty on a tool call's tokens; collation adds it to the
    batch's ``token_rewards``. ``ended`` is True when the episode terminated inside this trace;
    False when it was cut off (truncated, or continued in the next sub-trace).
    """

    tokens: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    episode_id: int
    group_id: int
    segment_index: int = 0
    ended: bool = True
    token_rewards: list[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        rewards = n if self.token_rewards is None else len(self.token_rewards)
        if len(self.loss_mask) != n or len(self.rollout_logprobs) != n or rewards != n:
            raise ValueError(
                f"Trace fields must align: {n} tokens, {len(self.loss_mask)} loss_mask entries, "
                f"{len(self.rollout_logprobs)} rollout_logprobs, {rewards} token_rewards"
            )

    @property
    def num_actions(self) -> int:
        return sum(self.loss_mask)

    @property
    def reward_sum(self) -> float:
        return float(sum(self.token_rewards)) if self.token_rewards is not None else 0.0


@dataclass
class Episode:
    """An ordered list of sub-traces plus the episode's outcome reward.

    ``reward`` is placed on the last trainable token of the last sub-trace; rewards that arrive
    during the episode (per turn) live in the traces' ``token_rewards``. ``total_reward`` is the sum
    of both: what group estimators compare and dynamic sampling filters on.
    """

    traces: list[Trace]
    reward: float = 0.0

    @property
    def total_reward(self) -> float:
        return self.reward + sum(trace.reward_sum for trace in self.traces)

    @property
    def num_actions(self) -> int:
        """Trainable (policy-sampled) tokens over all sub-traces."""
        return sum(trace.num_actions for trace in self.traces)

    @property
    def episode_id(self) -> int:
        return self.traces[0].episode_id

    @property
    def group_id(self) -> int:
        return self.traces[0].group_id


def single_turn_trace(
    prompt_ids: list[int],
    completion_ids: list[int],
    completion_logprobs: list[float],
    *,
    episode_id: int,
    group_id: int,
    ended: bool = True,
) -> Trace:
    """Prompt tokens (not trained on) followed by the sampled completion (trained on)."""
    return Trace(
        tokens=list(prompt_ids) + list(completion_ids),
        loss_mask=[0] * len(prompt_ids) + [1] * len(completion_ids),
        rollout_logprobs=[0.0] * len(prompt_ids) + list(completion_logprobs),
        episode_id=episode_id,
        group_id=group_id,
        ended=ended,
    )
