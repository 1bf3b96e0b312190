"""Shared prompts: each distinct prompt runs once, with values and gradients of the plain forward."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from posttrain.models.critic import ValueModel
from posttrain.models.forward import token_logprobs
from posttrain.models.load import LoraSettings, load_policy
from posttrain.models.prefix import ActionForward, row_first_actions, share_prompts

PROMPTS = [[1, 5, 6, 7], [1, 9, 8]]


def batch_of(rows: list[tuple[int, list[int]]], *, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) for rows of (prompt index, completion)."""
    tokens = [PROMPTS[p] + completion for p, completion in rows]
    width = max(map(len, tokens))
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width)
    for i, ((p, _completion), row) in enumerate(zip(rows, tokens, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, len(PROMPTS[p]) : len(row)] = 1
    return input_ids, attention_mask, loss_mask


ROWS = [(0, [11, 12, 13]), (1, [14]), (0, [15, 16]), (1, [17, 18, 19, 20]), (0, [])]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_split_by_hand() -> None:
    input_ids, attention_mask, loss_mask = batch_of(ROWS)
    shared = share_prompts(input_ids, attention_mask, loss_mask)
    assert shared is not None
    assert shared.prompt_ids.tolist() == [[1, 5, 6, 7], [0, 1, 9, 8]]  # left-padded
    assert shared.prompt_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    # the row without actions keeps its whole length as its own prompt: [1, 5, 6, 7] again
    assert shared.prompt_of_row.tolist() == [0, 1, 0, 1, 0]
    assert shared.prompt_lengths.tolist() == [4, 3, 4, 3, 4]
    assert shared.suffix_ids.tolist() == [
        [11, 12, 13, 0],
        [14, 0, 0, 0],
        [15, 16, 0, 0],
        [17, 18, 19, 20],
        [0] * 4,
    ]
    assert shared.suffix_mask.sum(dim=1).tolist() == [3, 1, 2, 4, 0]
    placed = shared.to_tokens(torch.arange(1.0, 21.0).reshape(5, 4))
    assert placed.tolist()[0] == [0, 0, 0, 0, 1, 2, 3]
    assert placed.tolist()[3] == [0, 0, 0, 13, 14, 15, 16]
    assert placed.tolist()[4] == [0] * 7


def test_row_first_actions_by_hand() -> None:
    _, attention_mask, loss_mask = batch_of(ROWS)
    assert row_first_actions(attention_mask, loss_mask).tolist() == [4, 3, 4, 3, 4]  # the last has none


def test_nothing_to_share_gives_none() -> None:
    input_ids, attention_mask, loss_mask = batch_of([(0, [11]), (1, [12, 13])])
    assert share_prompts(input_ids, attention_mask, loss_mask) is None
    assert share_prompts(*batch_of([(0, []), (0, [])])) is None  # no action at all


def counting_tokens(module: nn.Module) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = module.get_input_embeddings().register_forward_hook(
        lambda _m, inputs, _o: seen.append(inputs[0].numel())
    )
    return seen, handle


def assert_same_after_prompts(got: Tensor, want: Tensor, loss_mask: Tensor, attention_mask: Tensor) -> None:
    first = torch.where(loss_mask.bool().any(1), loss_mask.argmax(1), attention_mask.sum(1))
    after = (torch.arange(loss_mask.shape[1])[None] >= first[:, None]) & attention_mask.bool()
    torch.testing.assert_close(got[after], want[after], atol=1e-5, rtol=1e-5)
    assert (got[~after] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_logprobs_entropy_and_gradients_equal_the_plain_forward(
    model: nn.Module, temperature: float
) -> None:
    input_ids, attention_mask, loss_mask = batch_of(ROWS)
    plan = ActionForward.plan(input_ids, attention_mask, loss_mask)
    assert plan.shared is not None
    seen, handle = counting_tokens(model)
    try:
        got, got_entropy = plan.logprobs(model, temperature=temperature, with_entropy=True)
    finally:
        handle.remove()
    # 2 prompts x 4 columns once, then 5 rows x 4 suffix columns: fewer than 5 rows x 7 columns
    assert seen == [2 * 4, 5 * 4]
    want, want_entropy = token_logprobs(
        model, input_ids, attention_mask, temperature=temperature, with_entropy=True
    )
    assert got_entropy is not None and want_entropy is not None
    assert_same_after_prompts(got, want, loss_mask, attention_mask)
    assert_same_after_prompts(got_entropy, want_entropy, loss_mask, attention_mask)
    weights = torch.randn(loss_mask.shape, generator=torch.Generator().manual_seed(0)) * loss_mask
    params = [p for p in model.parameters()]
    got_grads = torch.autograd.grad((got * weights).sum() + (got_entropy * loss_mask).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum() + (want_entropy * loss_mask).sum(), params)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_policy_and_critic_share_prompts_too(tiny_model_dir: Path) -> None:
    policy, _ = load_policy(tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    input_ids, attention_mask, loss_mask = batch_of(ROWS)
    plan = ActionForward.plan(input_ids, attention_mask, loss_mask)
    got, _ = plan.logprobs(policy)
    want, _ = token_logprobs(policy, input_ids, attention_mask)
    assert_same_after_prompts(got, want, loss_mask, attention_mask)
    lora = [p for p in policy.parameters() if p.requires_grad]
    for a, b in zip(
        torch.autograd.grad((got * loss_mask).sum(), lora),
        torch.autograd.grad((want * loss_mask).sum(), lora),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    critic = ValueModel.from_pretrained(tiny_model_dir)
    shared_values = critic(input_ids, attention_mask, shared=plan.shared)
    plain_values = critic(input_ids, attention_mask)
    assert_same_after_prompts(shared_values, plain_values, loss_mask, attention_mask)
    head = list(critic.parameters())
    for a, b in zip(
        torch.autograd.grad((shared_values * loss_mask).sum(), head),
        torch.autograd.grad((plain_values * loss_mask).sum(), head),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 1), st.lists(st.integers(2, 40), min_size=0, max_size=5)),
        min_size=2,
        max_size=6,
    )
)
def test_any_mix_of_groups_and_lengths_matches_the_plain_forward(model: nn.Module, rows) -> None:
    input_ids, attention_mask, loss_mask = batch_of(rows)
    with torch.no_grad():
        got, _ = ActionForward.plan(input_ids, attention_mask, loss_mask).logprobs(model)
        want, _ = token_logprobs(model, input_ids, attention_mask)
    assert_same_after_prompts(got, want, loss_mask, attention_mask)
