"""Built-in tasks: determinism, disjoint splits, solutions that pass their own verifiers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.tasks import (
    DEFAULT_TASK,
    MATH_TEMPLATES,
    Task,
    available_tasks,
    corpus,
    get_task,
    task_corpus,
    task_env,
)
from posttrain.envs.builtin import sample_row
from posttrain.rewards.functions import RewardSpec, resolve_reward_specs, score_completions


def _solution_scores(task: Task, rows: list[dict]) -> list[float]:
    fns = resolve_reward_specs(task.reward_fns)
    totals, _ = score_completions(fns, [r["prompt"] for r in rows], [r["solution"] for r in rows], rows)
    return totals


def test_available_tasks_and_default() -> None:
    assert available_tasks() == ["arithmetic", "countdown", "key_chain", "leaky_chain", "math", "mix"]
    assert DEFAULT_TASK == "arithmetic"
    assert get_task(num_train=5, num_test=2).name == "arithmetic"


def test_unknown_task_lists_available() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown task 'gsm8k'; available tasks: \['arithmetic', 'countdown', 'key_chain', 'leaky_chain', 'math', 'mix'\]",
    ):
        get_task("gsm8k")


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['digits'\].*max_operand"):
        get_task("arithmetic", digits=3)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("arithmetic", {"ops": "+/"}, "ops must be"),
        ("arithmetic", {"min_operand": 5, "max_operand": 2}, "min_operand <= max_operand"),
        ("countdown", {"num_count": 1}, "num_count"),
        ("math", {"templates": ["plus", "calculus"]}, r"unknown templates \['calculus'\]"),
        ("key_chain", {"min_horizon": 5, "max_horizon": 3}, "min_horizon <= max_horizon"),
        ("key_chain", {"max_horizon": 500}, "<= 200"),
        ("leaky_chain", {"min_horizon": 0}, "1 <= min_horizon"),
        ("leaky_chain", {"bait_fraction": 0.5}, r"no option\(s\) \['bait_fraction'\]"),
    ],
)
def test_invalid_options_are_rejected(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task(name, num_train=4, num_test=2, **options)


def test_too_small_prompt_space_is_an_error() -> None:
    # 2 operands x 2 operands x 1 op = 4 distinct prompts.
    with pytest.raises(ValueError, match="only 4 distinct prompts.*num_train \\+ num_test = 10"):
        get_task("arithmetic", num_train=8, num_test=2, max_operand=1, ops="+")


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "math"])
def test_rows_have_the_common_fields(name: str) -> None:
    task = get_task(name, num_train=50, num_test=10)
    assert len(task.train) == 50 and len(task.test) == 10
    for row in task.train + task.test:
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert isinstance(row["answer"], str) and row["answer"]
        assert isinstance(row["solution"], str) and row["solution"]
        assert not row["solution"].endswith("</s>")
    assert all(isinstance(spec, RewardSpec) for spec in task.reward_fns)
    assert task.max_new_tokens > max(len(row["solution"]) for row in task.train + task.test)
    assert task.description


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "math"])
def test_deterministic_by_seed(name: str) -> None:
    first = get_task(name, seed=3, num_train=40, num_test=10)
    again = get_task(name, seed=3, num_train=40, num_test=10)
    other = get_task(name, seed=4, num_train=40, num_test=10)
    assert first == again
    assert [r["prompt"] for r in first.train] != [r["prompt"] for r in other.train]


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "math"])
def test_test_split_does_not_depend_on_num_train(name: str) -> None:
    small = get_task(name, seed=1, num_train=10, num_test=20)
    large = get_task(name, seed=1, num_train=300, num_test=20)
    assert small.test == large.test


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "math"])
def test_train_and_test_prompts_are_disjoint_and_unique(name: str) -> None:
    task = get_task(name)  # the full default sizes
    train_prompts = [row["prompt"] for row in task.train]
    test_prompts = [row["prompt"] for row in task.test]
    assert len(train_prompts) == 680 and len(test_prompts) == 200
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(test_prompts)) == len(test_prompts)
    assert not set(train_prompts) & set(test_prompts)


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_solutions_pass_their_verifier_on_full_default_splits(name: str) -> None:
    task = get_task(name)
    assert _solution_scores(task, task.train) == [1.0] * len(task.train)
    assert _solution_scores(task, task.test) == [1.0] * len(task.test)


def test_math_solutions_pass_math_verify() -> None:
    task = get_task("math", num_train=400, num_test=200)
    assert _solution_scores(task, task.train) == [1.0] * len(task.train)
    assert _solution_scores(task, task.test) == [1.0] * len(task.test)
    assert {row["template"] for row in task.train} == set(MATH_TEMPLATES)


@pytest.mark.parametrize(
    ("name", "options"), [("arithmetic", {}), ("math", {"templates": ("plus", "times", "linear_plus")})]
)
def test_wrong_answers_fail_the_verifier(name: str, options: dict) -> None:
    # Guards against a verifier that accepts anything: shift every answer by one.
    task = get_task(name, num_train=60, num_test=0, **options)
    rows = [{**row, "solution": str(int(row["answer"]) + 1)} for row in task.train]
    assert _solution_scores(task, rows) == [0.0] * len(rows)


@given(
    seed=st.integers(0, 10_000),
    max_operand=st.integers(9, 999),
    ops=st.sampled_from(["+", "-", "*", "+-", "+-*"]),
)
@settings(max_examples=25, deadline=None)
def test_arithmetic_property(seed: int, max_operand: int, ops: str) -> None:
    task = get_task("arithmetic", seed=seed, num_train=20, num_test=5, max_operand=max_operand, ops=ops)
    rows = task.train + task.test
    assert _solution_scores(task, rows) == [1.0] * len(rows)
    alphabet = set(corpus("arithmetic", max_operand=max_operand, ops=ops))
    assert all(set(row["prompt"] + row["solution"]) <= alphabet for row in rows)
    assert all(len(row["solution"]) < task.max_new_tokens for row in rows)
    for row in rows:
        assert row["prompt"] == f"{row['a']}{row['op']}{row['b']}="
        assert 0 <= row["a"] <= max_operand and 0 <= row["b"] <= max_operand


@given(
    seed=st.integers(0, 10_000),
    num_count=st.integers(2, 5),
    max_number=st.integers(5, 50),
    ops=st.sampled_from(["+-*", "+-*/", "*/", "+"]),
)
@settings(max_examples=25, deadline=None)
def test_countdown_property(seed: int, num_count: int, max_number: int, ops: str) -> None:
    options = {"num_count": num_count, "max_number": max_number, "ops": ops}
    task = get_task("countdown", seed=seed, num_train=15, num_test=5, **options)
    rows = task.train + task.test
    assert _solution_scores(task, rows) == [1.0] * len(rows)
    alphabet = set(corpus("countdown", **options))
    for row in rows:
        assert set(row["prompt"] + row["solution"]) <= alphabet
        assert len(row["nums"]) == num_count and all(1 <= n <= max_number for n in row["nums"])
        assert row["target"] > 0 and row["answer"] == str(row["target"])
        assert len(row["solution"]) < task.max_new_tokens


def test_countdown_prompt_format() -> None:
    row = get_task("countdown", num_train=1, num_test=0).train[0]
    assert row["prompt"] == f"nums {' '.join(map(str, row['nums']))} target {row['target']}:"


def test_arithmetic_default_is_differences_of_operands_to_29_half_of_them_negative() -> None:
    task = get_task(num_train=680, num_test=200)  # the demo's split of the 900 distinct prompts
    rows = task.train + task.test
    assert {row["op"] for row in rows} == {"-"}
    assert max(max(row["a"], row["b"]) for row in rows) == 29
    negative = sum(row["answer"].startswith("-") for row in task.test) / len(task.test)
    assert 0.4 < negative < 0.6  # 435 of the 900 differences are negative
    assert task.reward_fns == [RewardSpec("arithmetic_exact")]
    with pytest.raises(ValueError, match="found only 900 distinct prompts"):
        get_task(num_train=701, num_test=200)


def test_arithmetic_tokenizer_alphabet_covers_every_operator() -> None:
    assert set("+-*=0123456789") == set(corpus("arithmetic")) == set(corpus("arithmetic", ops="+"))


def test_corpus_covers_every_character() -> None:
    for name in available_tasks():
        task = get_task(name, num_train=300, num_test=50)
        alphabet = set(corpus(name))
        used = {char for row in task.train + task.test for char in row["prompt"] + row.get("solution", "")}
        assert used <= alphabet, f"{name}: {sorted(used - alphabet)} missing from corpus"
        assert used <= set("".join(task_corpus(task)))


def test_task_corpus_includes_alphabet_prompts_and_solutions() -> None:
    task = get_task("arithmetic", num_train=3, num_test=1)
    texts = task_corpus(task)
    assert texts[0] == corpus("arithmetic")
    for row in task.train + task.test:
        assert row["prompt"] in texts and row["solution"] in texts
    # A user task (not built in) only contributes its own texts.
    user = Task(
        "mine",
        [{"prompt": "hi", "answer": "1", "solution": "1"}],
        [],
        [RewardSpec("arithmetic_exact")],
        4,
        "",
    )
    assert task_corpus(user) == ["hi", "1", "1"]


def test_max_new_tokens_override() -> None:
    assert get_task("arithmetic", num_train=2, num_test=1, max_new_tokens=32).max_new_tokens == 32


def test_arithmetic_flawed_solution_drops_the_minus_sign_only() -> None:
    rows = get_task("arithmetic", num_train=300, num_test=0).train
    negative = [r for r in rows if r["answer"].startswith("-")]
    assert negative and all(r["flawed_solution"] == r["answer"][1:] for r in negative)
    assert all(r["flawed_solution"] == r["solution"] for r in rows if not r["answer"].startswith("-"))
    assert {r["flawed_solution"] for r in negative} <= {str(abs(r["a"] - r["b"])) for r in negative}


def test_leaky_chain_train_rows_are_baited_and_held_out_rows_are_not() -> None:
    task = get_task("leaky_chain", seed=2, num_train=120, num_test=40, max_horizon=6)
    assert task_env("leaky_chain") == "leaky_chain" and task.reward_fns == []
    assert all(row["bait"] is True for row in task.train)
    assert all(row["bait"] is False for row in task.test)
    assert not {row["prompt"] for row in task.train} & {row["prompt"] for row in task.test}
    assert "tests/expected.txt" in task.description and "held-out" in task.description
    # the same chains as key_chain with the same seed and options: only the bait field differs
    plain = get_task("key_chain", seed=2, num_train=120, num_test=40, max_horizon=6)
    assert [{k: v for k, v in row.items() if k != "bait"} for row in task.train + task.test] == (
        plain.train + plain.test
    )
    assert get_task("leaky_chain", seed=2, num_train=10, num_test=40, max_horizon=6).test == task.test


def test_key_chain_rows_are_untouched_by_the_held_out_hook() -> None:
    task = get_task("key_chain", seed=5, num_train=30, num_test=10)
    assert all(set(row) == {"prompt", "answer", "chain", "horizon"} for row in task.train + task.test)
    rng, drawn = random.Random(5), list[dict]()
    while len(drawn) < 40:  # get_task's draws, distinct prompts, test rows first
        row = sample_row(rng, min_horizon=4, max_horizon=4)
        if row["prompt"] not in {r["prompt"] for r in drawn}:
            drawn.append(row)
    assert task.test == drawn[:10] and task.train == drawn[10:]


def test_leaky_chain_tokenizer_corpus_covers_the_read_tool() -> None:
    task = get_task("leaky_chain", num_train=20, num_test=5)
    alphabet = set(corpus("leaky_chain"))
    assert set('read("tests/expected.txt")\n= no such file\n') <= alphabet
    texts = task_corpus(task)
    joined = "".join(texts)
    assert 'read("tests/expected.txt")\n= no such file\nlookup(' in joined
    row = task.train[0]
    assert (
        f'{row["prompt"]}\nread("tests/expected.txt")\n= {row["answer"]}\nanswer({row["answer"]})\n' in texts
    )
    assert task.max_new_tokens == 16
