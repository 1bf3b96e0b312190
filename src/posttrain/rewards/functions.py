"""Reward functions: resolving them by name or import path, and scoring completions with them.

A reward function is a plain callable ``fn(prompt: str, completion: str, **row) -> float`` where
``row`` holds the dataset row's other fields (``answer``, ``nums``, ...; never ``prompt``). A function
with the attribute ``batched = True`` is instead called once per batch as
``fn(prompts, completions, rows) -> list[float]`` (useful for a reward model or a judge).
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from posttrain.plugins import load_from_spec
from posttrain.rewards.sandbox import python_tests
from posttrain.rewards.verifiers import arithmetic_exact, countdown, format_answer_tag, math_verify

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardFunctionError",
    "RewardSpec",
    "RewardSpecError",
    "RewardTerm",
    "resolve_reward_fn",
    "resolve_reward_specs",
    "score_completions",
]

RewardFn = Callable[..., Any]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "arithmetic_exact": arithmetic_exact,
    "countdown": countdown,
    "math_verify": math_verify,
    "format_answer_tag": format_answer_tag,
    "python_tests": python_tests,  # runs the completion with the row's hidden tests in the sandbox
}

# Row keys that are passed positionally and so must not be repeated as keyword arguments.
_POSITIONAL_KEYS = ("prompt", "completion")


class RewardSpecError(ValueError):
    """A reward function given by name or import path could not be resolved."""


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not a finite number."""

    def __init__(self, message: str, *, function_name: str, sample_index: int | None) -> None:
        super().__init__(message)
        self.function_name = function_name
        self.sample_index = sample_index


@dataclass
class RewardSpec:
    """One reward term: a built-in name, an import path (``"pkg.mod:fn"``, ``"path/file.py:fn"``)
    or a callable, and its weight in the weighted sum."""

    fn: str | Callable[..., Any]
    weight: float = 1.0


class RewardTerm(NamedTuple):
    """A resolved reward term: its metric name, the callable and its weight in the weighted sum."""

    name: str
    fn: Callable[..., Any]
    weight: float


_SPEC_HELP = (
    "give a built-in name ({builtins}), an import path 'package.module:function', "
    "or a file path 'path/to/file.py:function'"
)


def _spec_help() -> str:
    return _SPEC_HELP.format(builtins=", ".join(sorted(BUILTIN_REWARDS)))


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None)
    if name is None:  # functools.partial, callable instances
        inner = getattr(fn, "func", None)
        name = getattr(inner, "__name__", None) or type(fn).__name__
    return str(name)


def resolve_reward_fn(spec: str | Callable[..., Any]) -> tuple[str, Callable[..., Any]]:
    """Turn a reward spec into ``(name, callable)``.

    A callable passes through (name = its ``__name__``); a string is a key of ``BUILTIN_REWARDS``,
    ``"package.module:function"`` or ``"path/to/file.py:function"`` (name = the function's name).
    """
    if callable(spec):
        return _callable_name(spec), spec
    if not isinstance(spec, str):
        raise RewardSpecError(f"reward function must be a string or a callable, got {type(spec).__name__}")
    text = spec.strip()
    if text in BUILTIN_REWARDS:
        return text, BUILTIN_REWARDS[text]
    if ":" not in text:
        raise RewardSpecError(f"unknown reward function {spec!r}: {_spec_help()}")
    attribute, fn = load_from_spec(text, kind="reward function", error=RewardSpecError, hint=_spec_help())
    if not callable(fn):
        raise RewardSpecError(
            f"reward function {spec!r}: {attribute!r} is a {type(fn).__name__}, not callable; "
            "point the spec at a function (prompt, completion, **row) -> float"
        )
    return attribute, fn


def resolve_reward_specs(
    specs: Sequence[RewardSpec | str | Callable[..., Any]],
) -> list[RewardTerm]:
    """Resolve specs into the ``RewardTerm(name, fn, weight)`` list that ``score_completions`` takes.

    Bare strings and callables get weight 1.0; repeated names get suffixes ``_2``, ``_3``, ... so
    every term keeps its own per-function metric.
    """
    resolved: list[RewardTerm] = []
    seen: dict[str, int] = {}
    for spec in specs:
        reward_spec = spec if isinstance(spec, RewardSpec) else RewardSpec(spec)
        name, fn = resolve_reward_fn(reward_spec.fn)
        weight = float(reward_spec.weight)
        if not math.isfinite(weight):
            raise RewardSpecError(f"reward function {name!r}: weight must be a finite number, got {weight}")
        seen[name] = seen.get(name, 0) + 1
        resolved.append(RewardTerm(name if seen[name] == 1 else f"{name}_{seen[name]}", fn, weight))
    return resolved


