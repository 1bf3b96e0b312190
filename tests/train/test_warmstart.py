"""Supervised warm-start: flawed demonstrations, caching, and what the model learns from them."""

import random
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.tasks import Task, get_task
from posttrain.models.forward import token_logprobs
from posttrain.models.load import load_policy
from posttrain.rollout.collector import encode_prompt
from posttrain.train.warmstart import demonstration, supervised_batch, warm_start

ROW = {"prompt": "3-9=", "answer": "-6", "solution": "-6", "flawed_solution": "6"}


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, "-6"), (1.0, "6")])
def test_demonstration_at_the_extremes(fraction: float, expected: str) -> None:
    rng = random.Random(0)
    assert {demonstration(ROW, rng, fraction)["solution"] for _ in range(50)} == {expected}


def test_demonstration_mixes_at_the_given_rate_and_keeps_the_row() -> None:
    rng = random.Random(0)
    draws = [demonstration(ROW, rng, 0.8) for _ in range(4000)]
    flawed = sum(d["solution"] == "6" for d in draws) / len(draws)
    assert abs(flawed - 0.8) < 0.03  # 4000 Bernoulli(0.8) draws: std 0.006
    assert ROW["solution"] == "-6"  # the task's row is never modified
    assert all(d["answer"] == "-6" for d in draws)


def test_rows_without_a_flawed_solution_are_untouched_and_draw_nothing() -> None:
    rng = random.Random(0)
    row = {"prompt": "p", "solution": "s"}
    assert demonstration(row, rng, 1.0) is row
    assert rng.random() == random.Random(0).random()


def test_supervised_batch_masks_the_prompt_and_keeps_eos(tiny_model_dir) -> None:
    _, tokenizer = load_policy(tiny_model_dir)
    rows = [{"prompt": "3-9=", "solution": "-6"}, {"prompt": "12+3=", "solution": "15"}]
    input_ids, attention_mask, loss_mask = supervised_batch(tokenizer, rows)
    for i, row in enumerate(rows):
        prompt = encode_prompt(tokenizer, row["prompt"])
        target = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt) + len(target)
        assert input_ids[i, :length].tolist() == prompt + target
        assert loss_mask[i].tolist() == [0.0] * len(prompt) + [1.0] * len(target) + [0.0] * (
            input_ids.shape[1] - length
        )
        assert attention_mask[i].sum() == length


@torch.no_grad()
def _minus_logprob(model_dir, prompts) -> float:
    model, tokenizer = load_policy(model_dir)
    minus = tokenizer("-", add_special_tokens=False)["input_ids"]
    total = 0.0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt) + minus
        logprobs, _ = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        total += float(logprobs[0, -1])
    return total / len(prompts)


@pytest.mark.slow
def test_flawed_demonstrations_teach_the_flaw_and_the_result_is_cached(tiny_model_dir, tmp_path) -> None:
    task = get_task("arithmetic", num_train=200, num_test=20)
    negatives = [row["prompt"] for row in task.test if row["answer"].startswith("-")]

    def run(fraction: float):
        settings = SimpleNamespace(
            steps=60, lr=3e-3, weight_decay=0.0, batch_size=32, flawed_fraction=fraction
        )
        return warm_start(
            tiny_model_dir, tmp_path / f"warm-{fraction}", task, settings, seed=0, progress=False
        )

    clean, flawed = run(0.0), run(1.0)
    # Same seed, same rows: only the demonstrations differ, and the flaw is learned: a negative
    # difference is written without its minus sign.
    assert _minus_logprob(flawed, negatives) < _minus_logprob(clean, negatives) - 1.0
    stamp = (flawed / "config.json").stat().st_mtime_ns
    assert run(1.0) == flawed and (flawed / "config.json").stat().st_mtime_ns == stamp


def test_warm_start_imitates_the_tasks_own_demonstrations(tiny_model_dir, tmp_path) -> None:
    """Training rows without solutions are never read; demonstration rows without one are skipped."""
    task = Task(
        name="own",
        train=[{"prompt": "1+1="}],  # would fail to tokenise a solution if the warm-start read it
        test=[],
        reward_fns=[],
        max_new_tokens=4,
        description="",
        demonstrations=[{"prompt": "2+2=", "solution": "4"}, {"prompt": "3+3=", "solution": None}],
    )
    settings = SimpleNamespace(steps=2, lr=1e-2, weight_decay=0.0, batch_size=4, flawed_fraction=0.0)
    out = warm_start(tiny_model_dir, tmp_path / "warm", task, settings, seed=0, progress=False)
    tuned, _ = load_policy(out)
    start, _ = load_policy(tiny_model_dir)
    assert not torch.equal(tuned.model.embed_tokens.weight, start.model.embed_tokens.weight)
    task.demonstrations = [{"prompt": "3+3=", "solution": None}]
    with pytest.raises(ValueError, match="task 'own' has no rows to warm-start on"):
        warm_start(tiny_model_dir, tmp_path / "none", task, settings, seed=0, progress=False)
