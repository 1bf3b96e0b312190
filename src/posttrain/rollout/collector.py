"""The collector contract: dataset rows in, Episodes + metrics + readable samples out.

A collector owns everything between the rows of a step and the trainer's Batch: encoding prompts,
calling the rollout engine, talking to environments, scoring, and cutting long episodes into
sub-traces. ``train/step.py`` calls ``collector.collect`` and never branches on the kind of task.

- ``SingleTurnCollector`` (``rollout/single_turn.py``): one completion per sample, scored by reward
  functions; one Trace per Episode.
- ``MultiTurnCollector`` (``rollout/multi_turn.py``): turns against a text environment, tool output
  as context, compaction into sub-traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.data.trace import Episode
from posttrain.rollout.engine import SamplingParams


@dataclass
class Rollout:
    """What one ``collect`` call produced.

    ``episodes``: ``len(rows) * group_size`` Episodes, those of row i first (group id i).
    ``metrics``: scalars for metrics.jsonl (``reward_mean``, ``accuracy``, ``response_length``, ...),
    including ``time/generate``: seconds spent inside the engine's ``generate``.
    ``samples``: one JSON-ready dict per episode, in episode order, for samples.jsonl.
    ``generated_tokens``: tokens sampled by the policy (all turns), for throughput.
    """

    episodes: list[Episode]
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    generated_tokens: int = 0


@runtime_checkable
class Collector(Protocol):
    """Anything that turns rows into scored episodes with the current policy."""

    # the most trainable tokens one episode / one row (sub-trace) can hold: the overlong-shaping
    # length and Dr.GRPO's constant normaliser
    max_episode_actions: int
    max_row_actions: int

    def collect(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, *, group_size: int, seed: int
    ) -> Rollout:
        """``group_size`` episodes per row, sampled with ``params`` (``params.max_new_tokens`` is the
        budget of one completion, or of one turn)."""
        ...


def encode_prompt(tokenizer: Any, prompt: str, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The model's chat template when it has one (with the ``tools`` JSON schemas, for a template
    that lists them), else the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tools=tools, add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def fraction(flags: Sequence[bool]) -> float:
    """Share of True in ``flags`` (0 for none)."""
    return sum(1.0 for flag in flags if flag) / max(len(flags), 1)


def mean(values: Sequence[float]) -> float:
    return float(sum(values)) / max(len(values), 1)


def std(values: Sequence[float]) -> float:
    """Unbiased standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    centre = mean(values)
    return (sum((v - centre) ** 2 for v in values) / (len(values) - 1)) ** 0.5
