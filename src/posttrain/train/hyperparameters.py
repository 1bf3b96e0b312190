"""The algorithm's hyper-parameters (``algo.advantage_kwargs``, ``algo.loss_kwargs``), checked with the
config: against the signature of the registered function that receives them, and against the values
that make sense for each name.

Without this a misspelt or nonsensical hyper-parameter surfaces at the first RL step, after the model
load, the warm-start and the first evaluation (``Registry.call`` rejects unknown names, but only when
it is called).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.algorithms.advantages import GRPO_SCALES
from posttrain.algorithms.presets import AlgorithmPreset
from posttrain.algorithms.registry import ADVANTAGES, POLICY_LOSSES, Registry


def _positive(value: Any) -> bool:
    return value is None or value > 0


def _unit_interval(value: Any) -> bool:
    return 0.0 <= value <= 1.0


# What a hyper-parameter must be, by name: a name means the same in every function that takes it.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "clip_low": (_positive, "> 0 (the clip range below ratio 1; 0 stops the update, < 0 inverts the clip)"),
    "clip_high": (_positive, "> 0 (the clip range above ratio 1; 0 stops the update, < 0 inverts the clip)"),
    "dual_clip": (lambda v: v is None or v > 1, "> 1 (the cap on a negative advantage's loss) or null"),
    "is_clip": (_positive, "> 0 (the cap on the importance weight) or null"),
    "log_ratio_clamp": (_positive, "> 0 (the bound on |log ratio| before exp)"),
    "tau": (_positive, "> 0 (the temperature of the KL-regularised target)"),
    "tau_pos": (_positive, "> 0 (the gate's steepness for positive advantages)"),
    "tau_neg": (_positive, "> 0 (the gate's steepness for negative advantages)"),
    "epsilon": (_positive, "> 0 (added to a standard deviation before dividing by it)"),
    "gamma": (_unit_interval, "in [0, 1] (a discount)"),
    "lam": (_unit_interval, "in [0, 1] (GAE's lambda)"),
    # grpo's scale names a standard deviation; grpo_passk's is a bool, checked by its type
    "scale": (lambda v: not isinstance(v, str) or v in GRPO_SCALES, f"one of {list(GRPO_SCALES)}"),
}


def _matches(value: Any, hint: Any) -> bool:
    """True when ``value`` fits the type hint ``hint`` (float, int, bool, str, unions, None, Any)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:  # an int is a float, a bool is not (YAML's `true` is no clip range)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "null")


def _yaml_number_hint(value: Any) -> str:
    """YAML 1.1 reads ``4e-4`` (no dot) as text: say how to write it as a number."""
    try:
        number = float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    if number is None or "e" not in value.lower():
        return ""
    mantissa, _, exponent = value.lower().partition("e")
    dotted = mantissa if "." in mantissa else mantissa + ".0"
    return f"; YAML reads {value} as text: write {dotted}e{exponent}"


def _unknown_message(registry: Registry, name: str, given: Mapping[str, Any], key: str) -> str | None:
    """The message for hyper-parameters ``name`` does not take (with a guess at the meant one), or None."""
    try:
        registry.check_hyperparameters(name, given)
    except TypeError as error:
        allowed = registry.hyperparameters(name)
        unknown = sorted(set(given) - set(allowed))
        close = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: {error}{hint}; fix or drop {unknown[0]!r}"
    return None


def _value_message(kind: str, name: str, param: str, value: Any, hint: Any, key: str) -> str | None:
    """The message for a value of the wrong type, not finite, or out of its range, or None."""
    where = f"{key}.{param}: {kind} {name!r}"
    if not _matches(value, hint):
        message = f"{where} needs {param} to be a {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        return message + _yaml_number_hint(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} needs {param} to be a finite number, got {value!r}"
    test, expected = RANGES.get(param, (None, ""))
    try:
        in_range = test is None or test(value)
    except TypeError:  # a value of a type the function's (missing) annotation did not rule out
        in_range = False
    if not in_range:
        return f"{where} needs {param} {expected}, got {value!r}"
    return None


def check_hyperparameters(preset: AlgorithmPreset) -> None:
    """Raise ``ValueError`` naming the config key when ``preset``'s advantage or loss hyper-parameters
    are not taken by their function, have the wrong type, or are out of range."""
    for registry, name, given, key in (
        (ADVANTAGES, preset.advantage, preset.advantage_kwargs, "algo.advantage_kwargs"),
        (POLICY_LOSSES, preset.policy_loss, preset.loss_kwargs, "algo.loss_kwargs"),
    ):
        unknown = _unknown_message(registry, name, given, key)
        if unknown:
            raise ValueError(unknown)
        hints = registry.hyperparameters(name)
        for param, value in given.items():
            bad = _value_message(registry.kind, name, param, value, hints[param], key)
            if bad:
                raise ValueError(bad)
