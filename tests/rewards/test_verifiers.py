"""Built-in verifiers on correct, incorrect and malformed completions."""

from __future__ import annotations

import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.rewards.verifiers import (
    COUNTDOWN_FORMAT_REWARD,
    arithmetic_exact,
    countdown,
    evaluate_countdown_expression,
    extract_countdown_expression,
    format_answer_tag,
    math_verify,
)

# ---------------------------------------------------------------- arithmetic_exact


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("81", "81", 1.0),
        (" 81 and more text", "81", 1.0),
        ("-36", "-36", 1.0),
        ("36", "-36", 0.0),
        ("8 1", "81", 0.0),  # the first integer is 8
        ("82", "81", 0.0),
        ("", "81", 0.0),
        ("eighty-one", "81", 0.0),
        ("81", 81, 1.0),  # a CSV/JSON row may hold the answer as an int
    ],
)
def test_arithmetic_exact(completion: str, answer: object, expected: float) -> None:
    assert arithmetic_exact("23+58=", completion, answer=answer) == expected


def test_arithmetic_exact_names_missing_field() -> None:
    with pytest.raises(ValueError, match="'answer'.*add a 'answer' column"):
        arithmetic_exact("1+1=", "2", target=2)


def test_arithmetic_exact_rejects_non_integer_answer() -> None:
    with pytest.raises(ValueError, match="integer 'answer'.*math_verify"):
        arithmetic_exact("1/2=", "0.5", answer="0.5")


@given(st.integers(-10_000, 10_000), st.integers(-10_000, 10_000))
def test_arithmetic_exact_scores_one_only_for_the_answer(answer: int, guess: int) -> None:
    assert arithmetic_exact("q", str(guess), answer=str(answer)) == float(guess == answer)


# ---------------------------------------------------------------- countdown

NUMS = [3, 5, 7]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3*5+7", 1.0),
        ("7+5*3", 1.0),
        ("(7+5)*3-14", 0.0),  # 14 is not one of the numbers
        ("3*5+7=22", 1.0),
        (" 3 * 5 + 7 \nsome trailing words", 1.0),
        ("thinking...<answer>3*5+7</answer>", 1.0),
        ("3*5", COUNTDOWN_FORMAT_REWARD),  # valid equation, wrong value
        ("(3+5)*7", COUNTDOWN_FORMAT_REWARD),
        ("3*5+7+7", 0.0),  # 7 used twice
        ("3*3+7", 0.0),  # 3 used twice
        ("3*5+8", 0.0),  # 8 not given
        ("7/(5-5)", 0.0),  # division by zero (and 5 used twice)
        ("-3+5*7", 0.0),  # unary minus is not allowed
        ("3**5", 0.0),
        ("3*5+", 0.0),
        ("", 0.0),
        ("22", 0.0),  # the target itself uses no given number
        ("__import__('os').system('echo hacked')", 0.0),
        ("(lambda: 22)()", 0.0),
        ("3*5+7 if True else 0", 0.0),
    ],
)
def test_countdown(completion: str, expected: float) -> None:
    assert countdown("nums 3 5 7 target 22:", completion, nums=NUMS, target=22) == expected


def test_countdown_division_is_exact_rational() -> None:
    # 7/3 is not an integer but (7/3)*3 is exactly 7.
    assert countdown("p", "7/3*3+5", nums=[7, 3, 3, 5], target=12) == 1.0
    assert countdown("p", "5/(5-3)", nums=[5, 5, 3], target=Fraction(5, 2)) == 1.0


def test_countdown_division_by_zero_scores_zero() -> None:
    assert countdown("p", "8/(4-4)", nums=[8, 4, 4], target=2) == 0.0


def test_countdown_accepts_numbers_as_text() -> None:
    assert countdown("p", "3*5+7", nums="3 5 7", target="22") == 1.0
    assert countdown("p", "3*5+7", nums="[3, 5, 7]", target=22) == 1.0


