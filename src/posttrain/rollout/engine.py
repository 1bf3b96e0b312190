"""The rollout-engine contract: prompts (token ids) in, sampled completions with behaviour logprobs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

FINISH_STOP = "stop"  # the policy emitted EOS or a stop string (included in completion_ids as an action)
FINISH_LENGTH = "length"  # max_new_tokens reached without EOS


@dataclass
class SamplingParams:
    """Sampling settings: ``temperature == 0`` is greedy; ``top_k == 0`` / ``top_p == 1`` turn those off.

    ``stop`` strings end a completion (e.g. a turn ends at ``"</tool_call>"`` or a newline): the
    completion keeps the tokens up to and including the one that completes the first stop string,
    and its ``finish_reason`` is ``"stop"``, as for EOS.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_on_eos: bool = True
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.stop = tuple(self.stop)
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the behaviour logprobs: the sampling one, or 1 for greedy decoding."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class Completion:
    """One sampled continuation. ``logprobs[i]`` is log pi(completion_ids[i] | prompt, completion_ids[:i])."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples completions from the current policy.

    An engine may set ``logprobs_match_policy = True`` when its log-probs are computed by the
    training forward pass (``models.forward.token_logprobs``) on the current weights; the trainer
    then uses them as ``old_logprobs`` instead of recomputing them.
    """

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order; deterministic for a given ``seed``."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        ...
