"""The built-in task ``mix``: several built-in tasks in one dataset, each row with its ``domain``."""

from __future__ import annotations

import pytest

from posttrain.data.mixture import domain_reward
from posttrain.data.tasks import available_tasks, get_task
from posttrain.rewards.functions import resolve_reward_specs, score_completions
from posttrain.train.config import ConfigError, load_config


def test_a_domains_rows_are_the_single_tasks_rows_tagged_and_alternating():
    mix = get_task("mix", seed=3, num_train=5, num_test=4)
    assert "mix" in available_tasks()
    for domain in ("arithmetic", "countdown"):
        alone = get_task(domain, seed=3, num_train=5, num_test=4)
        assert [r for r in mix.test if r["domain"] == domain] == [{**r, "domain": domain} for r in alone.test]
        assert [r for r in mix.train if r["domain"] == domain] == [
            {**r, "domain": domain} for r in alone.train
        ]
    assert [r["domain"] for r in mix.test] == ["arithmetic", "countdown"] * 4  # any prefix holds both
    # the held-out rows of a domain do not depend on how many training rows are drawn, so an expert
    # trained on the single task with more rows never saw them either
    expert = get_task("countdown", seed=3, num_train=50, num_test=4)
    assert {r["prompt"] for r in expert.train}.isdisjoint(r["prompt"] for r in mix.test)
    assert mix.max_new_tokens == max(
        get_task(d, num_train=0, num_test=0).max_new_tokens for d in ("arithmetic", "countdown")
    )


def score(row: dict, completion: str) -> float:
    return domain_reward(row["prompt"], completion, **{k: v for k, v in row.items() if k != "prompt"})


def test_each_row_is_scored_by_its_own_tasks_reward():
    mix = get_task("mix", seed=0, num_train=0, num_test=2)
    arithmetic, countdown = mix.test[0], mix.test[1]
    assert score(arithmetic, arithmetic["answer"]) == 1.0
    assert score(arithmetic, "999") == 0.0
    assert score(countdown, countdown["solution"]) == 1.0
    # the countdown verifier, not exact match: the target itself is no equation over the numbers
    assert score(countdown, countdown["answer"]) < 1.0
    rows = [arithmetic, countdown]
    totals, _ = score_completions(
        resolve_reward_specs(mix.reward_fns), [r["prompt"] for r in rows], [r["solution"] for r in rows], rows
    )
    assert totals == [1.0, 1.0]
    with pytest.raises(ValueError, match="not a built-in task"):
        domain_reward("1-2=", "-1", answer="-1", domain="algebra")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tasks": ["arithmetic", "key_chain"]}, "'key_chain' is not a built-in single-turn task"),
        ({"tasks": ["arithmetic", "arithmetic"]}, "listed twice"),
        ({"tasks": "arithmetic"}, "non-empty list"),
        ({"tasks": ["arithmetic"], "options": {"countdown": {"num_count": 3}}}, "not in tasks"),
        ({"options": {"countdown": {"num_count": 9}}}, "num_count"),
        ({"weights": [1, 2]}, r"no option\(s\) \['weights'\]"),
    ],
)
def test_bad_mix_options_fail(options, message):
    with pytest.raises(ValueError, match=message):
        get_task("mix", num_train=0, num_test=0, **options)


def test_bad_mix_options_fail_at_config_load_naming_the_key():
    with pytest.raises(ConfigError, match="data.task_options.*'math2' is not a built-in single-turn task"):
        load_config(None, ["data.task=mix", "data.task_options={tasks: [arithmetic, math2]}"])
    cfg = load_config(None, ["data.task=mix", "data.task_options={tasks: [arithmetic, math], options: {}}"])
    assert cfg.data.task == "mix"
