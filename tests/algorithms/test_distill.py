"""The reverse-KL distillation estimator against hand computations, and what its gradient is."""

from __future__ import annotations

import math

import pytest
import torch

import posttrain.algorithms  # noqa: F401  (registers everything)
from posttrain.algorithms.aggregate import aggregate
from posttrain.algorithms.distill import reverse_kl, teacher_signal
from posttrain.algorithms.presets import get_preset
from posttrain.algorithms.registry import ADVANTAGES, POLICY_LOSSES

NAN, INF = math.nan, math.inf


def one_row() -> dict[str, torch.Tensor]:
    """Prompt, action, tool output (garbage log-probs), action, action, padding."""
    return {
        "token_rewards": torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0, 0.0]]),  # ignored: no verifier
        "loss_mask": torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]),
        "old_logprobs": torch.tensor([[9.0, -1.0, NAN, -2.0, -0.5, -INF]]),
        "teacher_logprobs": torch.tensor([[3.0, -1.5, INF, -1.0, -1.5, NAN]]),
    }


def test_per_token_signal_is_the_teachers_logprob_minus_the_students():
    data = one_row()
    # trainable tokens: teacher - old = -1.5 - -1 = -0.5, -1 - -2 = 1, -1.5 - -0.5 = -1
    expected = torch.tensor([[0.0, -0.5, 0.0, 1.0, -1.0, 0.0]])
    advantages, returns = ADVANTAGES.call("reverse_kl", data)
    assert torch.equal(advantages, expected)
    assert torch.equal(returns, expected)
    assert torch.equal(
        teacher_signal(data["old_logprobs"], data["teacher_logprobs"], data["loss_mask"]), expected
    )


def test_discount_sums_the_future_terms_over_trainable_tokens_only():
    # gamma 0.5 over the trainable tokens (-0.5, 1, -1): A = -1; 1 + 0.5 * -1 = 0.5; -0.5 + 0.5 * 0.5 = -0.25
    advantages, returns = ADVANTAGES.call("reverse_kl", one_row(), {"gamma": 0.5})
    expected = torch.tensor([[0.0, -0.25, 0.0, 0.5, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(returns, expected, rtol=0, atol=1e-7)
    # gamma 1: the return-to-go of the teacher's signal
    advantages, _ = ADVANTAGES.call("reverse_kl", one_row(), {"gamma": 1.0})
    torch.testing.assert_close(
        advantages, torch.tensor([[0.0, -0.5, 0.0, 0.0, -1.0, 0.0]]), rtol=0, atol=1e-7
    )


def test_discount_chains_the_sub_traces_of_an_episode_in_segment_order():
    """Row 0 is segment 1 of episode 7 (signal 2), row 1 its segment 0 (signals 1, -1), row 2 an
    episode of its own (signal 4): with gamma 0.5 segment 0 hears segment 1, episode 3 hears nobody."""
    loss_mask = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(3, 3)
    teacher = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0], [4.0, 0.0, 0.0]])
    data = {
        "token_rewards": torch.zeros(3, 3),
        "loss_mask": loss_mask,
        "old_logprobs": old,
        "teacher_logprobs": teacher,
        "episode_ids": torch.tensor([7, 7, 3]),
        "segment_index": torch.tensor([1, 0, 0]),
    }
    advantages, _ = ADVANTAGES.call("reverse_kl", data, {"gamma": 0.5})
    # segment 0: -1 + 0.5 * 2 = 0, then 1 + 0.5 * 0 = 1
    expected = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-7)


def test_teacher_equal_to_student_gives_exactly_zero_and_rewards_change_nothing():
    data = one_row()
    data["teacher_logprobs"] = data["old_logprobs"].clone()
    for gamma in (0.0, 0.9):
        advantages, returns = reverse_kl(**data, gamma=gamma)
        assert torch.equal(advantages, torch.zeros_like(advantages))
        assert torch.equal(returns, torch.zeros_like(returns))
    data = one_row()
    shifted = dict(data, token_rewards=data["token_rewards"] + 3.0)
    assert torch.equal(reverse_kl(**data)[0], reverse_kl(**shifted)[0])


def test_the_estimator_with_the_clipped_surrogate_descends_the_reverse_kl():
    """On-policy, the surrogate's gradient with A = log pi_t - log pi_s, each token weighted by its
    probability under the student, is the gradient of KL(pi_s || pi_t) (Gu et al. 2024): the
    sum over tokens of pi_s(a) (log pi_s(a) - log pi_t(a)) (score function, E[grad log pi] = 0)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 6, dtype=torch.float64), dim=-1)
    student = torch.log_softmax(logits, dim=-1)
    # one "row" per action a (every action a sampled token), weighted by pi_s(a)
    logprobs = student.reshape(6, 1)
    old = logprobs.detach()
    mask = torch.ones(6, 1, dtype=torch.float64)
    advantages, _ = ADVANTAGES.call(
        "reverse_kl",
        {
            "token_rewards": torch.zeros(6, 1, dtype=torch.float64),
            "loss_mask": mask,
            "old_logprobs": old,
            "teacher_logprobs": teacher.reshape(6, 1),
        },
    )
    preset = get_preset("distill")
    per_token, _ = POLICY_LOSSES.call(
        preset.policy_loss,
        {"logprobs": logprobs, "old_logprobs": old, "advantages": advantages, "loss_mask": mask},
        preset.loss_kwargs,
    )
    (surrogate_grad,) = torch.autograd.grad(aggregate(per_token, old.exp()), logits, retain_graph=True)
    kl = (student.exp() * (student - teacher)).sum()
    (kl_grad,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(surrogate_grad, kl_grad)
    assert kl_grad.abs().sum() > 1e-3  # not vacuous


def test_distill_preset_is_pure_distillation():
    preset = get_preset("distill")
    assert preset.advantage == "reverse_kl"
    assert preset.kl_placement == "none" and not preset.uses_critic
    assert preset.aggregation == "token-mean" and preset.policy_loss == "ppo_clip"
    assert ADVANTAGES.hyperparameters("reverse_kl") == {"gamma": float}


@pytest.mark.parametrize("missing", ["old_logprobs", "teacher_logprobs"])
def test_the_estimator_needs_both_log_probs(missing):
    data = one_row()
    del data[missing]
    with pytest.raises(TypeError, match=missing):
        ADVANTAGES.call("reverse_kl", data)
