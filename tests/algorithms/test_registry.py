"""Registry: register / get / call, the field-passing contract and the error messages."""

from __future__ import annotations

import functools

import pytest
import torch

import posttrain.algorithms  # noqa: F401  (registers every built-in function)
from posttrain.algorithms.registry import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Registry,
)


@pytest.fixture
def registry() -> Registry:
    reg = Registry("widget")

    @reg.register("scale")
    def scale(values, mask=None, *, factor: float = 2.0, offset: float = 0.0):
        return values * factor + offset, mask

    @reg.register("count")
    def count(values):
        return len(values)

    return reg


def test_register_returns_the_function_unchanged() -> None:
    reg = Registry("widget")

    def fn(x):
        return x + 1

    assert reg.register("plus_one")(fn) is fn
    assert reg.get("plus_one") is fn


def test_names_are_sorted_and_membership_works(registry: Registry) -> None:
    assert registry.names() == ["count", "scale"]
    assert "scale" in registry and "count" in registry
    assert "missing" not in registry
    assert 3 not in registry


def test_registering_a_name_twice_is_an_error_and_keeps_the_first(registry: Registry) -> None:
    first = registry.get("scale")
    with pytest.raises(ValueError, match=r"widget 'scale' is already registered"):

        @registry.register("scale")
        def other(values):
            return values

    assert registry.get("scale") is first


def test_unknown_name_error_names_the_kind_and_the_choices(registry: Registry) -> None:
    with pytest.raises(KeyError) as info:
        registry.get("scael")
    message = str(info.value)
    assert "unknown widget 'scael'" in message
    assert "['count', 'scale']" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_call_of_an_unknown_name_raises_the_same_key_error(registry: Registry) -> None:
    with pytest.raises(KeyError, match="unknown widget 'nope'"):
        registry.call("nope", {"values": torch.ones(2)})


def test_call_passes_only_the_fields_a_function_names(registry: Registry) -> None:
    data = {"values": torch.tensor([1.0, 2.0]), "mask": torch.tensor([1.0, 0.0]), "group_ids": 7}
    out, mask = registry.call("scale", data)
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))
    assert mask is data["mask"]
    # ``count`` names only ``values``: ``mask`` and ``group_ids`` are not passed (no TypeError)
    assert registry.call("count", data) == 2


def test_call_applies_hyper_parameters(registry: Registry) -> None:
    data = {"values": torch.tensor([1.0, 2.0])}
    out, mask = registry.call("scale", data, {"factor": 3.0, "offset": -1.0})
    torch.testing.assert_close(out, torch.tensor([2.0, 5.0]))
    assert mask is None  # optional field absent from data: the default is used
    out, _ = registry.call("scale", data, None)
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))


def test_unknown_hyper_parameter_is_rejected_naming_the_allowed_ones(registry: Registry) -> None:
    data = {"values": torch.tensor([1.0]), "mask": torch.tensor([1.0])}
    with pytest.raises(TypeError) as info:
        registry.call("scale", data, {"factr": 3.0, "zeta": 1})
    message = str(info.value)
    assert "widget 'scale' got unknown hyper-parameter(s) ['factr', 'zeta']" in message
    # batch fields present in ``data`` are not offered as hyper-parameters
    assert "allowed: ['factor', 'offset']" in message


def test_function_is_not_called_when_a_hyper_parameter_is_unknown() -> None:
    reg = Registry("widget")
    calls = []

    @reg.register("record")
    def record(values, *, factor: float = 1.0):
        calls.append(factor)
        return values

    with pytest.raises(TypeError):
        reg.call("record", {"values": 1}, {"factro": 2.0})
    assert calls == []
    assert reg.call("record", {"values": 1}, {"factor": 2.0}) == 1
    assert calls == [2.0]


