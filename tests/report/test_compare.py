"""The comparison harness on hand-made run folders: curves, table numbers, threshold, recommendation."""

from __future__ import annotations

import json
import operator
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.report.compare import default_threshold, recommendation, summarize, table_rows, write_report
from posttrain.report.jobs import Job, run_jobs
from posttrain.report.runs import (
    RunReadError,
    expand_run_folders,
    read_run,
    read_runs,
    step_seconds,
    write_stats,
)


def make_run(
    root: Path, algorithm: str, seed: int, scores: list[float], tokens: int = 100, every: int = 2
) -> Path:
    """A run folder as ``posttrain train`` writes it: an eval before RL (step 0), one RL row per
    step (``tokens`` sampled tokens, 1.5 s), an in-loop eval every ``every`` steps, and the final
    eval in its own row. ``scores``: the evals in order (the first is step 0's, the last the final)."""
    run = root / f"{algorithm}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": algorithm, "run": {"seed": seed}}))
    steps = every * (len(scores) - 1)
    rows = [{"step": 0, "eval_accuracy": scores[0]}]
    for step in range(1, steps + 1):
        row = {"step": step, "sampled_tokens": tokens, "time/generate": 1.0, "time/train": 0.5}
        if step % every == 0 and step < steps:
            row["eval_accuracy"] = scores[step // every]
        rows.append(row)
    rows.append({"step": steps, "eval_accuracy": scores[-1], "final": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_read_run_counts_tokens_and_seconds_up_to_each_evaluation(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path, "grpo", 3, [0.2, 0.5, 0.9], tokens=100, every=2))
    assert (run.group, run.seed, run.metric, run.budget_name) == (
        "grpo",
        3,
        "eval_accuracy",
        "sampled tokens",
    )
    assert run.step.tolist() == [0, 2, 4]
    assert run.budget.tolist() == [0, 200, 400]  # the eval at step s comes after step s
    assert run.seconds.tolist() == [0.0, 3.0, 6.0]
    assert run.score.tolist() == [0.2, 0.5, 0.9] and run.final == 0.9
    assert (run.total_budget, run.total_seconds) == (400, 6.0)
    assert run.peak_rss_mb is None
    write_stats(run.path, {"peak_rss_mb": 512.5, "wall_s": 9.0})
    assert read_run(run.path).peak_rss_mb == 512.5


def test_step_seconds_is_time_step_else_the_sum_of_top_level_phases() -> None:
    assert (
        step_seconds({"time/step": 2.5, "time/generate": 1.0, "time/train": 1.4, "time/optimizer": 0.2})
        == 2.5
    )
    assert step_seconds({"time/generate": 1.0, "time/train": 2.0, "time/train/backward": 1.5, "kl": 3}) == 3.0
    assert step_seconds({"time/generate": float("nan")}) == 0.0


def test_bad_folders_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(RunReadError, match="is not a run folder"):
        read_run(tmp_path)
    run = make_run(tmp_path, "ppo", 0, [0.1, 0.2])
    with pytest.raises(RunReadError, match="eval_reward.*--metric.*eval_accuracy"):
        read_run(run, "eval_reward")


def test_a_folder_of_runs_stands_for_its_runs(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "ppo", 0, [0.1, 0.2]), make_run(tmp_path, "grpo", 0, [0.1, 0.3])
    (tmp_path / "logs").mkdir()
    assert expand_run_folders([tmp_path]) == [b, a]  # sorted, the logs folder left out
    assert [r.group for r in read_runs([tmp_path])] == ["grpo", "ppo"]


def three_seeds(root: Path, algorithm: str, finals: list[float], middle: list[float]) -> list[Path]:
    return [make_run(root, algorithm, seed, [0.4, m, f]) for seed, (m, f) in enumerate(zip(middle, finals))]


def test_table_numbers_threshold_and_a_clear_winner(tmp_path: Path) -> None:
    three_seeds(tmp_path, "grpo", [0.8, 0.9, 1.0], middle=[0.86, 0.7, 0.9])
    three_seeds(tmp_path, "ppo", [0.5, 0.6, 0.7], middle=[0.5, 0.5, 0.5])
    runs = read_runs([tmp_path])
    threshold, rule = default_threshold(runs)
    assert threshold == pytest.approx(0.4 + 0.9 * (0.9 - 0.4))  # 0.85: 90% of the way from start to best
    assert "90%" in rule
    grpo, ppo = sorted(summarize(runs, threshold), key=lambda s: s.group)
    assert (grpo.mean, grpo.std, grpo.worst) == (pytest.approx(0.9), pytest.approx(0.1), 0.8)
    # seed 0 reaches 0.85 at step 2 (0.86) (200 tokens, 3 s), seed 2 at step 2, seed 1 only at its final (400, 6 s)
    assert grpo.reached == 3
    assert grpo.budget_to_threshold == pytest.approx((200 + 400 + 200) / 3)
    assert grpo.seconds_to_threshold == pytest.approx((3 + 6 + 3) / 3)
    assert (ppo.reached, ppo.budget_to_threshold, ppo.seconds_to_threshold) == (0, None, None)
    rows = {row["algorithm"]: row for row in table_rows([grpo, ppo], "eval_accuracy", "sampled tokens")}
    assert rows["grpo"]["final eval_accuracy"] == "0.900 ± 0.100"
    assert rows["ppo"]["final eval_accuracy"] == "0.600 ± 0.100"
    assert rows["grpo"]["reached thr."] == "3/3" and rows["ppo"]["reached thr."] == "0/3"
    assert rows["grpo"]["sampled tokens to thr."] == "267" and rows["ppo"]["sampled tokens to thr."] == "-"
    text = recommendation([grpo, ppo], "eval_accuracy", threshold, rule, "sampled tokens")
    assert text.startswith("**Recommendation: grpo.**")
    assert "0.300 above ppo (0.600 ± 0.100)" in text and "the larger std is 0.100" in text
    assert "grpo in 3/3 seeds (267 sampled tokens, 4 s of training)" in text and "ppo in 0/3 seeds" in text


def test_a_lead_within_the_seed_spread_is_no_clear_winner(tmp_path: Path) -> None:
    three_seeds(tmp_path, "grpo", [0.8, 0.9, 1.0], middle=[0.5, 0.5, 0.5])
    three_seeds(tmp_path, "dapo", [0.75, 0.85, 0.95], middle=[0.5, 0.5, 0.5])
    three_seeds(tmp_path, "ppo", [0.2, 0.3, 0.4], middle=[0.5, 0.5, 0.5])
    runs = read_runs([tmp_path])
    summaries = summarize(runs, 0.95)
    assert [s.group for s in summaries] == ["grpo", "dapo", "ppo"]  # best mean first
    text = recommendation(summaries, "eval_accuracy", 0.95, "given", "sampled tokens")
    assert text.startswith("**No clear winner.**")
    assert "0.050 above dapo (0.850 ± 0.100)" in text and "its lead over dapo does not exceed" in text
    assert "grpo in 1/3 seeds" in text and "dapo in 1/3 seeds" in text and "ppo in 0/3" in text


def test_one_seed_or_one_algorithm_is_no_recommendation(tmp_path: Path) -> None:
    make_run(tmp_path, "grpo", 0, [0.4, 0.9])
    make_run(tmp_path, "ppo", 0, [0.4, 0.5])
    runs = read_runs([tmp_path])
    two = recommendation(summarize(runs, 0.8), "eval_accuracy", 0.8, "given", "sampled tokens")
    assert two.startswith("**No clear winner.**") and "single seed" in two and "--seeds 3" in two
    grpo = [run for run in runs if run.group == "grpo"]
    one = recommendation(summarize(grpo, 0.8), "eval_accuracy", 0.8, "given", "sampled tokens")
    assert one.startswith("**Only one algorithm (grpo)")


def test_no_improvement_sets_the_threshold_at_the_best_final(tmp_path: Path) -> None:
    make_run(tmp_path, "grpo", 0, [0.5, 0.4])
    make_run(tmp_path, "ppo", 0, [0.5, 0.3])
    threshold, rule = default_threshold(read_runs([tmp_path]))
    assert threshold == 0.4 and "no algorithm improved" in rule


def test_write_report_writes_the_table_the_paragraph_and_the_figure(tmp_path: Path) -> None:
    three_seeds(tmp_path / "runs", "grpo", [0.8, 0.9, 1.0], middle=[0.86, 0.7, 0.9])
    three_seeds(tmp_path / "runs", "ppo", [0.5, 0.6, 0.7], middle=[0.5, 0.5, 0.5])
    comparison = write_report(read_runs([tmp_path / "runs"]), tmp_path / "out", command="posttrain compare x")
    markdown = comparison.report_md.read_text()
    assert "```bash\nposttrain compare x\n```" in markdown
    assert "| grpo | 3 | 0.900 ± 0.100 | 0.800 | 3/3 | 267 | 4.0 | - |" in markdown
    assert comparison.recommendation in markdown and "![score curves](curves.png)" in markdown
    assert "eval_accuracy by algorithm (mean ± std over seeds), 4 steps per run" in comparison.table
    assert "0.900 ± 0.100" in comparison.table
    assert comparison.plot_png.read_bytes()[:4] == b"\x89PNG" and comparison.plot_png.stat().st_size > 5000
    summary = json.loads(comparison.summary_json.read_text())
    assert summary["threshold"] == pytest.approx(0.85)
    assert [g["group"] for g in summary["groups"]] == ["grpo", "ppo"] and summary["groups"][0]["seeds"] == 3


def _count_to(total: int, report) -> int:
    for done in range(1, total + 1):
        report(done)
    if total == 2:
        raise ValueError("two is too many")
    return total


def test_run_jobs_keeps_order_and_reports_a_failure_without_stopping(capsys) -> None:
    jobs = [Job(f"job {n}", n, _count_to, n) for n in (1, 2, 3)]
    lines: list[str] = []
    outcomes = run_jobs(jobs, 1, show=False, isolate=False, on_done=lambda o: lines.append(o.job.label) or "")
    assert [o.result for o in outcomes] == [1, None, 3]
    assert outcomes[1].error == "ValueError: two is too many"
    assert lines == ["job 1", "job 2", "job 3"]
    with pytest.raises(ValueError, match="workers"):
        run_jobs(jobs, 0)


def test_run_jobs_in_processes_measures_memory_and_survives_errors_and_deaths() -> None:
    # operator.call(arg, report) == arg(report): repr returns, int raises, sys.exit ends the process
    jobs = [
        Job(label, 1, operator.call, arg) for label, arg in (("ok", repr), ("error", int), ("dies", sys.exit))
    ]
    ok, error, dies = run_jobs(jobs, 2, show=False, isolate=True)
    assert ok.result.startswith("<function") and ok.error is None and ok.peak_rss_mb > 5 and ok.wall_s >= 0
    assert error.result is None and error.error.startswith("TypeError: int() argument")
    assert dies.result is None and "exited with code 1 without a result" in dies.error
