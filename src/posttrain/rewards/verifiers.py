"""Built-in verifiable rewards: plain callables ``(prompt, completion, **row) -> float``.

Each verifier reads the fields it needs from the dataset row (``answer``, ``nums``, ``target``,
``answer_format``) and ignores the rest, so any of them can be combined with any dataset that has
those fields. They never raise on a malformed completion (that scores 0); they raise ``ValueError``
only when the *row* lacks a field they need, which is a data error the user must fix.
"""

from __future__ import annotations

import ast
import re
import threading
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "ANSWER_FORMATS",
    "COUNTDOWN_FORMAT_REWARD",
    "arithmetic_exact",
    "countdown",
    "extract_countdown_expression",
    "evaluate_countdown_expression",
    "format_answer_tag",
    "math_verify",
]

_INTEGER = re.compile(r"-?\d+")
# Only digits, whitespace, the four operators and parentheses may reach the parser: a cheap first
# wall against code injection before the AST whitelist below.
_EQUATION_CHARS = re.compile(r"[\d\s+\-*/()]+")
_ANSWER_TAG = re.compile(r"<answer>([\s\S]*?)</answer>")
_MAX_EXPRESSION_CHARS = 200

# Score for a countdown completion that is a valid equation over the given numbers but misses the
# target: a small shaping bonus for the format, as in the TinyZero countdown recipe.
COUNTDOWN_FORMAT_REWARD = 0.1

ANSWER_FORMATS: dict[str, re.Pattern[str]] = {
    # <answer> ... </answer> with something inside, anywhere in the completion.
    "tag": re.compile(r"<answer>\s*\S[\s\S]*?</answer>"),
    # \boxed{...} anywhere in the completion.
    "boxed": re.compile(r"\\boxed\{[^{}]+\}"),
    # The whole completion is one integer.
    "integer": re.compile(r"\s*-?\d+\s*"),
    # The whole completion is an arithmetic expression, optionally followed by "= <integer>".
    "equation": re.compile(r"\s*(?=[^=]*\d)[\d\s+\-*/()]+(?:=\s*-?\d+)?\s*"),
    # The whole completion is a number, a fraction, or "x = <number>".
    "number": re.compile(r"\s*(?:[a-zA-Z]\s*=\s*)?-?\d+(?:[./]\d+)?\s*"),
}
_FULL_MATCH_FORMATS = {"integer", "equation", "number"}


def _require(row: dict[str, Any], field: str, verifier: str) -> Any:
    """Return ``row[field]`` or raise a ``ValueError`` that names the field and the verifier."""
    if field not in row or row[field] is None:
        available = sorted(k for k in row if row[k] is not None)
        raise ValueError(
            f"reward '{verifier}' needs the row field '{field}', but this row has only {available}; "
            f"add a '{field}' column to the dataset or choose another reward function"
        )
    return row[field]


def arithmetic_exact(prompt: str, completion: str, **row: Any) -> float:
    """1.0 if the first integer in ``completion`` equals the integer ``row["answer"]``, else 0.0.

    ``"81"``, ``" 81 apples"`` score 1.0 for answer 81; ``"8 1"`` (first integer 8) scores 0.0.
    """
    answer_text = str(_require(row, "answer", "arithmetic_exact")).strip()
    try:
        answer = int(answer_text)
    except ValueError as error:
        raise ValueError(
            f"reward 'arithmetic_exact' needs an integer 'answer', got {answer_text!r}; "
            "use 'math_verify' for non-integer answers"
        ) from error
    match = _INTEGER.search(completion)
    return 1.0 if match is not None and int(match.group()) == answer else 0.0


