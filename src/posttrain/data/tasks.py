"""Built-in single-turn tasks with verifiable answers, generated procedurally (no downloads).

Every row is a plain dict with ``prompt`` (str), ``answer`` (str), ``solution`` (str: the ideal
completion, without EOS; a supervised warm-start appends the tokenizer's EOS) and task-specific
fields that the task's reward functions read. Generation is deterministic in ``seed``; the test split
is drawn first, so it depends only on ``seed``, ``num_test`` and the options (not on ``num_train``),
and no prompt appears in both splits.

Rows may also carry ``flawed_solution``: what a sloppy demonstrator writes instead, so a warm-start
can imitate imperfect demonstrations and leave RL a systematic error to correct (see
``WarmStartConfig.flawed_fraction``).

- ``arithmetic`` (default): ``"5-12="`` -> ``"-7"``; by default differences of operands 0..29 (half
  the answers are negative); ``ops="+-*"`` adds sums and products. Reward ``arithmetic_exact``.
  Its flawed demonstrator forgets the minus sign of a negative answer (``"5-12="`` -> ``"7"``);
  every other answer it writes is right.
- ``countdown``: ``"nums 3 5 7 target 22:"`` -> ``"3*5+7"``; reward ``countdown``.
- ``math``: templated word problems and equations -> ``"7"``, ``"x = 7"``, ``"1/2"``; reward
  ``math_verify``.
- ``mix``: several of the single-turn tasks in one dataset, each row tagged with its task in
  ``domain`` (``data/mixture.py``).

A task may transform its held-out rows (``_TaskDefinition.held_out``): ``leaky_chain`` leaks the
answer in a file on train rows (``bait: True``) and removes the leak from test rows (``bait: False``),
so held-out success measures the honest skill.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from posttrain.envs.builtin.key_chain import DEFAULT_OPTIONS as KEY_CHAIN_OPTIONS
from posttrain.envs.builtin.key_chain import check_horizons, sample_row, transcript_corpus
from posttrain.envs.builtin.leaky_chain import leaky_transcript_corpus
from posttrain.rewards.functions import RewardSpec

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "Task",
    "available_tasks",
    "corpus",
    "get_task",
    "task_corpus",
    "task_env",
]

DEFAULT_TASK = "arithmetic"
# the built-in tasks' default sizes: the default arithmetic task has 900 distinct prompts, 200 held
# out and 680 to train on (the other tasks have more)
DEFAULT_NUM_TRAIN = 680
DEFAULT_NUM_TEST = 200


@dataclass
class Task:
    """A dataset with its reward: what the trainer needs to run and evaluate one task."""

    name: str
    train: list[dict]
    test: list[dict]
    reward_fns: list[RewardSpec]
    max_new_tokens: int
    description: str
    # the rows the supervised warm-start imitates (prompt + solution); None = the training rows
    demonstrations: list[dict] | None = None

    def warmstart_rows(self) -> list[dict]:
        """The warm-start's rows: ``demonstrations`` when the task has its own, else ``train``."""
        return self.train if self.demonstrations is None else self.demonstrations


Row = dict[str, Any]
Options = dict[str, Any]


@dataclass(frozen=True)
class _TaskDefinition:
    description: str
    defaults: Options
    sample: Callable[[random.Random, Options], Row | None]
    rewards: tuple[str, ...]
    max_new_tokens: Callable[[Options], int]
    alphabet: Callable[[Options], str]
    validate: Callable[[Options], None] = field(default=lambda options: None)
    env: str | None = None
    # extra texts for the tiny tokenizer's corpus (e.g. whole agent transcripts, so BPE merges tool names)
    corpus_texts: Callable[[list[Row]], list[str]] = field(default=lambda rows: [])
    # applied to each test (held-out) row after sampling, e.g. to remove a training-only leak
    held_out: Callable[[Row], Row] = field(default=lambda row: row)


# ---------------------------------------------------------------- arithmetic


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _validate_arithmetic(options: Options) -> None:
    low, high, ops = options["min_operand"], options["max_operand"], options["ops"]
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        raise ValueError(
            f"task 'arithmetic': need integers 0 <= min_operand <= max_operand, got {low} and {high}"
        )
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"task 'arithmetic': ops must be a non-empty string of '+', '-', '*', got {ops!r}")


