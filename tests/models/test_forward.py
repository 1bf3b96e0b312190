import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from posttrain.models.forward import (
    position_ids_from_mask,
    predicted_token_mask,
    prediction_logprobs,
    sampling_support,
    shift_to_tokens,
    token_logprobs,
    truncated_token_logprobs,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def pad(rows: list[list[int]], *, left: bool, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def test_hand_check_against_explicit_log_softmax(model: nn.Module) -> None:
    ids = torch.tensor([[5, 9, 12, 7]])
    mask = torch.ones_like(ids)
    temperature = 0.7
    logprobs, entropy = token_logprobs(model, ids, mask, temperature=temperature, with_entropy=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0] / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    expected = [0.0] + [log_p[t - 1, ids[0, t]].item() for t in range(1, 4)]
    expected_entropy = [0.0] + [-(log_p[t - 1].exp() * log_p[t - 1]).sum().item() for t in range(1, 4)]
    assert logprobs.shape == entropy.shape == (1, 4)
    torch.testing.assert_close(logprobs[0], torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[0], torch.tensor(expected_entropy), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def absolute_position_model() -> nn.Module:
    """Tiny GPT-2: learned absolute positions, so wrong position ids change its outputs (RoPE would not)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_left_and_right_padding_give_identical_per_token_values(
    which: str, model: nn.Module, absolute_position_model: nn.Module
) -> None:
    lm = model if which == "llama" else absolute_position_model
    rows = [[4, 8, 15, 16, 23, 42], [7, 3], [11, 12, 13, 14]]
    left_ids, left_mask = pad(rows, left=True)
    right_ids, right_mask = pad(rows, left=False)
    with torch.no_grad():
        left_lp, left_ent = token_logprobs(lm, left_ids, left_mask, with_entropy=True)
        right_lp, right_ent = token_logprobs(lm, right_ids, right_mask, with_entropy=True)
        width = left_ids.shape[1]
        for i, row in enumerate(rows):
            alone, _ = token_logprobs(lm, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
            left_part = left_lp[i, width - len(row) :]
            torch.testing.assert_close(left_part, right_lp[i, : len(row)], atol=1e-5, rtol=0)
            torch.testing.assert_close(left_part, alone[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                left_ent[i, width - len(row) :], right_ent[i, : len(row)], atol=1e-5, rtol=0
            )
            assert left_part[0] == 0 and (left_part[1:] < 0).all()
    # Padding contributes exactly zero.
    assert (left_lp[left_mask == 0] == 0).all() and (right_lp[right_mask == 0] == 0).all()
    assert (right_ent[right_mask == 0] == 0).all()


class UniformLM(nn.Module):
    """Stand-in causal LM whose logits are all equal, so every distribution is uniform."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: Tensor, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.anchor + torch.zeros(*input_ids.shape, self.vocab_size))


def test_uniform_distribution_gives_minus_log_v_and_entropy_log_v() -> None:
    ids, mask = pad([[1, 2, 3], [4, 5]], left=False)
    logprobs, entropy = token_logprobs(UniformLM(10), ids, mask, temperature=2.0, with_entropy=True)
    assert entropy is not None
    expected_mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(logprobs, -math.log(10) * expected_mask)
    torch.testing.assert_close(entropy, math.log(10) * expected_mask)


def test_entropy_is_none_unless_asked_and_gradients_flow(model: nn.Module) -> None:
    ids = torch.tensor([[5, 9, 12, 7]])
    logprobs, entropy = token_logprobs(model, ids, torch.ones_like(ids))
    assert entropy is None
    logprobs.sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_temperature_must_be_positive(model: nn.Module) -> None:
    ids = torch.tensor([[5, 9]])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, torch.ones_like(ids), temperature=0.0)


def test_shift_to_tokens_masks_non_finite_padding_values() -> None:
    # Column 0 was computed at a padding position (left padding): its NaN must not reach token 1.
    per_prediction = torch.tensor([[float("nan"), 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1, 1]])
    assert torch.equal(shift_to_tokens(per_prediction, mask), torch.tensor([[0.0, 0.0, 2.0, 3.0]]))


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4),
    left=st.booleans(),
)
def test_positions_count_real_tokens_from_zero(lengths: list[int], left: bool) -> None:
    _, mask = pad([[1] * n for n in lengths], left=left)
    positions = position_ids_from_mask(mask)
    predicted = predicted_token_mask(mask)
    for i, n in enumerate(lengths):
        assert positions[i][mask[i] == 1].tolist() == list(range(n))
        assert int(predicted[i].sum()) == n - 1
        assert not predicted[i, 0]
    assert (positions >= 0).all()