def _parse_numbers(value: Any, field: str) -> list[int]:
    """Accept ``[3, 5, 7]``, ``"3 5 7"``, ``"[3, 5, 7]"`` or ``"3,5,7"``; a JSON/CSV row may hold any."""
    if isinstance(value, str):
        return [int(token) for token in re.findall(r"-?\d+", value)]
    if isinstance(value, Sequence):
        return [int(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    raise ValueError(f"reward 'countdown' needs '{field}' as a list of integers, got {type(value).__name__}")


def extract_countdown_expression(completion: str) -> str:
    """The candidate equation: inside ``<answer>`` tags if present, else the first line; the
    left-hand side is kept when the completion is written as ``expr = value``."""
    tagged = _ANSWER_TAG.search(completion)
    text = tagged.group(1) if tagged is not None else completion.strip().split("\n", 1)[0]
    return text.split("=", 1)[0].strip()


def _evaluate_node(node: ast.AST, used: list[int]) -> Fraction:
    """Exact rational evaluation of a whitelisted AST: integer literals and binary + - * / only."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        left = _evaluate_node(node.left, used)
        right = _evaluate_node(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            return left / right  # ZeroDivisionError is handled by the caller
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def evaluate_countdown_expression(expression: str) -> tuple[Fraction, list[int]] | None:
    """Safely evaluate ``expression``; return (value, numbers used) or None when it is not a valid
    equation of integers with + - * / and parentheses (unary minus, powers, names, calls, division by
    zero all give None). Never calls ``eval``: the text is parsed with ``ast`` and walked."""
    if not expression or len(expression) > _MAX_EXPRESSION_CHARS:
        return None
    if _EQUATION_CHARS.fullmatch(expression) is None:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None
    used: list[int] = []
    try:
        value = _evaluate_node(tree.body, used)
    except (ValueError, ZeroDivisionError):
        return None
    return value, used


def countdown(prompt: str, completion: str, **row: Any) -> float:
    """Countdown reward (Gandhi et al. 2024, "Stream of Search"; the TinyZero recipe).

    The completion must hold an equation over ``row["nums"]`` (each number used at most once,
    operators + - * /, parentheses allowed, no unary minus) that equals ``row["target"]``:

    - 1.0 if it evaluates exactly (rational arithmetic) to the target;
    - ``COUNTDOWN_FORMAT_REWARD`` (0.1) if it is such an equation but evaluates to another value;
    - 0.0 otherwise: no equation, a number not in ``nums`` or used too often, division by zero,
      or anything that is not plain arithmetic (names, calls, ``__import__('os')``, ...).

    The equation is read from ``<answer>...</answer>`` if present, else from the first line, and only
    its left-hand side is evaluated (``"3*5+7=22"`` is judged by ``3*5+7``).
    """
    nums = _parse_numbers(_require(row, "nums", "countdown"), "nums")
    target_value = _require(row, "target", "countdown")
    try:
        target = Fraction(str(target_value).strip())
    except ValueError as error:
        raise ValueError(f"reward 'countdown' needs a numeric 'target', got {target_value!r}") from error
    evaluated = evaluate_countdown_expression(extract_countdown_expression(completion))
    if evaluated is None:
        return 0.0
    value, used = evaluated
    if Counter(used) - Counter(nums):  # some number used more often than given
        return 0.0
    return 1.0 if value == target else COUNTDOWN_FORMAT_REWARD


def _math_verify_timeouts() -> int | None:
    """math-verify times out with SIGALRM, which only the main thread may install; elsewhere
    (a trainer's scoring thread) run without its timeout rather than crash."""
    return 5 if threading.current_thread() is threading.main_thread() else None


_GOLD_CACHE: dict[str, list[Any]] = {}
_GOLD_CACHE_SIZE = 65536


def _parse_gold(answer: str, timeout: int | None) -> list[Any]:
    """Parse a gold answer once per distinct string (every group member shares it); failures are
    not cached so a timeout under load is retried next time."""
    from math_verify import parse

    if answer in _GOLD_CACHE:
        return _GOLD_CACHE[answer]
    gold = parse(answer, parsing_timeout=timeout)  # type: ignore[arg-type]
    if gold:
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[answer] = gold
    return gold


def math_verify(prompt: str, completion: str, **row: Any) -> float:
    """1.0 if ``completion`` is mathematically equivalent to ``row["answer"]`` per the ``math-verify``
    package (sympy-based: ``"\\frac{1}{2}"`` equals ``"0.5"``, ``"x = 7"`` equals ``"7"``), else 0.0.

    A gold or completion that cannot be parsed, a parser/verifier timeout, or any exception inside
    math-verify scores 0.0: a flaky symbolic check must not stop training.
    """
    answer = str(_require(row, "answer", "math_verify")).strip()
    timeout = _math_verify_timeouts()
    try:
        from math_verify import parse, verify

        gold = _parse_gold(answer, timeout)
        if not gold:
            return 0.0
        predicted = parse(completion, parsing_timeout=timeout)  # type: ignore[arg-type]
        if not predicted:
            return 0.0
        return 1.0 if verify(gold, predicted, timeout_seconds=timeout) else 0.0
    except Exception:  # math-verify raises TimeoutError and assorted sympy errors
        return 0.0


def format_answer_tag(prompt: str, completion: str, **row: Any) -> float:
    """1.0 if the completion is in the task's answer format, else 0.0.

    The format is named by ``row["answer_format"]`` (default ``"tag"``), one of ``ANSWER_FORMATS``:
    ``tag`` (contains ``<answer>...</answer>``), ``boxed`` (contains ``\\boxed{...}``), and, matched
    against the whole completion, ``integer``, ``equation`` (``3*5+7`` or ``3*5+7=22``) and
    ``number`` (``7``, ``-2``, ``3/4``, ``0.5``, ``x = 7``).
    """
    name = row.get("answer_format") or "tag"
    if name not in ANSWER_FORMATS:
        raise ValueError(
            f"reward 'format_answer_tag': unknown answer_format {name!r}; available: {sorted(ANSWER_FORMATS)}"
        )
    pattern = ANSWER_FORMATS[name]
    matched = pattern.fullmatch(completion) if name in _FULL_MATCH_FORMATS else pattern.search(completion)
    return 1.0 if matched is not None else 0.0
