"""Resolving reward functions and scoring completions, including every hardening error."""

from __future__ import annotations

import functools
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrain.rewards import BUILTIN_REWARDS, arithmetic_exact, countdown, format_answer_tag, math_verify
from posttrain.rewards.functions import (
    RewardFunctionError,
    RewardSpec,
    RewardSpecError,
    resolve_reward_fn,
    resolve_reward_specs,
    score_completions,
)
from posttrain.rewards.sandbox import python_tests

# ---------------------------------------------------------------- resolve_reward_fn


def test_builtins_are_registered() -> None:
    assert {
        "arithmetic_exact": arithmetic_exact,
        "countdown": countdown,
        "math_verify": math_verify,
        "format_answer_tag": format_answer_tag,
        "python_tests": python_tests,
    } == BUILTIN_REWARDS
    for name, fn in BUILTIN_REWARDS.items():
        assert resolve_reward_fn(name) == (name, fn)


def test_callable_passes_through_with_its_name() -> None:
    def length_bonus(prompt: str, completion: str, **row: Any) -> float:
        return len(completion) / 10

    assert resolve_reward_fn(length_bonus) == ("length_bonus", length_bonus)
    partial = functools.partial(length_bonus)
    assert resolve_reward_fn(partial) == ("length_bonus", partial)


def _write_module(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


MODULE_BODY = """
THRESHOLD = 3

def long_enough(prompt, completion, **row):
    return float(len(completion) >= THRESHOLD)
"""


def test_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "my_rewards_pkg_a", MODULE_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_pkg_a", raising=False)
    name, fn = resolve_reward_fn("my_rewards_pkg_a:long_enough")
    assert name == "long_enough"
    assert fn("p", "abcd") == 1.0
    assert fn("p", "ab") == 0.0


def test_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_module(tmp_path, "rewards_file", MODULE_BODY)
    name, fn = resolve_reward_fn(f"{path}:long_enough")
    assert name == "long_enough"
    assert fn("p", "abc") == 1.0
    # Relative to the working directory, and the same module object on a second resolution.
    monkeypatch.chdir(tmp_path)
    _, again = resolve_reward_fn("./rewards_file.py:long_enough")
    assert again is fn


def test_unknown_name_lists_builtins_and_import_syntax() -> None:
    expected = "unknown reward function 'exact'.*arithmetic_exact.*module:function"
    with pytest.raises(RewardSpecError, match=expected):
        resolve_reward_fn("exact")


def test_missing_module_names_spec_and_fix() -> None:
    with pytest.raises(RewardSpecError, match="'no_such_module_xyz:fn'.*PYTHONPATH") as caught:
        resolve_reward_fn("no_such_module_xyz:fn")
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_missing_attribute_lists_callables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "my_rewards_pkg_b", MODULE_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match="no attribute 'short'.*long_enough"):
        resolve_reward_fn("my_rewards_pkg_b:short")


def test_not_callable_names_the_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "my_rewards_pkg_c", MODULE_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match="'THRESHOLD' is a int, not callable"):
        resolve_reward_fn("my_rewards_pkg_c:THRESHOLD")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(RewardSpecError, match=r"nope\.py.*does not exist"):
        resolve_reward_fn(f"{missing}:fn")


def test_file_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    path = _write_module(tmp_path, "broken_rewards", "raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardSpecError, match="boom at import") as caught:
        resolve_reward_fn(f"{path}:fn")
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_non_string_non_callable_spec() -> None:
    with pytest.raises(RewardSpecError, match="string or a callable, got int"):
        resolve_reward_fn(3)  # type: ignore[arg-type]


def test_resolve_reward_specs_weights_and_distinct_names() -> None:
    resolved = resolve_reward_specs([RewardSpec("arithmetic_exact", 2.0), "arithmetic_exact", countdown])
    assert [(name, weight) for name, _, weight in resolved] == [
        ("arithmetic_exact", 2.0),
        ("arithmetic_exact_2", 1.0),
        ("countdown", 1.0),
    ]
    with pytest.raises(RewardSpecError, match="finite"):
        resolve_reward_specs([RewardSpec("countdown", math.nan)])


# ---------------------------------------------------------------- score_completions

PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6 "]
ROWS = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["2", "4", "6"])]


