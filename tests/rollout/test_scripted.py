"""ScriptedEngine: a text policy behind the RolloutEngine contract (decoded context in, tokens out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from posttrain.rollout.engine import RolloutEngine, SamplingParams
from posttrain.rollout.scripted import ScriptedEngine


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_policy_sees_the_decoded_context_without_special_tokens(tokenizer: Any) -> None:
    seen: list[str] = []
    engine = ScriptedEngine(tokenizer, lambda context: seen.append(context) or "15")
    prompts = [[tokenizer.bos_token_id, *ids(tokenizer, "12+3=")], ids(tokenizer, "7+8=")]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=8), seed=3)
    assert seen == ["12+3=", "7+8="]
    assert [c.prompt_ids for c in completions] == prompts


def test_a_completion_that_fits_is_the_policy_text_tokenised(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, lambda context: context[-2:] + "15")
    (completion,) = engine.generate([ids(tokenizer, "7+8=")], SamplingParams(max_new_tokens=8))
    assert completion.text == "8=15"
    assert completion.completion_ids == ids(tokenizer, "8=15")
    assert len(completion.completion_ids) == 4  # digits and "=" are single tokens
    assert completion.finish_reason == "stop"
    assert completion.logprobs == [0.0, 0.0, 0.0, 0.0]


def test_a_long_completion_is_cut_at_max_new_tokens(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, lambda context: "12345678")
    (completion,) = engine.generate([ids(tokenizer, "1+2=")], SamplingParams(max_new_tokens=3))
    assert completion.completion_ids == ids(tokenizer, "123")
    assert completion.text == "123"
    assert completion.finish_reason == "length"
    assert completion.logprobs == [0.0, 0.0, 0.0]


def test_exactly_max_new_tokens_still_counts_as_stop(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, lambda context: "123")
    (completion,) = engine.generate([ids(tokenizer, "1+2=")], SamplingParams(max_new_tokens=3))
    assert completion.finish_reason == "stop" and completion.text == "123"


def test_scripted_engine_satisfies_the_protocol_and_claims_no_policy_logprobs(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, lambda context: "")
    assert isinstance(engine, RolloutEngine)
    assert engine.logprobs_match_policy is False
    assert engine.sync_weights(object()) is None  # type: ignore[arg-type]
    (completion,) = engine.generate([ids(tokenizer, "1")], SamplingParams())
    assert (
        completion.completion_ids == [] and completion.logprobs == [] and completion.finish_reason == "stop"
    )
