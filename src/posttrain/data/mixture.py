"""The built-in task ``mix``: several built-in single-turn tasks in one dataset.

``data.task: mix`` with ``data.task_options.tasks: [arithmetic, countdown]`` (and, optionally,
``data.task_options.options: {countdown: {num_count: 3}}``). Each row carries its task's name in
``domain`` (what distillation routes on, ``distill.route_field: domain``) and is scored by that
task's own reward functions (``domain_reward``). Every task draws its rows exactly as
``get_task(name, seed=..., num_train=..., num_test=...)`` does, so a domain's held-out rows are the
held-out rows of the single task with the same seed and ``num_test``: an expert trained on that task
never saw them. ``num_train`` and ``num_test`` count rows per task; the domains alternate in both
splits, so any prefix of the test rows (``eval.num_prompts``) holds every task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import zip_longest
from typing import Any

from posttrain.data.tasks import MIX_TASK, TASKS, Task, corpus, get_task
from posttrain.rewards.functions import BUILTIN_REWARDS, RewardSpec

DEFAULT_TASKS = ("arithmetic", "countdown")
DOMAIN_FIELD = "domain"


def domain_reward(prompt: str, completion: str, **row: Any) -> float:
    """The row's own task's reward: the sum of the rewards of built-in task ``row["domain"]``
    (1.0 for a correct answer on arithmetic and countdown)."""
    domain = row.get(DOMAIN_FIELD)
    if domain not in TASKS:
        raise ValueError(f"domain_reward: the row's {DOMAIN_FIELD!r} is {domain!r}, not a built-in task")
    return sum(float(BUILTIN_REWARDS[name](prompt, completion, **row)) for name in TASKS[domain].rewards)


def _check(tasks: Sequence[str], options: Mapping[str, Any]) -> None:
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"task 'mix': tasks must be a non-empty list of built-in task names, got {tasks!r}")
    for name in tasks:
        if name not in TASKS or TASKS[name].env is not None or not TASKS[name].rewards:
            single = sorted(n for n, d in TASKS.items() if d.env is None and d.rewards)
            raise ValueError(f"task 'mix': {name!r} is not a built-in single-turn task; choose from {single}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task 'mix': a task is listed twice in {list(tasks)}")
    stray = sorted(set(options) - set(tasks))
    if stray:
        raise ValueError(f"task 'mix': options given for {stray[0]!r}, which is not in tasks {list(tasks)}")


def _alternate(parts: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Row 0 of every part, then row 1 of every part, ..."""
    return [row for group in zip_longest(*parts) for row in group if row is not None]


def _settings(settings: Mapping[str, Any]) -> tuple[Sequence[str], Mapping[str, Any]]:
    """(tasks, options by task) of the mix's ``settings``, checked."""
    unknown = sorted(set(settings) - {"tasks", "options", "max_new_tokens"})
    if unknown:
        raise ValueError(
            f"task {MIX_TASK!r} has no option(s) {unknown}; its options are ['options', 'tasks'] plus max_new_tokens"
        )
    tasks: Sequence[str] = settings.get("tasks", DEFAULT_TASKS)
    options: Mapping[str, Any] = settings.get("options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"task {MIX_TASK!r}: options must map task names to their options, got {options!r}")
    _check(tasks, options)
    return tasks, options


def mixed_corpus(**settings: Any) -> str:
    """Every character of the mixed tasks' prompts and solutions (sorted)."""
    tasks, options = _settings({key: value for key, value in settings.items() if key != "max_new_tokens"})
    return "".join(sorted(set().union(*(corpus(name, **dict(options.get(name, {}))) for name in tasks))))


def mixed_task(*, seed: int, num_train: int, num_test: int, **settings: Any) -> Task:
    """The mixture of built-in ``tasks`` (default arithmetic and countdown; ``options``: each task's
    own options by name; ``max_new_tokens``: the budget, default the largest task's), with
    ``num_train`` / ``num_test`` rows per task."""
    tasks, options = _settings(settings)
    max_new_tokens = settings.get("max_new_tokens")
    parts = [
        get_task(name, seed=seed, num_train=num_train, num_test=num_test, **dict(options.get(name, {})))
        for name in tasks
    ]
    tagged = [
        (
            [{**row, DOMAIN_FIELD: part.name} for row in part.train],
            [{**row, DOMAIN_FIELD: part.name} for row in part.test],
        )
        for part in parts
    ]
    return Task(
        name=MIX_TASK,
        train=_alternate([train for train, _ in tagged]),
        test=_alternate([test for _, test in tagged]),
        reward_fns=[RewardSpec(domain_reward)],
        max_new_tokens=int(max_new_tokens) if max_new_tokens else max(part.max_new_tokens for part in parts),
        description=f"A mixture of built-in tasks {list(tasks)}, each row tagged with its task in "
        f"{DOMAIN_FIELD!r} and scored by that task's rewards.",
    )
