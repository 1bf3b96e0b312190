"""Code a run folder would make posttrain import: refused unless the user says they trust it.

A run's ``config.yaml`` may name Python code by import path: reward functions
(``data.reward_fns[i].fn``), an environment (``env.name``), a guard judge (``env.guard.judge.fn``)
and a distillation router (``distill.route_fn``), each ``'package.module:name'`` or
``'path/file.py:name'``. Resuming or evaluating that folder imports them, which runs whatever
they contain; a run folder someone sent you can therefore run their code on your machine.
``posttrain train --resume`` and ``posttrain eval --model RUN`` list that code and stop unless
given ``--trust-run-code``. Built-in names are not code, and a config you pass yourself
(``--config``, ``--set``, Python) is yours: neither needs it.

The YAML is read as plain data here: validating it as a ``TrainConfig`` would already import the
environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from posttrain.plugins import spec_target
from posttrain.train.config import ConfigError, parse_overrides
from posttrain.train.config_input import merge_trees as merge_sections  # as load_config merges --set

TRUST_FLAG = "--trust-run-code"


class UntrustedCodeError(ConfigError):
    """A run folder's config names code that the user has not said they trust."""


@dataclass(frozen=True)
class CodeRef:
    """One piece of code a config names: the key, the spec as written, what importing it runs."""

    key: str
    spec: str
    target: str

    def describe(self) -> str:
        return f"{self.key} {self.spec!r} ({self.target})"


def _ref(key: str, spec: Any) -> list[CodeRef]:
    target = spec_target(spec) if isinstance(spec, str) else None
    return [CodeRef(key, spec, target)] if target is not None else []


def code_in_config(tree: Mapping[str, Any]) -> list[CodeRef]:
    """The code a config (as a plain dict, e.g. read from YAML) names; malformed parts are skipped
    (loading the config reports them)."""
    refs: list[CodeRef] = []
    data, env = tree.get("data"), tree.get("env")
    if isinstance(data, Mapping) and isinstance(data.get("reward_fns"), list):
        for index, item in enumerate(data["reward_fns"]):
            spec = item.get("fn") if isinstance(item, Mapping) else item
            refs += _ref(f"data.reward_fns[{index}].fn", spec)
    if isinstance(env, Mapping):
        refs += _ref("env.name", env.get("name"))
        guard = env.get("guard")
        judge = guard.get("judge") if isinstance(guard, Mapping) else None
        if isinstance(judge, Mapping):
            refs += _ref("env.guard.judge.fn", judge.get("fn"))
    distill = tree.get("distill")
    if isinstance(distill, Mapping):
        refs += _ref("distill.route_fn", distill.get("route_fn"))
    return refs


def untrusted_code(config_file: Path, overrides: list[str] | None = None) -> list[CodeRef]:
    """The code that loading ``config_file`` with ``overrides`` would import, less what the
    overrides name themselves (the user's own)."""
    try:
        loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # nothing readable to import from; loading the config reports the problem
    if not isinstance(loaded, dict):
        return []
    given = parse_overrides(overrides or [])
    own = {ref.spec for ref in code_in_config(given)}
    return [ref for ref in code_in_config(merge_sections(loaded, given)) if ref.spec not in own]


def check_run_code(
    config_file: Path, overrides: list[str] | None, *, trusted: bool, action: str
) -> list[CodeRef]:
    """Refuse (``UntrustedCodeError``) to go on with a run folder's config that names code, unless
    ``trusted``; returns the code it names. ``action`` says what would import it ("--resume")."""
    refs = untrusted_code(config_file, overrides)
    if refs and not trusted:
        listed = "; ".join(ref.describe() for ref in refs)
        raise UntrustedCodeError(
            f"{action} would import and run code named by {config_file}: {listed}. A run folder from "
            f"someone else can run anything this way; read that code, then pass {TRUST_FLAG} "
            "(Python: trust_run_code=True)"
        )
    return refs
