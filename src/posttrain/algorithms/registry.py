"""Name -> function registries for the algorithm core.

Every piece of RL math is a small pure function registered under a name, so an algorithm preset
is just a choice of names plus hyper-parameters, and configs can refer to them as strings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A mapping from names to functions of one kind (advantage estimators, policy losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@ADVANTAGES.register("gae")``."""

        def decorator(fn: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._functions[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._functions[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def call(self, name: str, data: Mapping[str, Any], hparams: Mapping[str, Any] | None = None) -> Any:
        """Call ``name`` with the batch fields it declares and the given hyper-parameters.

        ``data`` holds batch tensors (``values``, ``group_ids``, ...): a function receives only
        those its signature names, so estimators can ignore fields they do not use.
        ``hparams`` must all be accepted by the function: a misspelt hyper-parameter is an error
        naming the allowed ones, never silently ignored.
        """
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(params))
        if unknown:
            allowed = sorted(p for p in params if p not in data)
            raise TypeError(
                f"{self.kind} {name!r} got unknown hyper-parameter(s) {unknown}; allowed: {allowed}"
            )
        kwargs = {k: v for k, v in data.items() if k in params}
        kwargs.update(hparams)
        return fn(**kwargs)


ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")
AGGREGATIONS = Registry("aggregation")
