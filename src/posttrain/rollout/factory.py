"""``rollout.engine``: the engine a run samples with, by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.hf import HFRolloutEngine

ENGINES = ("hf", "vllm")


def build_engine(name: str, policy: nn.Module, tokenizer: Any, *, model_path: str | Path) -> RolloutEngine:
    """The ``name`` engine sampling from ``policy`` (whose starting weights are at ``model_path``).

    ``hf`` samples with the policy module itself; ``vllm`` runs its own copy of the network, loaded
    from ``model_path`` and then given the policy's current weights (a resumed run's included).
    """
    if name == "hf":
        return HFRolloutEngine(policy, tokenizer)
    if name == "vllm":
        from posttrain.rollout.vllm import build_vllm_engine  # vLLM is optional and heavy

        return build_vllm_engine(policy, tokenizer, model_path)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; allowed: {list(ENGINES)}")