def _arithmetic_row(rng: random.Random, options: Options) -> Row:
    low, high = options["min_operand"], options["max_operand"]
    a, b = rng.randint(low, high), rng.randint(low, high)
    op = rng.choice(options["ops"])
    answer = str(_apply(a, op, b))
    return {
        "prompt": f"{a}{op}{b}=",
        "answer": answer,
        "solution": answer,
        "flawed_solution": answer.lstrip("-"),
        "a": a,
        "b": b,
        "op": op,
        "answer_format": "integer",
    }


def _arithmetic_max_new_tokens(options: Options) -> int:
    low, high = options["min_operand"], options["max_operand"]
    extremes = [_apply(x, op, y) for op in options["ops"] for x in (low, high) for y in (low, high)]
    # Room for the longest answer, EOS and one spare token.
    return max(len(str(value)) for value in extremes) + 2


def _arithmetic_alphabet(options: Options) -> str:
    # every operator, whatever `ops` says, so one tokenizer serves each variant of the task
    return string.digits + "+-*="


# ---------------------------------------------------------------- countdown


def _validate_countdown(options: Options) -> None:
    count, low, high, ops = (options[k] for k in ("num_count", "min_number", "max_number", "ops"))
    if not (isinstance(count, int) and 2 <= count <= 6):
        raise ValueError(f"task 'countdown': num_count must be an integer in [2, 6], got {count!r}")
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(f"task 'countdown': need integers 1 <= min_number <= max_number, got {low}, {high}")
    if not ops or set(ops) - set("+-*/"):
        raise ValueError(f"task 'countdown': ops must be a non-empty string of '+-*/', got {ops!r}")


_COUNTDOWN_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
    "/": lambda x, y: x / y,
}


def _render_chain(numbers: list[int], ops: list[str]) -> str:
    """Left-to-right chain ((n0 op n1) op n2)... with only the parentheses precedence requires."""
    text, top_is_additive = str(numbers[0]), False
    for op, number in zip(ops, numbers[1:]):
        if op in "*/" and top_is_additive:
            text = f"({text})"
        text, top_is_additive = f"{text}{op}{number}", op in "+-"
    return text


def _countdown_row(rng: random.Random, options: Options) -> Row | None:
    count, low, high = options["num_count"], options["min_number"], options["max_number"]
    nums = [rng.randint(low, high) for _ in range(count)]
    order = rng.sample(nums, k=count)
    ops = [rng.choice(options["ops"]) for _ in range(count - 1)]
    value = Fraction(order[0])
    for op, number in zip(ops, order[1:]):
        if op == "/" and value % number != 0:
            return None  # keep every intermediate value an integer so solutions read naturally
        value = _COUNTDOWN_OPS[op](value, Fraction(number))
    if value <= 0:
        return None
    target = int(value)
    return {
        "prompt": f"nums {' '.join(map(str, nums))} target {target}:",
        "answer": str(target),
        "solution": _render_chain(order, ops),
        "nums": nums,
        "target": target,
        "answer_format": "equation",
    }


def _countdown_max_new_tokens(options: Options) -> int:
    longest_number = len(str(options["max_number"]))
    # numbers, operators, one pair of parentheses per operator at worst, EOS and spare tokens.
    return options["num_count"] * longest_number + 3 * (options["num_count"] - 1) + 4


def _countdown_alphabet(options: Options) -> str:
    return string.digits + "numstarge :()" + options["ops"]


# ---------------------------------------------------------------- math word problems

_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia")
_ITEMS = ("apples", "pens", "books", "coins", "stickers", "marbles", "cards", "shells")
_PLACEHOLDER = re.compile(r"\{\w+\}")


def _linear_plus(rng: random.Random) -> Options:
    a, x, b = rng.randint(2, 9), rng.randint(-5, 20), rng.randint(1, 30)
    return {"a": a, "b": b, "c": a * x + b, "answer": x}


