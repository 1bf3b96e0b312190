"""A classic run written as a run folder reads back like an LLM run: budget, seconds, score."""

from pathlib import Path

import pytest

from posttrain.classic.config import RunResult, make_config
from posttrain.classic.folders import metric_rows, write_run_folder
from posttrain.report.runs import read_run


def result() -> RunResult:
    # episodes ending at env steps 10, 30, 35, 80; 100 steps in 20 s
    curve = [(10, 1.0), (30, 3.0), (35, 5.0), (80, 7.0)]
    return RunResult("CartPole-v1", "grpo:togo", 2, 100, 20.0, final_return=6.0, curve=curve)


def test_metric_rows_bin_the_steps_and_average_the_last_episodes() -> None:
    rows = metric_rows(result(), window=2, bins=4)
    assert [r["step"] for r in rows] == [25, 50, 75, 100, 100]
    assert [r.get("env_steps") for r in rows] == [25, 25, 25, 25, None]
    assert [r.get("time/train") for r in rows[:4]] == [5.0, 5.0, 5.0, 5.0]
    # mean of the last two episodes ended by each bin: (1), (3, 5), (3, 5), (5, 7); then the final
    assert [r["return_mean"] for r in rows] == [1.0, 4.0, 4.0, 6.0, 6.0]
    assert rows[-1]["final"] == 1.0
    assert "return_mean" not in metric_rows(RunResult("E", "ppo", 0, 100, 1.0, 6.0, [(60, 6.0)]), 2, 4)[0]


def test_the_folder_reads_as_a_run(tmp_path: Path) -> None:
    config = make_config("CartPole-v1", "grpo", seed=2, total_steps=100, final_window=2)
    run = read_run(write_run_folder(result(), config, tmp_path / "grpo:togo-s2", bins=4))
    assert (run.group, run.seed, run.metric, run.budget_name) == (
        "grpo:togo",
        2,
        "return_mean",
        "environment steps",
    )
    assert run.budget.tolist() == [25, 50, 75, 100] and run.seconds.tolist() == [5.0, 10.0, 15.0, 20.0]
    assert run.final == pytest.approx(6.0)