@pytest.mark.parametrize("from_position", [0, 1, 2, 4, 6])
def test_from_position_skips_prompt_logits_and_keeps_values_and_gradients(
    model: nn.Module, from_position: int
) -> None:
    ids, mask = pad([[5, 6, 7, 8, 9, 10, 11], [5, 9, 8, 7], [4, 4, 5, 6, 7, 8]], left=False)
    rows_seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _module, inputs, _out: rows_seen.append(inputs[0].shape[1])
    )
    try:
        full, full_entropy = token_logprobs(model, ids, mask, with_entropy=True)
        part, part_entropy = token_logprobs(model, ids, mask, with_entropy=True, from_position=from_position)
    finally:
        hook.remove()
    width = ids.shape[1]
    # the LM head ran over positions from_position - 1 .. end only (the logits there predict from_position ..)
    assert rows_seen == [width, width - from_position + 1 if from_position > 1 else width]
    assert part_entropy is not None and full_entropy is not None
    torch.testing.assert_close(part[:, from_position:], full[:, from_position:], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        part_entropy[:, from_position:], full_entropy[:, from_position:], atol=1e-6, rtol=0
    )
    assert (part[:, :from_position] == 0).all()
    # gradients of a loss over the kept positions are the same
    weights = torch.rand(part[:, from_position:].shape, generator=torch.Generator().manual_seed(0))
    grad_full = torch.autograd.grad((full[:, from_position:] * weights).sum(), list(model.parameters()))
    grad_part = torch.autograd.grad((part[:, from_position:] * weights).sum(), list(model.parameters()))
    for a, b in zip(grad_full, grad_part, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- the sampler's truncation (rollout.keep_sampling_mask) ---------------------------------------


def test_truncated_logprob_by_hand() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    keep = torch.tensor([[[3, 2, -1]]])
    logprob, _ = prediction_logprobs(logits, torch.tensor([[3]]), keep_ids=keep)
    assert logprob.item() == pytest.approx(3.0 - math.log(math.exp(3.0) + math.exp(2.0)))
    # a target outside the kept set (a sampler whose set differs at the boundary) counts once
    outside, _ = prediction_logprobs(logits, torch.tensor([[0]]), keep_ids=torch.tensor([[[3, -1]]]))
    assert outside.item() == pytest.approx(0.0 - math.log(math.exp(3.0) + 1.0))
    # keeping every token is the plain log-prob, at any temperature
    every = torch.tensor([[[0, 1, 2, 3]]])
    for temperature in (1.0, 0.7):
        plain, _ = prediction_logprobs(logits, torch.tensor([[1]]), temperature=temperature)
        kept, _ = prediction_logprobs(logits, torch.tensor([[1]]), temperature=temperature, keep_ids=every)
        torch.testing.assert_close(kept, plain)


@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 12),
    st.sampled_from([1.0, 0.95, 0.7, 0.3, 0.01]),
)
def test_sampling_support_is_what_transformers_warpers_keep(seed: int, top_k: int, top_p: float) -> None:
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scaled = torch.randn(3, 10, generator=torch.Generator().manual_seed(seed)) * 3
    warped = scaled.clone()
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    support = sampling_support(scaled, top_k=top_k, top_p=top_p)
    for row in range(3):
        expected = set(torch.nonzero(torch.isfinite(warped[row])).flatten().tolist())
        assert {i for i in support[row].tolist() if i >= 0} == expected


def test_truncated_token_logprobs_renormalise_the_kept_tokens(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids = torch.tensor([[1, 5, 9, 7, 3], [1, 4, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        full, _ = token_logprobs(model, input_ids, mask, temperature=0.8)
        truncated, keep_ids = truncated_token_logprobs(
            model, input_ids, mask, temperature=0.8, top_k=3, top_p=1.0
        )
        again, _ = token_logprobs(model, input_ids, mask, temperature=0.8, keep_ids=keep_ids)
    assert keep_ids.shape == (2, 5, 3) and (keep_ids[:, 0] == -1).all()
    real = predicted_token_mask(mask)
    assert (truncated[real] >= full[real] - 1e-6).all()  # a smaller normaliser
    torch.testing.assert_close(again, truncated)  # the same truncation applied again
    assert (truncated[~real] == 0).all()