def test_countdown_names_missing_field() -> None:
    with pytest.raises(ValueError, match="'target'"):
        countdown("p", "3*5+7", nums=NUMS)


def test_countdown_never_executes_code() -> None:
    calls: list[str] = []

    class Spy:
        def __call__(self) -> None:
            calls.append("called")

    assert countdown("p", "spy()", nums=NUMS, target=22, spy=Spy()) == 0.0
    assert calls == []


def test_countdown_rejects_very_long_expression() -> None:
    expression = "+".join(["1"] * 150)
    assert evaluate_countdown_expression(expression) is None


def test_extract_countdown_expression() -> None:
    assert extract_countdown_expression("<answer> (3+5)*7 = 56 </answer>") == "(3+5)*7"
    assert extract_countdown_expression("3+5\n7") == "3+5"


@given(st.lists(st.integers(1, 50), min_size=2, max_size=5), st.data())
@settings(max_examples=60, deadline=None)
def test_countdown_sum_of_given_numbers_scores_one(nums: list[int], data: st.DataObject) -> None:
    subset = data.draw(st.lists(st.sampled_from(range(len(nums))), min_size=1, unique=True))
    used = [nums[i] for i in subset]
    equation = "+".join(map(str, used))
    assert countdown("p", equation, nums=nums, target=sum(used)) == 1.0
    assert countdown("p", equation, nums=nums, target=sum(used) + 1) == COUNTDOWN_FORMAT_REWARD


# ---------------------------------------------------------------- math_verify


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("1/2", "1/2", 1.0),
        ("x = 7", "7", 1.0),
        ("The answer is $\\boxed{7}$", "7", 1.0),
        ("x = -3", "-3", 1.0),
        ("8", "7", 0.0),
        ("77", "7", 0.0),
        ("", "7", 0.0),
        ("no numbers here", "7", 0.0),
        ("\\frac{1}{", "0.5", 0.0),  # malformed latex
    ],
)
def test_math_verify(completion: str, answer: str, expected: float) -> None:
    assert math_verify("question", completion, answer=answer) == expected


def test_math_verify_unparseable_gold_scores_zero() -> None:
    assert math_verify("q", "7", answer="not a number at all") == 0.0


def test_math_verify_survives_exceptions_inside_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    import math_verify as package

    def timeout(*args: object, **kwargs: object) -> bool:
        raise TimeoutError("verification timed out")

    monkeypatch.setattr(package, "verify", timeout)
    assert math_verify("q", "7", answer="7") == 0.0


def test_math_verify_runs_outside_the_main_thread() -> None:
    # math-verify's timeout uses SIGALRM, which only the main thread may set.
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(math_verify("q", "x = 12", answer="12")))
    worker.start()
    worker.join()
    assert results == [1.0]


# ---------------------------------------------------------------- format_answer_tag


@pytest.mark.parametrize(
    ("completion", "answer_format", "expected"),
    [
        ("I think <answer>42</answer>", None, 1.0),
        ("<answer> </answer>", None, 0.0),
        ("42", None, 0.0),
        ("so \\boxed{42}", "boxed", 1.0),
        ("42", "boxed", 0.0),
        ("-36", "integer", 1.0),
        ("36 apples", "integer", 0.0),
        ("3*5+7", "equation", 1.0),
        ("(3+5)*7 = 56", "equation", 1.0),
        ("3*5+7 is it", "equation", 0.0),
        ("()", "equation", 0.0),
        ("x = 7", "number", 1.0),
        ("3/4", "number", 1.0),
        ("seven", "number", 0.0),
    ],
)
def test_format_answer_tag(completion: str, answer_format: str | None, expected: float) -> None:
    row = {} if answer_format is None else {"answer_format": answer_format}
    assert format_answer_tag("q", completion, **row) == expected


def test_format_answer_tag_unknown_format_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown answer_format 'yaml'.*integer"):
        format_answer_tag("q", "1", answer_format="yaml")
