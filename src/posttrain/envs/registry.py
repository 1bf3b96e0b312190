"""Environments by name: a built-in one (``envs/builtin``) or user code named by import path."""

from __future__ import annotations

import functools
from typing import Any

from posttrain.envs.base import EnvFactory, TextEnv
from posttrain.envs.guard import Guard
from posttrain.envs.tools import ToolEnv
from posttrain.plugins import load_from_spec


class EnvSpecError(ValueError):
    """An environment named by a config could not be resolved or built."""


def builtin_envs() -> dict[str, Any]:
    from posttrain.envs.builtin import ENVS

    return dict(ENVS)


def env_factory(spec: str, options: dict[str, Any] | None = None, guard: Guard | None = None) -> EnvFactory:
    """A zero-argument factory of fresh environments for ``spec`` built with ``options``.

    ``spec`` is a built-in name or ``'module:Class'`` / ``'path/file.py:Class'`` (any callable that
    returns a ``TextEnv``). One instance is built here, so bad options fail now, naming the fix.
    With a ``guard``, every environment built checks its tool calls with it (a ``ToolEnv`` only).
    """
    options = dict(options or {})
    builtins = builtin_envs()
    if spec in builtins:
        make = builtins[spec]
    elif ":" in spec:
        hint = f"give a built-in environment ({', '.join(sorted(builtins))}) or 'package.module:Class'"
        _, make = load_from_spec(spec, kind="environment", error=EnvSpecError, hint=hint)
    else:
        raise EnvSpecError(
            f"env.name: unknown environment {spec!r}; built-in: {sorted(builtins)}, "
            "or give your own as 'package.module:Class' or 'path/to/file.py:Class'"
        )
    if not callable(make):
        raise EnvSpecError(f"env.name: {spec!r} is a {type(make).__name__}, not a class or factory")
    try:
        probe = make(**options)
    except TypeError as error:
        raise EnvSpecError(f"env.options: {spec!r} does not accept {sorted(options)}: {error}") from error
    except ValueError as error:  # an accepted option with a bad value, e.g. an unknown call_style
        raise EnvSpecError(f"env.options: {spec!r} rejected {options}: {error}") from error
    if not isinstance(probe, TextEnv):
        raise EnvSpecError(
            f"env.name: {spec!r} built a {type(probe).__name__}, which lacks reset/step/summary "
            "(see posttrain.envs.base.TextEnv)"
        )
    if guard is None:
        return functools.partial(make, **options)
    if not isinstance(probe, ToolEnv):
        raise EnvSpecError(
            f"env.guard: {spec!r} is a {type(probe).__name__}, not a ToolEnv, so its tool calls cannot be "
            "guarded; derive it from posttrain.envs.tools.ToolEnv or drop env.guard"
        )
    return functools.partial(_guarded, make, options, guard)


def _guarded(make: Any, options: dict[str, Any], guard: Guard) -> TextEnv:
    env = make(**options)
    env.guard = guard
    return env  # type: ignore[no-any-return]
