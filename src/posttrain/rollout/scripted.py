"""A rollout engine driven by a text policy (a scripted demonstrator): context text in, action text out.

It lets demonstrations flow through the very collector that RL uses, so a warm-start sees the same
tokenisation, stop strings, observations and compaction as training does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from posttrain.rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams


class ScriptedEngine:
    """``RolloutEngine`` whose completion for a context is ``policy(decoded context)``, tokenised.

    Log-probs are 0 (a script has none); the completion is cut at ``max_new_tokens``.
    """

    logprobs_match_policy = False

    def __init__(self, tokenizer: Any, policy: Callable[[str], str]) -> None:
        self.tokenizer = tokenizer
        self.policy = policy

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        completions = []
        for ids in prompt_ids:
            action = self.policy(self.tokenizer.decode(ids, skip_special_tokens=True))
            action_ids = list(self.tokenizer(action, add_special_tokens=False)["input_ids"])
            cut = action_ids[: params.max_new_tokens]
            completions.append(
                Completion(
                    prompt_ids=list(ids),
                    completion_ids=cut,
                    logprobs=[0.0] * len(cut),
                    finish_reason=FINISH_STOP if len(cut) == len(action_ids) else FINISH_LENGTH,
                    text=action if len(cut) == len(action_ids) else self.tokenizer.decode(cut),
                )
            )
        return completions

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to sync: a script has no weights."""