def starts_with_digit(prompt: str, completion: str, **row: Any) -> float:
    return float(completion[:1].isdigit())


def test_weighted_sum_and_raw_scores() -> None:
    totals, raw = score_completions(
        [("exact", arithmetic_exact, 2.0), ("digit", starts_with_digit, -0.5)], PROMPTS, COMPLETIONS, ROWS
    )
    assert raw == {"exact": [1.0, 0.0, 1.0], "digit": [1.0, 1.0, 1.0]}
    assert totals == [1.5, -0.5, 1.5]


def test_row_fields_arrive_as_keywords_without_prompt() -> None:
    seen: list[dict] = []

    def spy(prompt: str, completion: str, **row: Any) -> float:
        seen.append({"prompt": prompt, "completion": completion, **row})
        return 0.0

    score_completions([("spy", spy, 1.0)], ["p"], ["c"], [{"prompt": "p", "answer": "7", "extra": 1}])
    assert seen == [{"prompt": "p", "completion": "c", "answer": "7", "extra": 1}]


def test_bool_and_numpy_scores_are_accepted() -> None:
    values = iter([True, np.float32(0.25), np.int64(3)])

    def mixed(prompt: str, completion: str, **row: Any) -> Any:
        return next(values)

    totals, raw = score_completions([("mixed", mixed, 1.0)], PROMPTS, COMPLETIONS, ROWS)
    assert raw["mixed"] == [1.0, 0.25, 3.0]
    assert all(type(value) is float for value in raw["mixed"] + totals)


def test_raising_function_names_function_index_and_chains() -> None:
    def fragile(prompt: str, completion: str, **row: Any) -> float:
        if completion == "5":
            raise KeyError("missing_field")
        return 1.0

    with pytest.raises(RewardFunctionError, match="'fragile' raised KeyError.*sample 1") as caught:
        score_completions([("fragile", fragile, 1.0)], PROMPTS, COMPLETIONS, ROWS)
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.function_name == "fragile"
    assert caught.value.sample_index == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_names_function_and_index(bad: float) -> None:
    def unstable(prompt: str, completion: str, **row: Any) -> float:
        return bad if completion.startswith("6") else 0.0

    with pytest.raises(RewardFunctionError, match=f"'unstable' returned {bad} for sample 2"):
        score_completions([("unstable", unstable, 1.0)], PROMPTS, COMPLETIONS, ROWS)


@pytest.mark.parametrize(("bad", "type_name"), [("1.0", "str"), (None, "NoneType"), ([1.0], "list")])
def test_non_number_names_the_type(bad: Any, type_name: str) -> None:
    def sloppy(prompt: str, completion: str, **row: Any) -> Any:
        return bad

    with pytest.raises(RewardFunctionError, match=f"'sloppy' returned a {type_name} .*sample 0.*float"):
        score_completions([("sloppy", sloppy, 1.0)], PROMPTS, COMPLETIONS, ROWS)


