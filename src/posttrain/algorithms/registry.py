"""Name -> function registries for the algorithm core.

Every piece of RL math is a small pure function registered under a name, so an algorithm preset
is just a choice of names plus hyper-parameters, and configs can refer to them as strings.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _mentions_tensor(hint: Any) -> bool:
    """True for ``Tensor``, ``Tensor | None`` and other hints with a tensor inside (also as text)."""
    if isinstance(hint, str):
        return "Tensor" in hint
    return hint is torch.Tensor or any(_mentions_tensor(arg) for arg in typing.get_args(hint))


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

    def hyperparameters(self, name: str) -> dict[str, Any]:
        """The settings a config may give ``name``, each with its type hint (``Any`` if none): its
        keyword-only parameters that are not tensors (tensors such as ``values`` or ``group_ids``
        are batch fields, passed by ``call`` from the data)."""
        fn = self.get(name)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve (a plugin's): judged by its text
            hints = {}
        found = {}
        for param in inspect.signature(fn).parameters.values():
            hint = hints.get(param.name, param.annotation)
            if param.kind is param.KEYWORD_ONLY and not _mentions_tensor(hint):
                found[param.name] = Any if hint is param.empty or isinstance(hint, str) else hint
        return found

    def check_hyperparameters(self, name: str, hparams: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` naming the ``hparams`` that ``name`` does not take and those it does."""
        allowed = self.hyperparameters(name)
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise TypeError(
                f"{self.kind} {name!r} got unknown hyper-parameter(s) {unknown}; allowed: {sorted(allowed)}"
            )

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
        self.check_hyperparameters(name, hparams)
        kwargs = {k: v for k, v in data.items() if k in params}
        kwargs.update(hparams)
        return fn(**kwargs)


ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")
AGGREGATIONS = Registry("aggregation")