def _as_score(value: Any, name: str, index: int) -> float:
    """Validate one reward value: a finite real number; bool counts as 0/1; 0-d arrays are unwrapped."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        score = float(value)
        if not math.isfinite(score):
            raise RewardFunctionError(
                f"reward function {name!r} returned {score} for sample {index}; "
                "rewards must be finite numbers (guard divisions and logs in the function)",
                function_name=name,
                sample_index=index,
            )
        return score
    raise RewardFunctionError(
        f"reward function {name!r} returned a {type(value).__name__} ({value!r:.80}) for sample {index}; "
        "it must return a float (or int/bool)",
        function_name=name,
        sample_index=index,
    )


def _row_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in _POSITIONAL_KEYS}


class _TimedOut(Exception):
    """A reward call that did not return within its time limit."""


def _call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float | None
) -> Any:
    """``fn(*args, **kwargs)``, given at most ``timeout_s`` seconds when set (see ``_call_each``)."""
    [value] = _call_each(fn, [(args, kwargs)], timeout_s)
    return value


class _CallFailed(Exception):
    """Call ``index`` of ``_call_each`` raised (or timed out): ``__cause__`` holds why."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _call_each(
    fn: Callable[..., Any], calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], timeout_s: float | None
) -> list[Any]:
    """``fn(*args, **kwargs)`` for each call, in order; raises ``_CallFailed(index)`` from the first
    call that raises (SystemExit included) or runs longer than ``timeout_s`` seconds.

    With a limit, the calls run one after another in a single daemon thread (one thread per batch,
    not per call: starting threads cost more than a cheap reward) while this thread watches the
    current call's clock; one that hangs is abandoned there (Python cannot kill a thread), so the
    trainer stops cleanly instead of waiting forever.
    """
    if timeout_s is None:
        values = []
        for index, (args, kwargs) in enumerate(calls):
            try:
                values.append(fn(*args, **kwargs))
            except (Exception, SystemExit) as error:
                raise _CallFailed(index) from error
        return values
    values = []
    failure: list[tuple[int, BaseException]] = []
    current = [(0, time.monotonic())]  # (index, start) of the running call, replaced atomically

    def target() -> None:
        for index, (args, kwargs) in enumerate(calls):
            current[0] = (index, time.monotonic())
            try:
                values.append(fn(*args, **kwargs))
            except BaseException as error:  # re-raised in the caller's thread, SystemExit included
                failure.append((index, error))
                return

    thread = threading.Thread(target=target, name="posttrain-reward", daemon=True)
    thread.start()
    while True:
        index, started = current[0]
        thread.join(max(started + timeout_s - time.monotonic(), 0.0))
        if not thread.is_alive():
            break
        if current[0] == (index, started) and time.monotonic() >= started + timeout_s:
            raise _CallFailed(index) from _TimedOut()
    if failure:
        index, error = failure[0]
        raise _CallFailed(index) from error
    return values


def _failure(name: str, error: BaseException, timeout_s: float | None, where: str) -> str:
    if isinstance(error, _TimedOut):
        return (
            f"reward function {name!r} did not return within {timeout_s:g} s {where}; fix the function "
            "or raise data.reward_timeout_s"
        )
    if isinstance(error, SystemExit):
        return f"reward function {name!r} called sys.exit({error.code!r}) {where}; return a score instead"
    return f"reward function {name!r} raised {type(error).__name__}: {error} {where}"


def _score_per_sample(
    name: str,
    fn: Callable[..., Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    rows: Sequence[dict],
    timeout_s: float | None = None,
) -> list[float]:
    calls = [
        ((prompt, completion), _row_kwargs(row))
        for prompt, completion, row in zip(prompts, completions, rows)
    ]
    try:
        values = _call_each(fn, calls, timeout_s)
    except _CallFailed as failed:
        error, index = failed.__cause__, failed.index
        assert error is not None
        raise RewardFunctionError(
            _failure(name, error, timeout_s, f"on sample {index} (prompt {prompts[index][:80]!r})"),
            function_name=name,
            sample_index=index,
        ) from error
    return [_as_score(value, name, index) for index, value in enumerate(values)]


def _score_batched(
    name: str,
    fn: Callable[..., Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    rows: Sequence[dict],
    timeout_s: float | None = None,
) -> list[float]:
    try:
        values = _call(fn, (list(prompts), list(completions), list(rows)), {}, timeout_s)
    except _CallFailed as failed:
        error = failed.__cause__
        assert error is not None
        raise RewardFunctionError(
            "batched " + _failure(name, error, timeout_s, f"on a batch of {len(prompts)}"),
            function_name=name,
            sample_index=None,
        ) from error
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise RewardFunctionError(
            f"batched reward function {name!r} returned a {type(values).__name__}; "
            f"it must return a list of {len(prompts)} floats",
            function_name=name,
            sample_index=None,
        )
    if len(values) != len(prompts):
        raise RewardFunctionError(
            f"batched reward function {name!r} returned {len(values)} scores: expected {len(prompts)} "
            f"(one per completion), got {len(values)}",
            function_name=name,
            sample_index=None,
        )
    return [_as_score(value, name, index) for index, value in enumerate(values)]


def score_completions(
    reward_fns: Sequence[RewardTerm | tuple[str, Callable[..., Any], float]],
    prompts: list[str],
    completions: list[str],
    rows: list[dict],
    *,
    timeout_s: float | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score every completion: ``total[i] = sum_k weight_k * fn_k(prompts[i], completions[i], **rows[i])``.

    Returns the weighted totals ``[N]`` and the raw (unweighted) scores of each function by name.
    Raises ``RewardFunctionError`` when a function raises, calls ``sys.exit``, takes longer than
    ``timeout_s`` seconds for one call (a batched function: for the batch), or returns a non-finite
    or non-numeric value (the message names the function and the sample index), and
    ``ValueError`` on mismatched input lengths or duplicate names.
    """
    count = len(prompts)
    if len(completions) != count or len(rows) != count:
        raise ValueError(
            f"score_completions needs one prompt, completion and row per sample: got {count} prompts, "
            f"{len(completions)} completions and {len(rows)} rows"
        )
    if not reward_fns:
        raise ValueError("score_completions needs at least one reward function")
    names = [name for name, _, _ in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be distinct, got {names}; use resolve_reward_specs")
    totals = [0.0] * count
    per_function: dict[str, list[float]] = {}
    for name, fn, weight in reward_fns:
        scorer = _score_batched if getattr(fn, "batched", False) is True else _score_per_sample
        scores = scorer(name, fn, prompts, completions, rows, timeout_s)
        per_function[name] = scores
        totals = [total + weight * score for total, score in zip(totals, scores)]
    return totals, per_function