def _linear_minus(rng: random.Random) -> Options:
    a, x, b = rng.randint(2, 9), rng.randint(1, 20), rng.randint(1, 30)
    return {"a": a, "b": b, "c": a * x - b, "answer": x}


def _two_numbers(
    low: int, high: int, combine: Callable[[int, int], int]
) -> Callable[[random.Random], Options]:
    def values(rng: random.Random) -> Options:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return {"a": a, "b": b, "answer": combine(a, b)}

    return values


def _story(low: int, high: int, combine: Callable[[int, int], int]) -> Callable[[random.Random], Options]:
    def values(rng: random.Random) -> Options:
        a, b = sorted((rng.randint(low, high), rng.randint(low, high)), reverse=True)
        return {
            "a": a,
            "b": b,
            "answer": combine(a, b),
            "name": rng.choice(_NAMES),
            "items": rng.choice(_ITEMS),
        }

    return values


def _exact_division(rng: random.Random) -> Options:
    b, quotient = rng.randint(2, 12), rng.randint(2, 30)
    return {
        "a": b * quotient,
        "b": b,
        "answer": quotient,
        "name": rng.choice(_NAMES),
        "items": rng.choice(_ITEMS),
    }


def _fraction_sum(rng: random.Random) -> Options:
    q = rng.randint(2, 12)
    p1, p2 = rng.randint(1, q - 1), rng.randint(1, 2 * q)
    total = Fraction(p1, q) + Fraction(p2, q)
    return {"p1": p1, "p2": p2, "q": q, "answer": str(total)}


