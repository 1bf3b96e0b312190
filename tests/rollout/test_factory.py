"""``rollout.engine``: the engine a run samples with, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.models.load import load_policy
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.factory import ENGINES, build_engine
from posttrain.rollout.hf import HFRolloutEngine


def test_hf_samples_with_the_policy_itself(tiny_model_dir: Path) -> None:
    policy, tokenizer = load_policy(tiny_model_dir)
    engine = build_engine("hf", policy, tokenizer, model_path=tiny_model_dir)
    assert isinstance(engine, HFRolloutEngine) and isinstance(engine, RolloutEngine)
    assert engine.model is policy


def test_an_unknown_engine_names_the_key_and_the_choices(tiny_model_dir: Path) -> None:
    policy, tokenizer = load_policy(tiny_model_dir)
    with pytest.raises(ValueError, match=r"rollout.engine: unknown engine 'sglang'.*'hf', 'vllm'"):
        build_engine("sglang", policy, tokenizer, model_path=tiny_model_dir)
    assert ENGINES == ("hf", "vllm")
