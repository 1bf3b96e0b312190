"""Policy losses: hand-computed values, autograd behaviour of the clips, and the shared on-policy gradient."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from posttrain.algorithms import losses
from posttrain.algorithms.registry import POLICY_LOSSES

DTYPE = torch.float64
ALL_LOSSES = ["ppo_clip", "gspo", "gspo_token", "cispo", "gmpo", "sapo", "reinforce", "kimi"]

EXPECTED_HPARAMS = {
    "ppo_clip": {"clip_low", "clip_high", "dual_clip", "log_ratio_clamp"},
    "gspo": {"clip_low", "clip_high", "log_ratio_clamp"},
    "gspo_token": {"clip_low", "clip_high", "log_ratio_clamp"},
    "cispo": {"clip_low", "clip_high", "log_ratio_clamp"},
    "gmpo": {"clip_low", "clip_high", "log_ratio_clamp"},
    "sapo": {"tau_pos", "tau_neg", "log_ratio_clamp"},
    "reinforce": {"is_clip", "log_ratio_clamp"},
    "kimi": {"tau", "log_ratio_clamp"},
}


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=DTYPE)


def policy_logprobs(old_logprobs: Tensor, ratios: Tensor) -> Tensor:
    """Leaf logprobs with pi_theta / pi_old == ``ratios``."""
    return (old_logprobs + torch.log(ratios)).detach().requires_grad_(True)


def grad_of(loss: Tensor, logprobs: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return grad


def random_batch(seed: int, rows: int = 4, cols: int = 6, spread: float = 0.3) -> dict[str, Tensor]:
    """Random batch with a hole in the mask, an empty row and row-constant advantages."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=gen, dtype=DTYPE) * 3 - 0.1
    logprobs = old + spread * torch.randn(rows, cols, generator=gen, dtype=DTYPE)
    mask = torch.ones(rows, cols, dtype=DTYPE)
    mask[:, 0] = 0.0  # prompt position
    mask[0, 3] = 0.0  # tool output inside a trace
    mask[1] = 0.0  # row with nothing to train on
    mask[2, -2:] = 0.0  # padding
    row_adv = torch.randn(rows, 1, generator=gen, dtype=DTYPE)
    advantages = row_adv.expand(rows, cols) * mask
    return {
        "logprobs": logprobs.requires_grad_(True),
        "old_logprobs": old,
        "advantages": advantages,
        "loss_mask": mask,
    }


# ----------------------------------------------------------------------------- contract


def test_registry_holds_all_losses_with_exact_hparam_names() -> None:
    for name in ALL_LOSSES:
        fn = POLICY_LOSSES.get(name)
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["logprobs", "old_logprobs", "advantages", "loss_mask"]
        keyword_only = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keyword_only == EXPECTED_HPARAMS[name], name


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_contract_shape_masking_and_metrics(name: str) -> None:
    batch = random_batch(0)
    # Masked positions hold values that would blow up an unmasked loss.
    batch["old_logprobs"] = torch.where(batch["loss_mask"] > 0, batch["old_logprobs"], t([[-80.0]]))
    loss, metrics = POLICY_LOSSES.call(name, batch)
    mask = batch["loss_mask"]
    assert loss.shape == mask.shape
    assert torch.isfinite(loss).all()
    assert torch.equal(loss[mask == 0], torch.zeros_like(loss[mask == 0]))
    assert torch.isfinite(loss[mask > 0]).all()
    grad = grad_of(loss, batch["logprobs"])
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    for key in ("clipfrac", "ratio_mean", "ratio_max", "ratio_min"):
        assert key in metrics, key
    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key
    # Ratio statistics only see trainable tokens (masked positions have ratio ~ e^77).
    assert metrics["ratio_max"] < 10.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extreme_log_ratios_are_clamped(name: str) -> None:
    old = t([[0.0, -1.0, -2.0]])
    logprobs = t([[-300.0, 200.0, -2.0]]).requires_grad_(True)
    advantages = t([[1.0, 1.0, 1.0]])
    loss, metrics = POLICY_LOSSES.get(name)(logprobs, old, advantages, torch.ones_like(old))
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad_of(loss, logprobs)).all()
    assert metrics["ratio_max"] <= math.exp(20.0) * (1 + 1e-9)


def test_registry_call_rejects_unknown_hparam() -> None:
    with pytest.raises(TypeError, match="clip_ratio"):
        POLICY_LOSSES.call("ppo_clip", random_batch(1), {"clip_ratio": 0.2})