def _percent(rng: random.Random) -> Options:
    percent, base = rng.choice((10, 20, 25, 50, 75)), 20 * rng.randint(1, 25)
    return {"p": percent, "b": base, "answer": percent * base // 100}


def _square(rng: random.Random) -> Options:
    a = rng.randint(2, 40)
    return {"a": a, "answer": a * a}


@dataclass(frozen=True)
class _MathTemplate:
    question: str
    values: Callable[[random.Random], Options]
    solution: str = "{answer}"


MATH_TEMPLATES: dict[str, _MathTemplate] = {
    "linear_plus": _MathTemplate("Solve for x: {a}x + {b} = {c}.", _linear_plus, "x = {answer}"),
    "linear_minus": _MathTemplate("Solve for x: {a}x - {b} = {c}.", _linear_minus, "x = {answer}"),
    "plus": _MathTemplate("What is {a} plus {b}?", _two_numbers(10, 999, lambda a, b: a + b)),
    "minus": _MathTemplate("What is {a} minus {b}?", _two_numbers(10, 999, lambda a, b: a - b)),
    "times": _MathTemplate("What is {a} times {b}?", _two_numbers(2, 30, lambda a, b: a * b)),
    "buy": _MathTemplate(
        "{name} has {a} {items} and buys {b} more. How many {items} does {name} have now?",
        _story(2, 60, lambda a, b: a + b),
    ),
    "give": _MathTemplate(
        "{name} had {a} {items} and gave away {b}. How many {items} are left?",
        _story(2, 60, lambda a, b: a - b),
    ),
    "boxes": _MathTemplate(
        "A box holds {a} {items}. How many {items} are in {b} boxes?", _story(2, 25, lambda a, b: a * b)
    ),
    "share": _MathTemplate(
        "{name} shares {a} {items} equally among {b} friends. How many {items} does each friend get?",
        _exact_division,
    ),
    "fractions": _MathTemplate("What is {p1}/{q} + {p2}/{q}?", _fraction_sum),
    "percent": _MathTemplate("What is {p}% of {b}?", _percent),
    "square": _MathTemplate("What is {a} squared?", _square),
}
_MATH_PROMPT_SUFFIX = "\nAnswer:"


def _math_row(rng: random.Random, options: Options) -> Row:
    key = rng.choice(sorted(options["templates"]))
    template = MATH_TEMPLATES[key]
    values = template.values(rng)
    answer = str(values["answer"])
    return {
        "prompt": template.question.format(**values) + _MATH_PROMPT_SUFFIX,
        "answer": answer,
        "solution": template.solution.format(**values),
        "template": key,
        "answer_format": "number",
    }


def _math_alphabet(options: Options) -> str:
    fixed = "".join(
        _PLACEHOLDER.sub("", MATH_TEMPLATES[key].question + MATH_TEMPLATES[key].solution)
        for key in options["templates"]
    )
    return fixed + "".join(_NAMES) + "".join(_ITEMS) + string.digits + "-/" + _MATH_PROMPT_SUFFIX


def _validate_math(options: Options) -> None:
    chosen = options["templates"]
    unknown = [chosen] if isinstance(chosen, str) else sorted(set(chosen) - set(MATH_TEMPLATES))
    if not chosen or unknown:
        raise ValueError(f"task 'math': unknown templates {unknown}; available: {sorted(MATH_TEMPLATES)}")


# ---------------------------------------------------------------- key chain (multi-turn agent task)


def _validate_key_chain(options: Options) -> None:
    check_horizons(options["min_horizon"], options["max_horizon"])


def _key_chain_row(rng: random.Random, options: Options) -> Row:
    return sample_row(rng, min_horizon=options["min_horizon"], max_horizon=options["max_horizon"])


_KEY_CHAIN_ALPHABET = string.digits + "()= \nabcdefghijklmnopqrstuvwxyz:,"


# ---------------------------------------------------------------- registry

TASKS: dict[str, _TaskDefinition] = {
    "arithmetic": _TaskDefinition(
        description="Two-operand integer arithmetic such as '5-12=' -> '-7' (subtraction by default).",
        defaults={"min_operand": 0, "max_operand": 29, "ops": "-"},
        sample=_arithmetic_row,
        rewards=("arithmetic_exact",),
        max_new_tokens=_arithmetic_max_new_tokens,
        alphabet=_arithmetic_alphabet,
        validate=_validate_arithmetic,
    ),
    "countdown": _TaskDefinition(
        description=(
            "Countdown: combine the given numbers (each at most once) with + - * / to reach the target, "
            "'nums 3 5 7 target 22:' -> '3*5+7'."
        ),
        defaults={"num_count": 3, "min_number": 1, "max_number": 20, "ops": "+-*"},
        sample=_countdown_row,
        rewards=("countdown",),
        max_new_tokens=_countdown_max_new_tokens,
        alphabet=_countdown_alphabet,
        validate=_validate_countdown,
    ),
    "math": _TaskDefinition(
        description=(
            "Templated arithmetic and algebra word problems ending in 'Answer:', checked with math-verify; "
            "solutions like '7', 'x = 7' or '1/2'."
        ),
        defaults={"templates": tuple(sorted(MATH_TEMPLATES))},
        sample=_math_row,
        rewards=("math_verify",),
        max_new_tokens=lambda options: 16,
        alphabet=_math_alphabet,
        validate=_validate_math,
    ),
    "key_chain": _TaskDefinition(
        description=(
            "Multi-turn tool use: follow a chain of keys with lookup(key) calls, each answer naming the next "
            "key, then answer(last key); horizon = lookups needed. Runs in the key_chain environment."
        ),
        defaults=dict(KEY_CHAIN_OPTIONS),
        sample=_key_chain_row,
        rewards=(),
        max_new_tokens=lambda options: 12,
        alphabet=lambda options: _KEY_CHAIN_ALPHABET,
        validate=_validate_key_chain,
        env="key_chain",
        corpus_texts=lambda rows: transcript_corpus(list(rows[:64])),
    ),
    "leaky_chain": _TaskDefinition(
        description=(
            "key_chain with a reward hack in reach: train rows leak the answer in tests/expected.txt "
            "(readable with read(path)), held-out rows do not; runs in the leaky_chain environment."
        ),
        defaults=dict(KEY_CHAIN_OPTIONS),
        sample=lambda rng, options: {**_key_chain_row(rng, options), "bait": True},
        rewards=(),
        max_new_tokens=lambda options: 16,  # read("tests/expected.txt") is 11 tiny-tokenizer tokens
        alphabet=lambda options: _KEY_CHAIN_ALPHABET + '"./',
        validate=_validate_key_chain,
        env="leaky_chain",
        corpus_texts=lambda rows: leaky_transcript_corpus(rows[:64]),
        held_out=lambda row: {**row, "bait": False},
    ),
}


def task_env(name: str | None) -> str | None:
    """The environment of built-in task ``name`` (None for single-turn or unknown tasks)."""
    return TASKS[name].env if name in TASKS else None


MIX_TASK = "mix"  # several built-in tasks in one dataset (data/mixture.py)


def available_tasks() -> list[str]:
    """Names accepted by ``get_task``."""
    return sorted([*TASKS, MIX_TASK])


def _definition_and_options(name: str, options: Options) -> tuple[_TaskDefinition, Options]:
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; available tasks: {available_tasks()} "
            "(or load your own rows with posttrain.data.datasets.load_rows)"
        )
    definition = TASKS[name]
    unknown = sorted(set(options) - set(definition.defaults))
    if unknown:
        raise ValueError(
            f"task {name!r} has no option(s) {unknown}; its options are {sorted(definition.defaults)} "
            "plus max_new_tokens"
        )
    merged = {**definition.defaults, **options}
    definition.validate(merged)
    return definition, merged