def test_batched_function_is_called_once() -> None:
    calls: list[int] = []

    def judge(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        calls.append(len(prompts))
        return [float(len(c)) for c in completions]

    judge.batched = True  # type: ignore[attr-defined]
    totals, raw = score_completions([("judge", judge, 0.5)], PROMPTS, COMPLETIONS, ROWS)
    assert calls == [3]
    assert raw["judge"] == [1.0, 1.0, 2.0]
    assert totals == [0.5, 0.5, 1.0]


def test_batched_wrong_length_says_expected_and_got() -> None:
    def short(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [1.0]

    short.batched = True  # type: ignore[attr-defined]
    with pytest.raises(RewardFunctionError, match="'short'.*expected 3.*got 1"):
        score_completions([("short", short, 1.0)], PROMPTS, COMPLETIONS, ROWS)


def test_batched_errors_are_checked_per_item() -> None:
    def nan_judge(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [0.0, math.nan, 0.0]

    nan_judge.batched = True  # type: ignore[attr-defined]
    with pytest.raises(RewardFunctionError, match="'nan_judge' returned nan for sample 1"):
        score_completions([("nan_judge", nan_judge, 1.0)], PROMPTS, COMPLETIONS, ROWS)

    def raising_judge(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        raise ConnectionError("judge offline")

    raising_judge.batched = True  # type: ignore[attr-defined]
    with pytest.raises(RewardFunctionError, match="'raising_judge' raised ConnectionError: judge offline"):
        score_completions([("raising_judge", raising_judge, 1.0)], PROMPTS, COMPLETIONS, ROWS)


def test_mismatched_lengths_and_duplicates_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 prompts, 2 completions"):
        score_completions([("exact", arithmetic_exact, 1.0)], PROMPTS, COMPLETIONS[:2], ROWS)
    with pytest.raises(ValueError, match="distinct"):
        score_completions([("x", arithmetic_exact, 1.0), ("x", countdown, 1.0)], PROMPTS, COMPLETIONS, ROWS)


@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=8), st.floats(-3, 3))
def test_total_is_linear_in_weights(pairs: list[tuple[float, float]], weight: float) -> None:
    first = iter([a for a, _ in pairs])
    second = iter([b for _, b in pairs])
    fns = [("a", lambda p, c, **r: next(first), 1.0), ("b", lambda p, c, **r: next(second), weight)]
    n = len(pairs)
    totals, _ = score_completions(fns, ["p"] * n, ["c"] * n, [{}] * n)
    assert totals == pytest.approx([a + weight * b for a, b in pairs])


def test_a_hanging_reward_function_times_out_naming_function_and_sample() -> None:
    import threading

    release = threading.Event()

    def hangs_on_the_second(prompt: str, completion: str, **row: Any) -> float:
        if prompt == PROMPTS[1]:
            release.wait(30)
        return 1.0

    start = time.perf_counter()
    with pytest.raises(
        RewardFunctionError, match=r"'hangs_on_the_second' did not return within 0.2 s on sample 1"
    ) as caught:
        score_completions(
            [("hangs_on_the_second", hangs_on_the_second, 1.0)], PROMPTS, COMPLETIONS, ROWS, timeout_s=0.2
        )
    assert time.perf_counter() - start < 5 and caught.value.sample_index == 1
    assert "data.reward_timeout_s" in str(caught.value)
    release.set()
    # within the limit: the same scores as without one
    fast = [("starts_with_digit", starts_with_digit, 1.0)]
    assert score_completions(fast, PROMPTS, COMPLETIONS, ROWS, timeout_s=5.0) == score_completions(
        fast, PROMPTS, COMPLETIONS, ROWS
    )


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_a_reward_function_calling_sys_exit_is_an_error_not_an_exit(timeout_s: float | None) -> None:
    import sys

    def quits(prompt: str, completion: str, **row: Any) -> float:
        sys.exit(3)

    with pytest.raises(RewardFunctionError, match=r"'quits' called sys.exit\(3\) on sample 0"):
        score_completions([("quits", quits, 1.0)], PROMPTS, COMPLETIONS, ROWS, timeout_s=timeout_s)

    def batch_quits(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        sys.exit("bye")

    batch_quits.batched = True  # type: ignore[attr-defined]
    with pytest.raises(RewardFunctionError, match=r"batched reward function 'batch_quits' called sys.exit"):
        score_completions(
            [("batch_quits", batch_quits, 1.0)], PROMPTS, COMPLETIONS, ROWS, timeout_s=timeout_s
        )


def test_the_time_limit_is_per_call_not_per_batch() -> None:
    calls: list[str] = []

    def slowish(prompt: str, completion: str, **row: Any) -> float:
        calls.append(prompt)
        time.sleep(0.1)
        return 1.0

    # four calls of 0.1 s each take longer than the 0.25 s limit together, but none alone does
    prompts = ["a", "b", "c", "d"]
    totals, _ = score_completions([("slowish", slowish, 1.0)], prompts, ["x"] * 4, [{}] * 4, timeout_s=0.25)
    assert totals == [1.0] * 4 and calls == prompts  # in order, each once