# ----------------------------------------------------------------------------- ppo_clip

# One row per clip region. Columns: (ratio, advantage, expected loss, expected d loss / d logprob).
PPO_CASES = [
    (1.5, 1.0, -1.2, 0.0),  # A>0 above 1+eps: clipped, no gradient
    (1.1, 2.0, -2.2, -2.2),  # A>0 inside: -r A, gradient -r A pushes logprob up
    (0.5, 1.0, -0.5, -0.5),  # A>0 below 1-eps: pessimistic min keeps the unclipped branch
    (0.5, -1.0, 0.8, 0.0),  # A<0 below 1-eps: clipped, no gradient
    (0.9, -2.0, 1.8, 1.8),  # A<0 inside: gradient pushes logprob down
    (1.5, -1.0, 1.5, 1.5),  # A<0 above 1+eps: unclipped (no dual clip)
]


def ppo_case_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ratios = t([[c[0] for c in PPO_CASES] + [3.0]])
    advantages = t([[c[1] for c in PPO_CASES] + [5.0]])
    mask = t([[1.0] * len(PPO_CASES) + [0.0]])
    old = torch.full_like(ratios, -1.0)
    expected_loss = t([[c[2] for c in PPO_CASES] + [0.0]])
    expected_grad = t([[c[3] for c in PPO_CASES] + [0.0]])
    return policy_logprobs(old, ratios), old, advantages, mask, expected_loss, expected_grad


def test_ppo_clip_values_gradients_and_metrics_in_every_region() -> None:
    logprobs, old, advantages, mask, expected_loss, expected_grad = ppo_case_tensors()
    loss, metrics = losses.ppo_clip(logprobs, old, advantages, mask)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad_of(loss, logprobs), expected_grad)
    n = len(PPO_CASES)
    torch.testing.assert_close(metrics["clipfrac_high"], torch.tensor(1 / n, dtype=DTYPE))
    torch.testing.assert_close(metrics["clipfrac_low"], torch.tensor(1 / n, dtype=DTYPE))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(2 / n, dtype=DTYPE))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.5, dtype=DTYPE))  # 3.0 is masked
    torch.testing.assert_close(metrics["ratio_min"], torch.tensor(0.5, dtype=DTYPE))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(6.0 / n, dtype=DTYPE))
    assert "dual_clipfrac" not in metrics


def test_ppo_clip_higher_widens_only_the_upper_side() -> None:
    old = t([[-1.0, -1.0]])
    logprobs = policy_logprobs(old, t([[1.25, 0.75]]))
    advantages = t([[1.0, -1.0]])
    loss, metrics = losses.ppo_clip(logprobs, old, advantages, torch.ones_like(old), clip_high=0.28)
    # 1.25 < 1.28: no longer clipped; 0.75 < 0.8 still clipped below.
    torch.testing.assert_close(loss, t([[-1.25, 0.8]]))
    torch.testing.assert_close(grad_of(loss, logprobs), t([[-1.25, 0.0]]))
    assert metrics["clipfrac_high"] == 0 and metrics["clipfrac_low"] == 0.5


def test_ppo_dual_clip_caps_negative_advantage_tokens() -> None:
    old = t([[-1.0, -1.0, -1.0]])
    logprobs = policy_logprobs(old, t([[4.0, 2.0, 4.0]]))
    advantages = t([[-1.0, -1.0, 1.0]])
    loss, metrics = losses.ppo_clip(logprobs, old, advantages, torch.ones_like(old), dual_clip=3.0)
    # r=4, A=-1: PPO loss 4 capped at c|A| = 3 with no gradient; r=2 stays at 2; A>0 is untouched.
    torch.testing.assert_close(loss, t([[3.0, 2.0, -1.2]]))
    torch.testing.assert_close(grad_of(loss, logprobs), t([[0.0, 2.0, 0.0]]))
    torch.testing.assert_close(metrics["dual_clipfrac"], torch.tensor(1 / 3, dtype=DTYPE))
    plain, _ = losses.ppo_clip(logprobs, old, advantages, torch.ones_like(old))
    assert plain[0, 0].item() == pytest.approx(4.0)


def test_ppo_dual_clip_must_exceed_one() -> None:
    batch = random_batch(2)
    with pytest.raises(ValueError, match="dual_clip"):
        POLICY_LOSSES.call("ppo_clip", batch, {"dual_clip": 1.0})