def _distinct_rows(
    name: str, definition: _TaskDefinition, options: Options, rng: random.Random, count: int
) -> list[Row]:
    """Draw rows until ``count`` distinct prompts are found (rejection sampling, bounded)."""
    rows: list[Row] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * count + 1000
    while len(rows) < count and attempts < max_attempts:
        attempts += 1
        row = definition.sample(rng, options)
        if row is not None and row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    if len(rows) < count:
        raise ValueError(
            f"task {name!r} with options {options} found only {len(rows)} distinct prompts, but "
            f"num_train + num_test = {count}; lower num_train/num_test or widen the options"
        )
    return rows


def get_task(
    name: str = DEFAULT_TASK,
    *,
    seed: int = 0,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    **options: Any,
) -> Task:
    """Build a built-in task deterministically from ``seed``; train and test prompts are disjoint.

    ``options`` are the task's own settings (see ``TASKS[name].defaults``), plus ``max_new_tokens`` to
    override the generation budget.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train} and {num_test}")
    if name == MIX_TASK:
        from posttrain.data.mixture import mixed_task

        return mixed_task(seed=seed, num_train=num_train, num_test=num_test, **options)
    max_new_tokens = options.pop("max_new_tokens", None)
    definition, merged = _definition_and_options(name, options)
    rows = _distinct_rows(name, definition, merged, random.Random(seed), num_test + num_train)
    return Task(
        name=name,
        train=rows[num_test:],
        test=[definition.held_out(row) for row in rows[:num_test]],
        reward_fns=[RewardSpec(reward) for reward in definition.rewards],
        max_new_tokens=int(max_new_tokens)
        if max_new_tokens is not None
        else definition.max_new_tokens(merged),
        description=definition.description,
    )


def corpus(name: str = DEFAULT_TASK, **options: Any) -> str:
    """Every character that can appear in a prompt or solution of built-in task ``name`` (sorted)."""
    if name == MIX_TASK:
        from posttrain.data.mixture import mixed_corpus

        return mixed_corpus(**options)
    definition, merged = _definition_and_options(name, options)
    return "".join(sorted(set(definition.alphabet(merged))))


def task_corpus(task: Task) -> list[str]:
    """Texts covering every character of the task's prompts and solutions, for tokenizer training:
    the built-in alphabet (if ``task.name`` is a built-in task) followed by all prompts, solutions
    and answers of the train and test rows, then those of the warm-start's own demonstrations that
    are not already there."""
    texts = [corpus(task.name)] + TASKS[task.name].corpus_texts(task.train) if task.name in TASKS else []
    for row in [*task.train, *task.test]:
        texts.extend(_row_texts(row))
    seen = set(texts)  # a demonstration row split off the training rows adds its texts once
    for row in task.demonstrations or []:
        texts.extend(text for text in _row_texts(row) if text not in seen)
    return texts


def _row_texts(row: Row) -> list[str]:
    return [str(row[key]) for key in ("prompt", "solution", "answer") if row.get(key) is not None]
