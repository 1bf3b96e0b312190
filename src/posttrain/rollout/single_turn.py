"""Single-turn collection: one completion per sample, scored by the task's reward functions."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from posttrain.data.trace import Episode, single_turn_trace
from posttrain.rewards.functions import RewardTerm, score_completions
from posttrain.rollout.collector import Rollout, encode_prompt, fraction, mean, std
from posttrain.rollout.engine import FINISH_LENGTH, FINISH_STOP, RolloutEngine, SamplingParams

# a longer reference value is cut in samples.jsonl (the dataset keeps it whole)
MAX_REFERENCE_CHARS = 300


def reference_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The row's fields other than its prompt (answer, target, solution, ...), for samples.jsonl, so
    a completion is read next to what it should have been. Numbers, booleans and short strings stay
    as they are; longer strings, and lists or objects that print long, are cut to
    ``MAX_REFERENCE_CHARS`` characters."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "prompt":
            continue
        if value is not None and not isinstance(value, str | int | float | bool):
            text = json.dumps(value, default=str)
            value = value if len(text) <= MAX_REFERENCE_CHARS else text
        if isinstance(value, str) and len(value) > MAX_REFERENCE_CHARS:
            value = value[:MAX_REFERENCE_CHARS] + "..."
        out[key] = value
    return out


class SingleTurnCollector:
    """Prompt -> one sampled completion -> weighted reward. One Trace per Episode.

    ``accuracy`` is the share of samples whose first reward function scores >= 1 (a verifier).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        reward_terms: Sequence[RewardTerm],
        max_new_tokens: int,
        *,
        reward_timeout_s: float | None = None,
    ) -> None:
        self.reward_timeout_s = reward_timeout_s
        if not reward_terms:
            raise ValueError("a single-turn task needs at least one reward function")
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward_terms = list(reward_terms)
        self.max_episode_actions = self.max_row_actions = max_new_tokens

    def collect(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, *, group_size: int, seed: int
    ) -> Rollout:
        sample_rows = [row for row in rows for _ in range(group_size)]
        prompts = [row["prompt"] for row in sample_rows]
        prompt_ids = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]
        started = time.perf_counter()
        completions = self.engine.generate(prompt_ids, params, seed=seed)
        generate_seconds = time.perf_counter() - started
        rewards, per_fn = score_completions(
            self.reward_terms,
            prompts,
            [c.text for c in completions],
            sample_rows,
            timeout_s=self.reward_timeout_s,
        )
        episodes = [
            Episode(
                traces=[
                    single_turn_trace(
                        completion.prompt_ids,
                        completion.completion_ids,
                        completion.logprobs,
                        episode_id=index,
                        group_id=index // group_size,
                        ended=completion.finish_reason == FINISH_STOP,
                    )
                ],
                reward=float(reward),
            )
            for index, (completion, reward) in enumerate(zip(completions, rewards, strict=True))
        ]
        metrics = {
            "reward_mean": mean(rewards),
            "reward_std": std(rewards),
            "accuracy": fraction([score >= 1.0 for score in per_fn[self.reward_terms[0].name]]),
            "response_length": mean([len(c.completion_ids) for c in completions]),
            "truncated_fraction": fraction([c.finish_reason == FINISH_LENGTH for c in completions]),
            "time/generate": generate_seconds,
        }
        metrics.update({f"reward/{name}": mean(scores) for name, scores in per_fn.items()})
        # each term's spread: one that never varies teaches nothing (train/watch.py warns)
        metrics.update({f"reward_std/{name}": std(scores) for name, scores in per_fn.items()})
        samples = [
            {"prompt": prompt, "completion": c.text, "reward": reward, "row": reference_fields(row)}
            for prompt, c, reward, row in zip(prompts, completions, rewards, sample_rows, strict=True)
        ]
        return Rollout(episodes, metrics, samples, sum(len(c.completion_ids) for c in completions))