@settings(max_examples=60, deadline=None)
@given(
    log_ratio=st.floats(-3.0, 3.0),
    advantage=st.floats(-5.0, 5.0),
    clip_low=st.floats(0.0, 0.9),
    clip_high=st.floats(0.0, 2.0),
)
def test_ppo_clip_is_pessimistic_bound_on_plain_surrogate(
    log_ratio: float, advantage: float, clip_low: float, clip_high: float
) -> None:
    old = t([[-1.0]])
    logprobs = old + log_ratio
    adv = t([[advantage]])
    loss, _ = losses.ppo_clip(
        logprobs, old, adv, torch.ones_like(old), clip_low=clip_low, clip_high=clip_high
    )
    ratio = math.exp(log_ratio)
    assert loss.item() >= -ratio * advantage - 1e-9
    clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)
    assert loss.item() >= -clipped_ratio * advantage - 1e-9


# ----------------------------------------------------------------------------- cispo


def test_cispo_values_and_gradient_flows_through_clipped_tokens() -> None:
    old = t([[-1.0, -2.0, -0.5, -1.0]])
    ratios = t([[1.5, 1.1, 0.2, 1.5]])
    logprobs = policy_logprobs(old, ratios)
    advantages = t([[1.0, 2.0, -1.0, 1.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = losses.cispo(logprobs, old, advantages, mask, clip_high=0.2)
    weights = t([[1.2, 1.1, 0.2, 0.0]])  # 1.5 capped at 1.2; no lower clip by default
    lp = logprobs.detach()
    torch.testing.assert_close(loss, -weights * advantages * lp)
    grad = grad_of(loss, logprobs)
    # The clipped token (r=1.5, A>0) still gets a gradient, of size the capped weight.
    torch.testing.assert_close(grad, -weights * advantages)
    assert grad[0, 0] < 0
    ppo_loss, _ = losses.ppo_clip(logprobs, old, advantages, mask)
    assert grad_of(ppo_loss, logprobs)[0, 0] == 0
    torch.testing.assert_close(metrics["clipfrac_high"], torch.tensor(1 / 3, dtype=DTYPE))
    assert metrics["clipfrac_low"] == 0


def test_cispo_lower_clip_when_asked() -> None:
    old = t([[-1.0]])
    logprobs = policy_logprobs(old, t([[0.2]]))
    loss, metrics = losses.cispo(logprobs, old, t([[-1.0]]), torch.ones_like(old), clip_low=0.5)
    torch.testing.assert_close(grad_of(loss, logprobs), t([[0.5]]))
    assert metrics["clipfrac_low"] == 1


# ----------------------------------------------------------------------------- sapo


def test_sapo_values_and_soft_gate_gradient() -> None:
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    ratios = t([[1.0, 1.5, 1.0, 0.5]])
    logprobs = policy_logprobs(old, ratios)
    advantages = t([[2.0, 1.0, -1.0, -2.0]])
    mask = torch.ones_like(old)
    tau_pos, tau_neg = 1.0, 1.05
    loss, metrics = losses.sapo(logprobs, old, advantages, mask)
    taus = [tau_pos, tau_pos, tau_neg, tau_neg]
    expected_loss, expected_grad, gate_weights = [], [], []
    for r, a, tau in zip(ratios[0].tolist(), advantages[0].tolist(), taus):
        sig = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
        expected_loss.append(-sig * 4.0 / tau * a)
        # d/d logprob of f(r) = 4 sig (1 - sig) * r
        expected_grad.append(-4.0 * sig * (1.0 - sig) * r * a)
        gate_weights.append(4.0 * sig * (1.0 - sig))
    torch.testing.assert_close(loss, t([expected_loss]))
    torch.testing.assert_close(grad_of(loss, logprobs), t([expected_grad]))
    torch.testing.assert_close(metrics["soft_gate_mean"], torch.tensor(sum(gate_weights) / 4, dtype=DTYPE))
    # Off-policy tokens are damped relative to the plain policy gradient -r A.
    assert abs(expected_grad[1]) < 1.5 * 1.0


def test_sapo_negative_advantages_decay_faster() -> None:
    old = t([[-1.0, -1.0]])
    logprobs = policy_logprobs(old, t([[2.0, 2.0]]))
    loss, _ = losses.sapo(logprobs, old, t([[1.0, -1.0]]), torch.ones_like(old), tau_pos=1.0, tau_neg=3.0)
    grad = grad_of(loss, logprobs)
    assert grad[0, 0] < 0 < grad[0, 1]
    assert abs(grad[0, 1]) < abs(grad[0, 0])


# ----------------------------------------------------------------------------- reinforce, kimi


def test_reinforce_values_and_truncated_importance_weight() -> None:
    old = t([[-1.0, -2.0, -0.5]])
    logprobs = policy_logprobs(old, t([[3.0, 0.5, 1.0]]))
    advantages = t([[1.0, -2.0, 4.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, metrics = losses.reinforce(logprobs, old, advantages, mask)
    lp = logprobs.detach()
    torch.testing.assert_close(loss, -advantages * lp * mask)
    torch.testing.assert_close(grad_of(loss, logprobs), -advantages * mask)
    assert metrics["clipfrac"] == 0

    loss, metrics = losses.reinforce(logprobs, old, advantages, mask, is_clip=2.0)
    weights = t([[2.0, 0.5, 0.0]])  # min(r, 2) on trainable tokens
    torch.testing.assert_close(loss, -weights * advantages * lp)
    torch.testing.assert_close(grad_of(loss, logprobs), -weights * advantages)
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5, dtype=DTYPE))


def test_kimi_values_and_gradient() -> None:
    old = t([[-1.0, -2.0, -0.5]])
    log_ratios = t([[0.0, 0.4, -0.2]])
    logprobs = (old + log_ratios).requires_grad_(True)
    advantages = t([[1.5, -1.0, 0.5]])
    mask = t([[1.0, 1.0, 0.0]])
    tau = 0.5
    loss, _ = losses.kimi(logprobs, old, advantages, mask, tau=tau)
    # 0.5 (A - tau log r)^2: 0.5 * 1.5^2 = 1.125; 0.5 * (-1 - 0.2)^2 = 0.72
    torch.testing.assert_close(loss, t([[1.125, 0.72, 0.0]]))
    # d/d logprob = -tau (A - tau log r): -0.5 * 1.5 = -0.75 (on-policy: -A tau); -0.5 * -1.2 = 0.6
    torch.testing.assert_close(grad_of(loss, logprobs), t([[-0.75, 0.6, 0.0]]))


# ----------------------------------------------------------------------------- gspo, gspo_token


def test_gspo_values_clip_and_empty_row() -> None:
    old = t([[-1.0, -2.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -2.0, -1.0]])
    # Row 0: token log-ratios 0.1, (masked 5.0), 0.3 -> mean 0.2, s = e^0.2, clipped for A>0.
    # Row 1: empty. Row 2: log-ratios 1e-4 and -1e-4 -> s = 1, per-token advantages 1 and 3 -> A = 2.
    log_ratios = t([[0.1, 5.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-4, -1e-4, 0.0, 0.0]])
    logprobs = (old + log_ratios).requires_grad_(True)
    mask = t([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    advantages = t([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    loss, metrics = losses.gspo(logprobs, old, advantages, mask)
    row0 = -(1.0 + 4e-4) * 1.0
    torch.testing.assert_close(loss, t([[row0, 0, row0, 0], [0, 0, 0, 0], [-2.0, -2.0, 0, 0]]))
    grad = grad_of(loss, logprobs)
    assert torch.equal(grad[0], torch.zeros(4, dtype=DTYPE))  # clipped sequence: no gradient
    # Unclipped row of n=2 tokens: d(sum_t loss)/d lp_u = n * (-A s / n) = -A s = -2.
    torch.testing.assert_close(grad[2], t([[-2.0, -2.0, 0.0, 0.0]])[0])
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5, dtype=DTYPE))  # 2 of 4 tokens
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(math.exp(0.2), dtype=DTYPE))


def test_gspo_negative_advantage_clips_below() -> None:
    old = t([[-1.0, -1.0]])
    logprobs = (old + t([[-0.01, -0.01]])).requires_grad_(True)
    loss, metrics = losses.gspo(logprobs, old, t([[-1.0, -1.0]]), torch.ones_like(old))
    torch.testing.assert_close(loss, t([[1.0 - 3e-4, 1.0 - 3e-4]]))
    assert torch.equal(grad_of(loss, logprobs), torch.zeros_like(old))
    assert metrics["clipfrac_low"] == 1 and metrics["clipfrac_high"] == 0


def seq_mean_token_mean(loss: Tensor, mask: Tensor) -> Tensor:
    """Each row's token mean, averaged over rows: weights constant along a row."""
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.2, 0.2), (1e3, 1e3)])
def test_gspo_token_matches_gspo_with_row_constant_advantages(seed: int, clip: tuple[float, float]) -> None:
    batch = random_batch(seed, spread=0.05)
    hparams = {"clip_low": clip[0], "clip_high": clip[1]}
    seq_loss, seq_metrics = POLICY_LOSSES.call("gspo", batch, hparams)
    tok_loss, tok_metrics = POLICY_LOSSES.call("gspo_token", batch, hparams)
    torch.testing.assert_close(tok_loss, seq_loss)
    mask = batch["loss_mask"]
    seq_grad = grad_of(seq_mean_token_mean(seq_loss, mask), batch["logprobs"])
    tok_grad = grad_of(seq_mean_token_mean(tok_loss, mask), batch["logprobs"])
    torch.testing.assert_close(tok_grad, seq_grad)
    for key in ("clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean"):
        torch.testing.assert_close(tok_metrics[key], seq_metrics[key])
    if clip[0] >= 1e3:
        assert seq_grad.abs().sum() > 0  # the comparison is not vacuous


def test_gspo_token_uses_per_token_advantages() -> None:
    old = t([[-1.0, -1.0]])
    logprobs = old.clone().requires_grad_(True)
    advantages = t([[1.0, -3.0]])
    loss, _ = losses.gspo_token(logprobs, old, advantages, torch.ones_like(old))
    torch.testing.assert_close(loss, -advantages)
    torch.testing.assert_close(grad_of(loss, logprobs), -advantages)


# ----------------------------------------------------------------------------- gmpo


def test_gmpo_values_and_log_space_clip() -> None:
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    log_ratios = t([[0.5, -0.2, 9.0], [0.5, -0.6, 0.0], [0.3, 0.3, 0.0]])
    logprobs = (old + log_ratios).requires_grad_(True)
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    advantages = t([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = losses.gmpo(logprobs, old, advantages, mask)
    # A>0: min(0.5, 0.4) = 0.4 and min(-0.2, -0.2) -> mean 0.1; objective e^0.1.
    # A<0: -min(-0.5, -0.4) = 0.5 and -min(0.6, 0.4) = -0.4 -> mean 0.05; objective -e^0.05.
    l0, l1 = -math.exp(0.1), math.exp(0.05)
    torch.testing.assert_close(loss, t([[l0, l0, 0.0], [l1, l1, 0.0], [0.0, 0.0, 0.0]]))
    grad = grad_of(seq_mean_token_mean(loss, mask) * 3, logprobs)  # = sum of the rows' losses
    # Clipped tokens (0.5 with A>0, -0.6 with A<0) get no gradient; others get -A e^mean / n.
    expected = t([[0.0, -math.exp(0.1) / 2, 0.0], [math.exp(0.05) / 2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(metrics["clipfrac_high"], torch.tensor(0.25, dtype=DTYPE))
    torch.testing.assert_close(metrics["clipfrac_low"], torch.tensor(0.25, dtype=DTYPE))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(math.exp(0.5), dtype=DTYPE))


# ----------------------------------------------------------------------------- shared surrogate


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "reinforce", "gmpo"])
def test_on_policy_gradient_is_the_plain_policy_gradient(name: str) -> None:
    """At r = 1 every loss has gradient -A * grad log pi per token.

    For token-level losses this holds token by token. For sequence-level ones (gspo, gmpo) the
    row's loss sits on each of its n tokens, d(row loss)/d lp_t = -A / n, so the gradient of the
    summed per-token loss is again -A on each trainable token.
    """
    batch = random_batch(3)
    batch["logprobs"] = batch["old_logprobs"].clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES.call(name, batch)
    grad = grad_of(loss, batch["logprobs"])
    torch.testing.assert_close(grad, -batch["advantages"] * batch["loss_mask"])
    assert metrics["clipfrac"] == 0
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0, dtype=DTYPE))


def test_kimi_on_policy_gradient_is_tau_times_policy_gradient() -> None:
    batch = random_batch(4)
    batch["logprobs"] = batch["old_logprobs"].clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES.call("kimi", batch, {"tau": 0.3})
    torch.testing.assert_close(grad_of(loss, batch["logprobs"]), -0.3 * batch["advantages"])


def test_on_policy_gradient_through_a_model() -> None:
    """Same check through a parameterised policy: grad(loss) == grad(-A * log pi) for ppo_clip."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=DTYPE, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = t([[0, 1, 1, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    advantages = t([[0.7] * 5, [-1.3] * 5, [0.2] * 5]) * mask
    loss, _ = losses.ppo_clip(logprobs, logprobs.detach(), advantages, mask)
    (grad_loss,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad((-advantages * logprobs * mask).sum(), logits)
    torch.testing.assert_close(grad_loss, grad_pg)
