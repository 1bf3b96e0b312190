"""Held-out evaluation: greedy (or sampled) completions on test prompts, scored by the task's rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.rewards.functions import score_completions
from posttrain.rollout.engine import RolloutEngine, SamplingParams


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reward_fns: list[tuple[str, Any, float]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Returns ``{"eval_accuracy", "eval_reward", "eval_response_length", "samples"}``.

    Accuracy is the fraction of completions whose first reward function scores 1 (a verifier).
    """
    from posttrain.train.step import encode_prompt

    prompts = [row["prompt"] for row in rows]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    with torch.no_grad():
        completions = engine.generate(prompt_ids, params, seed=seed)
    texts = [c.text for c in completions]
    rewards, per_fn = score_completions(reward_fns, prompts, texts, list(rows))
    first = per_fn[reward_fns[0][0]]
    return {
        "eval_accuracy": sum(1.0 for s in first if s >= 1.0) / max(len(first), 1),
        "eval_reward": sum(rewards) / max(len(rewards), 1),
        "eval_response_length": sum(len(c.completion_ids) for c in completions) / max(len(completions), 1),
        "samples": [
            {"prompt": p, "completion": t, "reward": r, "answer": row.get("answer")}
            for p, t, r, row in zip(prompts, texts, rewards, rows, strict=True)
        ],
    }
