import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from posttrain.models.forward import token_logprobs
from posttrain.models.load import LoraSettings, ensure_pad_token, load_policy
from posttrain.rollout.engine import Completion, RolloutEngine, SamplingParams
from posttrain.rollout.hf import (
    BehaviourLogprobRecorder,
    HFRolloutEngine,
    cut_at_eos,
    cut_at_stop_string,
    pad_batch,
)

PROMPTS = ["1+2=", "12+34=", "7+8=", "40+2=", "3+3=", "99+1=", "5+17="]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> tuple[nn.Module, Any]:
    return load_policy(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(policy: tuple[nn.Module, Any]) -> list[list[int]]:
    tokenizer = policy[1]
    return [[tokenizer.bos_token_id, *tokenizer(text).input_ids] for text in PROMPTS]


@pytest.fixture(scope="module")
def eos_policy(tiny_model_dir: Path, prompt_ids: list[list[int]]) -> tuple[nn.Module, Any]:
    """The tiny model fitted for a few steps to answer every prompt with "7" then EOS."""
    model, tokenizer = load_policy(tiny_model_dir)
    answer = [tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id]
    input_ids, attention_mask = pad_batch(
        [p + answer for p in prompt_ids], tokenizer.pad_token_id, left=False
    )
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        logprobs, _ = token_logprobs(model, input_ids, attention_mask)
        (-logprobs.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def test_engine_satisfies_the_protocol(policy: tuple[nn.Module, Any]) -> None:
    assert isinstance(HFRolloutEngine(*policy), RolloutEngine)


def test_greedy_stops_at_eos_which_is_kept_as_an_action(
    eos_policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = eos_policy
    engine = HFRolloutEngine(model, tokenizer)
    completions = engine.generate(prompt_ids, SamplingParams(max_new_tokens=6, temperature=0.0))
    seven = tokenizer.convert_tokens_to_ids("7")
    for completion in completions:
        assert completion.completion_ids == [seven, tokenizer.eos_token_id]
        assert completion.finish_reason == "stop"
        assert completion.text == "7"
        assert len(completion.logprobs) == 2


def test_without_stop_on_eos_generation_runs_to_max_new_tokens(
    eos_policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = eos_policy
    engine = HFRolloutEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=5, temperature=0.0, stop_on_eos=False)
    for completion in engine.generate(prompt_ids, params):
        assert len(completion.completion_ids) == 5
        assert completion.completion_ids[1] == tokenizer.eos_token_id
        assert completion.finish_reason == "length"


def test_max_new_tokens_and_finish_reasons_when_sampling(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    engine = HFRolloutEngine(*policy)
    eos = policy[1].eos_token_id
    completions = engine.generate(prompt_ids * 4, SamplingParams(max_new_tokens=7), seed=0)
    assert len(completions) == 4 * len(prompt_ids)
    for completion in completions:
        assert 1 <= len(completion.completion_ids) <= 7
        assert eos not in completion.completion_ids[:-1]
        if completion.finish_reason == "stop":
            assert completion.completion_ids[-1] == eos
        else:
            assert completion.finish_reason == "length" and len(completion.completion_ids) == 7


def test_same_seed_same_samples_and_caller_rng_untouched(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    engine = HFRolloutEngine(*policy, batch_size=3)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    rng_state = torch.get_rng_state()
    first = engine.generate(prompt_ids, params, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)
    again = engine.generate(prompt_ids, params, seed=7)
    other = engine.generate(prompt_ids, params, seed=8)
    assert [c.completion_ids for c in first] == [c.completion_ids for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]


def test_logprobs_equal_a_fresh_right_padded_training_forward(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer, batch_size=3)  # micro-batches differ from the check's batch
    completions = engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, temperature=0.7), seed=1)
    rows = [c.prompt_ids + c.completion_ids for c in completions]
    input_ids, attention_mask = pad_batch(rows, tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        expected, _ = token_logprobs(model.eval(), input_ids, attention_mask, temperature=0.7)
    for row, completion in enumerate(completions):
        start = len(completion.prompt_ids)
        want = expected[row, start : start + len(completion.completion_ids)]
        torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)


def test_greedy_picks_the_argmax_of_the_training_forward(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_on_eos=False)
    completions = engine.generate(prompt_ids, greedy, seed=1)
    assert [c.completion_ids for c in completions] == [
        c.completion_ids for c in engine.generate(prompt_ids, greedy, seed=2)
    ]
    for completion in completions:
        ids = torch.tensor([completion.prompt_ids + completion.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        start = len(completion.prompt_ids)
        steps = range(start - 1, start - 1 + len(completion.completion_ids))
        # Greedy logprobs are reported at temperature 1: the max of each step's log-softmax.
        log_p = torch.log_softmax(logits[list(steps)], dim=-1)
        assert completion.completion_ids == log_p.argmax(dim=-1).tolist()
        torch.testing.assert_close(
            torch.tensor(completion.logprobs), log_p.max(dim=-1).values, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_and_top_p_are_honoured(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]], truncation: dict[str, Any]
) -> None:
    engine = HFRolloutEngine(*policy)
    keep_only_best = SamplingParams(max_new_tokens=6, temperature=1.5, stop_on_eos=False, **truncation)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_eos=False)
    sampled = engine.generate(prompt_ids, keep_only_best, seed=3)
    assert [c.completion_ids for c in sampled] == [
        c.completion_ids for c in engine.generate(prompt_ids, greedy)
    ]


def test_train_mode_restored_and_order_kept_across_micro_batches(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer, batch_size=2)
    model.train()
    completions = engine.generate(prompt_ids, SamplingParams(max_new_tokens=3), seed=0)
    assert model.training
    model.eval()
    engine.generate(prompt_ids[:1], SamplingParams(max_new_tokens=3), seed=0)
    assert not model.training
    assert [c.prompt_ids for c in completions] == prompt_ids
    assert all(
        isinstance(c, Completion) and c.text == tokenizer.decode(c.completion_ids) for c in completions
    )


def test_sync_weights_keeps_sampling_from_the_shared_module(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer)
    engine.sync_weights(model)
    assert engine.model is model


def test_invalid_inputs_are_rejected(policy: tuple[nn.Module, Any]) -> None:
    engine = HFRolloutEngine(*policy)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[5], []], SamplingParams())
    assert engine.generate([], SamplingParams()) == []


def test_cut_at_eos_and_pad_batch() -> None:
    assert cut_at_eos([4, 2, 9, 2], {2}, stop_on_eos=True) == ([4, 2], "stop")
    assert cut_at_eos([4, 5, 9], {2}, stop_on_eos=True) == ([4, 5, 9], "length")
    assert cut_at_eos([4, 2, 9], {2}, stop_on_eos=False) == ([4, 2, 9], "length")
    ids, mask = pad_batch([[7, 8, 9], [5]], 0, left=True)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_token_equal_to_eos_still_cuts_after_the_first_eos(
    eos_policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = eos_policy
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        ensure_pad_token(tokenizer)
    engine = HFRolloutEngine(model, tokenizer)
    # Rows of different lengths, so finished rows are padded with EOS while others continue.
    completions = engine.generate(prompt_ids, SamplingParams(max_new_tokens=3, temperature=4.0), seed=0)
    for completion in completions:
        assert tokenizer.eos_token_id not in completion.completion_ids[:-1]
        assert completion.finish_reason == (
            "stop" if completion.completion_ids[-1] == tokenizer.eos_token_id else "length"
        )
    assert {c.finish_reason for c in completions} == {"stop", "length"}


def test_lora_policy_generates_and_logprobs_match_its_forward(
    tiny_model_dir: Path, prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = load_policy(tiny_model_dir, lora=LoraSettings(r=2, alpha=4))
    engine = HFRolloutEngine(model, tokenizer)
    completions = engine.generate(prompt_ids[:3], SamplingParams(max_new_tokens=4), seed=0)
    rows = [c.prompt_ids + c.completion_ids for c in completions]
    input_ids, attention_mask = pad_batch(rows, tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        expected, _ = token_logprobs(model, input_ids, attention_mask)
    for row, completion in enumerate(completions):
        start = len(completion.prompt_ids)
        want = expected[row, start : start + len(completion.completion_ids)]
        torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ stop strings

FREE = SamplingParams(max_new_tokens=10, temperature=1.0, stop_on_eos=False)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in ids]


def test_a_stop_string_ends_each_completion_at_the_token_that_completes_it(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    free = engine.generate(prompt_ids, FREE, seed=5)  # same seed: the stopped samples are its prefixes
    texts = token_texts(tokenizer, free[0].completion_ids)
    # a one-character token of row 0 not seen before it: rows cut at the first token holding it
    k = next(i for i in range(2, 10) if len(texts[i]) == 1 and texts[i] not in "".join(texts[:i]))
    stop = texts[k]
    stopped = engine.generate(prompt_ids, replace(FREE, stop=(stop,)), seed=5)
    for sample, completion in zip(free, stopped, strict=True):
        hits = [i for i, text in enumerate(token_texts(tokenizer, sample.completion_ids)) if stop in text]
        end = hits[0] + 1 if hits else len(sample.completion_ids)
        assert completion.completion_ids == sample.completion_ids[:end]
        assert completion.finish_reason == ("stop" if hits else "length")
        assert completion.text == tokenizer.decode(completion.completion_ids)
        torch.testing.assert_close(
            torch.tensor(completion.logprobs), torch.tensor(sample.logprobs[:end]), atol=1e-5, rtol=0
        )
    assert len(stopped[0].completion_ids) == k + 1


def test_a_stop_string_spanning_tokens_and_the_earliest_of_several(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer)
    free = engine.generate(prompt_ids[:1], FREE, seed=5)[0]
    texts = token_texts(tokenizer, free.completion_ids)
    assert tokenizer.decode(free.completion_ids) == "".join(texts)  # one-character tokens here
    spanning = texts[4] + texts[5]
    late = texts[8] + texts[9]
    assert spanning not in "".join(texts[:5]) and late not in "".join(texts[:9])
    (completion,) = engine.generate(prompt_ids[:1], replace(FREE, stop=(late, spanning)), seed=5)
    assert completion.completion_ids == free.completion_ids[:6]  # "spanning" completes at token 5
    assert completion.finish_reason == "stop" and completion.text.endswith(spanning)
    assert len(completion.logprobs) == 6
    (completion,) = engine.generate(prompt_ids[:1], replace(FREE, stop=(late,)), seed=5)
    assert completion.completion_ids == free.completion_ids and completion.finish_reason == "stop"


VOCAB = {
    1: "ab",
    2: "c\n",
    3: "d",
    4: "</",
    5: "tool_call>",
    6: "x",
    7: "\nlookup",
    9: "",
}  # 9 is EOS: decoded as nothing


def fake_decode(ids: list[int]) -> str:
    return "".join(VOCAB[token] for token in ids)


@pytest.mark.parametrize(
    ("ids", "reason", "stop", "expected"),
    [
        ([1, 2, 3], "length", (), ([1, 2, 3], "length")),  # no stop strings
        ([1, 3, 6], "length", ("\n",), ([1, 3, 6], "length")),  # none occurs
        ([1, 3, 6, 9], "stop", ("\n",), ([1, 3, 6, 9], "stop")),  # an EOS cut is kept
        ([1, 2, 3], "length", ("\n",), ([1, 2], "stop")),  # ends inside a token
        ([6, 4, 5, 3], "length", ("</tool_call>",), ([6, 4, 5], "stop")),  # spans two tokens
        ([1, 7, 3], "length", ("\n",), ([1, 7], "stop")),  # the completing token is kept whole
        ([2, 3], "length", ("\n",), ([2], "stop")),  # in the first token
        ([1, 3, 2, 4, 5], "length", ("</tool_call>", "\n"), ([1, 3, 2], "stop")),  # the earliest wins
        ([], "length", ("\n",), ([], "length")),
    ],
)
def test_cut_at_stop_string_hand_cases(
    ids: list[int], reason: str, stop: tuple[str, ...], expected: tuple[list[int], str]
) -> None:
    assert cut_at_stop_string(ids, reason, stop, fake_decode) == expected


@given(
    ids=st.lists(st.sampled_from(sorted(VOCAB)), max_size=12),
    stop=st.lists(st.sampled_from(["\n", "</tool_call>", "x", "lookup"]), max_size=2),
)
def test_cut_at_stop_string_finds_the_shortest_prefix_like_a_linear_scan(
    ids: list[int], stop: list[str]
) -> None:
    first = next(
        (end for end in range(1, len(ids) + 1) if any(s in fake_decode(ids[:end]) for s in stop)), None
    )
    expected = (ids, "length") if first is None else (ids[:first], "stop")
    assert cut_at_stop_string(ids, "length", tuple(stop), fake_decode) == expected


def test_recorder_reads_each_sampled_token_from_the_step_that_sampled_it() -> None:
    recorder = BehaviourLogprobRecorder(temperature=2.0)
    step_logits = [
        torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 1.0], [0.0, 4.0, 0.0]]),
    ]
    sequences = torch.tensor([[9, 2, 0], [9, 0, 1]])  # prompt token 9, then two sampled tokens
    for step, logits in enumerate(step_logits):
        assert recorder(sequences[:, : 1 + step], logits) is logits  # scores pass through unchanged
    got = recorder.logprobs(sequences, num_generated=2)
    want = torch.stack(
        [torch.log_softmax(step_logits[t] / 2.0, dim=-1)[[0, 1], sequences[:, 1 + t]] for t in range(2)],
        dim=1,
    )
    torch.testing.assert_close(got, want)
    # generate may run one step more and undo it: the extra step is dropped
    recorder(sequences, torch.zeros(2, 3))
    torch.testing.assert_close(recorder.logprobs(sequences, num_generated=2), want)


def test_logprobs_are_of_the_full_tempered_distribution_under_top_k(
    policy: tuple[nn.Module, Any], prompt_ids: list[list[int]]
) -> None:
    model, tokenizer = policy
    engine = HFRolloutEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=5, temperature=1.5, top_k=1, stop_on_eos=False)
    completions = engine.generate(prompt_ids, params, seed=0)
    rows = [c.prompt_ids + c.completion_ids for c in completions]
    input_ids, attention_mask = pad_batch(rows, tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        expected, _ = token_logprobs(model.eval(), input_ids, attention_mask, temperature=1.5)
    for row, completion in enumerate(completions):
        start = len(completion.prompt_ids)
        got = torch.tensor(completion.logprobs)
        # top-k = 1 makes the sampled token certain for the sampler, but pi is the untruncated softmax
        assert (got < -1e-3).all()
        torch.testing.assert_close(got, expected[row, start : start + 5], atol=1e-5, rtol=0)
