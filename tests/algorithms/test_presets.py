import pytest
import torch

import posttrain.algorithms  # noqa: F401  (registers everything)
from posttrain.algorithms.aggregate import aggregate, token_weights
from posttrain.algorithms.presets import PRESETS, get_preset
from posttrain.algorithms.registry import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

ISSUE_PRESETS = {
    "ppo",
    "grpo",
    "dr_grpo",
    "dapo",
    "gspo",
    "cispo",
    "gmpo",
    "sapo",
    "rloo",
    "reinforce_pp",
    "kimi",
    "distill",
}


def _toy_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    loss_mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float
    )
    rewards = torch.zeros(4, 5)
    rewards[0, 3], rewards[1, 4], rewards[2, 3], rewards[3, 2] = 1.0, 0.0, 1.0, 0.0
    return {
        "token_rewards": rewards,
        "loss_mask": loss_mask,
        "values": torch.randn(4, 5) * loss_mask,
        "group_ids": torch.tensor([0, 0, 1, 1]),
        "episode_ids": torch.arange(4),
        "segment_index": torch.zeros(4, dtype=torch.long),
        # on-policy distillation's fields: the teacher disagrees with the policy by 0.3 nats here
        "old_logprobs": -loss_mask,
        "teacher_logprobs": -1.3 * loss_mask,
    }


def test_every_issue_preset_exists_and_names_registered_functions():
    assert set(PRESETS) >= ISSUE_PRESETS
    for preset in PRESETS.values():
        assert preset.advantage in ADVANTAGES, preset.name
        assert preset.policy_loss in POLICY_LOSSES, preset.name
        assert preset.kl_estimator in KL_ESTIMATORS, preset.name
        assert preset.aggregation in AGGREGATIONS, preset.name
        assert preset.paper
        assert preset.kl_placement in ("reward", "loss", "none")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_hyperparameters_are_accepted_by_its_functions(name):
    preset = get_preset(name)
    data = _toy_batch()
    advantages, returns = ADVANTAGES.call(preset.advantage, data, preset.advantage_kwargs)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    logprobs = (torch.randn(4, 5) * 0.1 - 1.0).requires_grad_()
    per_token, metrics = POLICY_LOSSES.call(
        preset.policy_loss,
        {
            "logprobs": logprobs,
            "old_logprobs": logprobs.detach() + 0.05,
            "advantages": advantages,
            "loss_mask": data["loss_mask"],
        },
        preset.loss_kwargs,
    )
    weights = token_weights(
        data["loss_mask"], preset.aggregation, episode_ids=data["episode_ids"], constant=4.0
    )
    loss = aggregate(per_token, weights)
    loss.backward()
    assert torch.isfinite(loss)
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[data["loss_mask"] == 0] == 0).all()


@pytest.mark.parametrize("name", ["ppo", "grpo", "gspo"])
def test_ppo_grpo_gspo_share_one_per_token_surrogate(name):
    """On-policy (ratio 1) the preset's aggregated loss has the gradient of sum_t w_t * (-A_t log pi_t):
    the three algorithms differ only in where A comes from, where the ratio lives and the weights w."""
    preset = get_preset(name)
    data = _toy_batch()
    advantages, _ = ADVANTAGES.call(preset.advantage, data, preset.advantage_kwargs)
    weights = token_weights(data["loss_mask"], preset.aggregation, episode_ids=data["episode_ids"])
    base = torch.randn(4, 5) * 0.3 - 1.0

    logprobs = base.clone().requires_grad_()
    per_token, _ = POLICY_LOSSES.call(
        preset.policy_loss,
        {
            "logprobs": logprobs,
            "old_logprobs": base,
            "advantages": advantages,
            "loss_mask": data["loss_mask"],
        },
        preset.loss_kwargs,
    )
    aggregate(per_token, weights).backward()

    surrogate_logprobs = base.clone().requires_grad_()
    aggregate(-advantages * surrogate_logprobs * data["loss_mask"], weights).backward()
    assert advantages.abs().sum() > 0  # the check is not vacuous
    torch.testing.assert_close(logprobs.grad, surrogate_logprobs.grad)


def test_with_overrides_merges_kwargs_and_rejects_unknown_fields():
    ppo = get_preset("ppo")
    changed = ppo.with_overrides(loss_kwargs={"clip_high": 0.3}, kl_coef=0.0)
    assert changed.loss_kwargs == {"clip_low": 0.2, "clip_high": 0.3}
    assert changed.kl_coef == 0.0 and ppo.kl_coef == 0.01
    with pytest.raises(KeyError, match="clip_hgh|unknown preset field"):
        ppo.with_overrides(clip_hgh=0.3)
    with pytest.raises(KeyError, match="choose one of"):
        get_preset("ppo2")


def test_to_dict_round_trips_through_yaml():
    yaml = pytest.importorskip("yaml")
    for preset in PRESETS.values():
        assert type(preset)(**yaml.safe_load(yaml.safe_dump(preset.to_dict()))) == preset


def test_another_function_starts_from_its_own_defaults_not_the_presets_kwargs():
    grpo = get_preset("grpo")
    # GRPO's clip range and group scale belong to ppo_clip and grpo: sapo and rloo take neither
    assert grpo.with_overrides(policy_loss="sapo").loss_kwargs == {}
    assert grpo.with_overrides(advantage="rloo").advantage_kwargs == {}
    assert grpo.with_overrides(policy_loss="sapo", loss_kwargs={"tau_pos": 2.0}).loss_kwargs == {
        "tau_pos": 2.0
    }
    # the same function named again keeps the preset's values under the user's
    same = grpo.with_overrides(policy_loss="ppo_clip", loss_kwargs={"clip_high": 0.3})
    assert same.loss_kwargs == {"clip_low": 0.2, "clip_high": 0.3}