def test_call_sees_through_functools_wraps() -> None:
    reg = Registry("widget")

    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    @reg.register("wrapped")
    @logged
    def wrapped(values, *, factor: float = 1.0):
        return values * factor

    assert reg.call("wrapped", {"values": 2.0, "unused": 1}, {"factor": 4.0}) == 8.0
    with pytest.raises(TypeError, match="allowed: \\['factor'\\]"):
        reg.call("wrapped", {"values": 2.0}, {"scale": 4.0})


def test_registries_are_separate() -> None:
    a, b = Registry("a"), Registry("b")
    a.register("x")(lambda: 1)
    assert "x" in a and "x" not in b
    with pytest.raises(KeyError, match="unknown b 'x'; choose one of \\[\\]"):
        b.get("x")


def test_built_in_registries_hold_the_documented_names() -> None:
    assert {"gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "grpo_passk", "opo"} <= set(
        ADVANTAGES.names()
    )
    assert {"ppo_clip", "gspo", "gspo_token", "cispo", "gmpo", "sapo", "reinforce", "kimi"} <= set(
        POLICY_LOSSES.names()
    )
    assert {"k1", "k2", "k3", "k1_st", "k3_st"} <= set(KL_ESTIMATORS.names())
    assert {
        "token-mean",
        "token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "episode-mean",
    } <= set(AGGREGATIONS.names())
    assert ADVANTAGES.kind == "advantage estimator" and POLICY_LOSSES.kind == "policy loss"


def test_built_in_policy_loss_rejects_a_misspelt_clip() -> None:
    logprobs = torch.zeros(1, 3)
    data = {
        "logprobs": logprobs,
        "old_logprobs": logprobs,
        "advantages": torch.ones(1, 3),
        "loss_mask": torch.ones(1, 3),
    }
    with pytest.raises(
        TypeError, match=r"policy loss 'ppo_clip' got unknown hyper-parameter\(s\) \['clip_lo'\]"
    ):
        POLICY_LOSSES.call("ppo_clip", data, {"clip_lo": 0.1})
    loss, metrics = POLICY_LOSSES.call("ppo_clip", data, {"clip_low": 0.1})
    # on-policy, A = 1: loss = -r A = -1 on every token
    torch.testing.assert_close(loss, -torch.ones(1, 3))
    assert metrics["clipfrac"].item() == 0.0


def test_built_in_advantage_ignores_batch_fields_it_does_not_use() -> None:
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    data = {
        "token_rewards": rewards,
        "loss_mask": mask,
        "group_ids": torch.tensor([0, 0]),
        "values": torch.zeros(2, 2),  # not a parameter of rloo: must not be passed
        "old_logprobs": torch.zeros(2, 2),
    }
    advantages, returns = ADVANTAGES.call("rloo", data)
    # leave-one-out: row 0 scores 1 - 0 = 1, row 1 scores 0 - 1 = -1
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(returns, advantages)


def test_hyperparameters_are_the_keyword_only_non_tensor_parameters() -> None:
    # tensors (values, group_ids, bootstrap_values, ...) are batch fields, not settings
    assert ADVANTAGES.hyperparameters("gae") == {"gamma": float, "lam": float, "whiten": bool}
    assert set(POLICY_LOSSES.hyperparameters("ppo_clip")) == {
        "clip_low",
        "clip_high",
        "dual_clip",
        "log_ratio_clamp",
    }
    assert KL_ESTIMATORS.hyperparameters("k3") == {}
    assert "num_tokens" not in AGGREGATIONS.hyperparameters("token-mean")  # a count that may be a tensor


def test_hyperparameters_of_unannotated_functions_are_any(registry: Registry) -> None:
    from typing import Any

    assert registry.hyperparameters("scale") == {"factor": float, "offset": float}
    reg = Registry("widget")
    reg.register("bare")(lambda values, *, k=1, mask: values)
    assert reg.hyperparameters("bare") == {"k": Any, "mask": Any}
    with pytest.raises(
        TypeError, match=r"widget 'bare' got unknown hyper-parameter\(s\) \['j'\]; allowed: \['k', 'mask'\]"
    ):
        reg.check_hyperparameters("bare", {"j": 1})
