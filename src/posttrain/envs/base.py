"""The text-environment protocol: what a multi-turn task looks like to the rollout collector.

An environment works at text level, in the spirit of gymnasium: ``reset(row)`` starts an episode for
one dataset row and returns the first observation (the task text the policy sees), and
``step(action_text)`` applies one policy turn and returns ``(observation, reward, done, info)``. The
collector (``rollout/multi_turn.py``) owns everything token-level: tokenisation, loss masks,
behaviour log-probs, limits and compaction. An environment never sees a token.

``summary()`` is the environment's own compact account of the episode so far; the ``rule``
compaction strategy starts a new sub-trace from the task, this summary and the last few turns. The
``policy`` strategy asks the policy instead (``SUMMARY_REQUEST``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class EnvStep:
    """What one ``step`` returns: the next observation (context only, never trained on), the turn's
    reward (credited to the turn's last action token), whether the episode is over, and free-form
    diagnostics that end up in ``samples.jsonl`` (e.g. the parsed tool call, an error kind)."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TextEnv(Protocol):
    """One episode at a time; the collector makes one instance per live episode."""

    def reset(self, row: Mapping[str, Any], *, seed: int) -> str:
        """Start the episode for task ``row``; return the first observation (the task prompt)."""
        ...

    def step(self, action: str) -> EnvStep:
        """Apply the policy's turn ``action`` (its text, stop string included); never raises for bad
        actions: a malformed or failing tool call becomes an error observation."""
        ...

    def summary(self) -> str:
        """A short text that, with the task prompt, lets the policy continue after compaction."""
        ...


EnvFactory = Callable[[], TextEnv]

# With ``compaction: policy`` the collector appends this line (as context) and the policy's next
# completion is its own summary, a trainable action; a demonstrator answers it with a summary too.
SUMMARY_REQUEST = "summarize:"
