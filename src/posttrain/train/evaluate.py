"""Held-out evaluation: one greedy (or sampled) episode per test row, through the run's collector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.rollout.collector import Collector
from posttrain.rollout.engine import SamplingParams


def evaluate(
    collector: Collector, rows: Sequence[dict[str, Any]], params: SamplingParams, *, seed: int = 0
) -> dict[str, Any]:
    """Returns ``{"eval_accuracy", "eval_reward", "eval_response_length", ..., "samples"}``.

    Every metric of the collector comes back prefixed with ``eval_`` (``reward_mean`` as
    ``eval_reward``); accuracy is the collector's: the first reward function scoring >= 1 for a
    single-turn task, the environment's success for an agent task.
    """
    if not rows:
        return {"eval_accuracy": 0.0, "eval_reward": 0.0, "eval_response_length": 0.0, "samples": []}
    with torch.no_grad():
        rollout = collector.collect(rows, params, group_size=1, seed=seed)
    metrics: dict[str, Any] = {
        "eval_" + ("reward" if key == "reward_mean" else key): value
        for key, value in rollout.metrics.items()
        if not key.startswith("time/")  # a score, not a timing: evaluations of one model agree
    }
    metrics["samples"] = rollout.samples
    return metrics
