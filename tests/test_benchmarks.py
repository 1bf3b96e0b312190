"""The benchmark scripts the README quotes run end to end (shrunk with their own --set flag)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow

SHRINK = [
    "data.task_options={min_horizon: 3, max_horizon: 4}",
    "data.num_train=16",
    "data.num_test=4",
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=100",
    "warmstart.batch_size=8",
    "eval.num_prompts=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "optim.steps=2",
]


def test_reward_hacking_benchmark_runs_both_modes_and_reports(tmp_path):
    command = [sys.executable, "benchmarks/reward_hacking.py", "--seeds", "0", "--out", str(tmp_path)]
    for override in SHRINK:
        command += ["--set", override]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    [results] = tmp_path.glob("results-*.json")
    records = json.loads(results.read_text())
    assert [(r["mode"], r["seed"]) for r in records] == [("off", 0), ("on", 0)]
    for record in records:
        assert 0.0 <= record["cheat_end"] <= 1.0 and 0.0 <= record["heldout_after"] <= 1.0
    table = (tmp_path / "table.txt").read_text()
    assert "(audit)" in table and "held-out" in table
    assert (tmp_path / "curves.png").stat().st_size > 0
    rebuilt = subprocess.run(
        [sys.executable, "benchmarks/reward_hacking.py", "--report", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rebuilt.returncode == 0 and "(audit)" in rebuilt.stdout


# the speed benchmarks, shrunk to seconds: a 1-layer model, 2 prompts x 2 samples of 8 tokens
TINY = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8"]


def _run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_vs_trl_posttrain_side_reports_steps_tokens_memory_and_reward(tmp_path):
    out = tmp_path / "vs_trl"
    done = _run_benchmark(
        "vs_trl.py",
        *("--no-trl", "--sizes", "32x1x2x64", "--rounds", "1", "--warmup", "1", "--steps", "1"),
        *TINY,
        *("--num-prompts", "8", "--out", str(out), "--models", str(tmp_path / "models")),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "posttrain" in done.stdout and "s/step" in done.stdout and "tokens/s" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "vs_trl" and results["settings"]["no_trl"] is True
    [size] = results["sizes"]
    assert size["params"] > 0 and size["prompt_tokens_match"] is True
    assert list(size["summary"]) == ["posttrain"] and size["ratios"] == {}
    summary = size["summary"]["posttrain"]
    assert summary["s_per_step"]["median"] > 0 and summary["tokens_per_s"]["median"] > 0
    assert summary["peak_rss_mb"]["median"] > 50 and 0.0 <= summary["final_reward"]["median"] <= 1.0
    [run] = size["runs"]["posttrain"]
    assert run["threads"] == 1 and run["steps_run"] == 2 and len(run["step_times"]) == 1
    assert (out / "table.txt").read_text().strip()


def test_vs_trl_without_trl_interpreter_says_how_to_install_it(tmp_path):
    done = _run_benchmark(
        "vs_trl.py", "--trl-python", str(tmp_path / "missing" / "python"), "--out", str(tmp_path)
    )
    assert done.returncode == 2
    assert 'pip install "torch==2.13.0" "trl==1.16.0"' in done.stderr and "--no-trl" in done.stderr


def test_step_budget_times_ppo_grpo_and_the_floor_phase_by_phase(tmp_path):
    out = tmp_path / "budget"
    done = _run_benchmark(
        "step_budget.py",
        *("--size", "32x1x2x64", "--algorithm", "ppo", "--critic-size", "16x1x2x32"),
        *("--rounds", "1", "--warmup", "0"),
        *TINY,
        *("--num-prompts", "8", "--out", str(out), "--models", str(tmp_path / "models")),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "models" / "tiny-h16-l1-a2-i32-s0").is_dir()  # PPO's smaller critic was built
    for text in ("posttrain ppo", "posttrain grpo", "floor", "x grpo", "time/generate", "bookkeeping"):
        assert text in done.stdout
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert {"ppo/floor", "grpo/floor", "ppo/grpo"} <= set(summary["ratios"])
    assert all(value > 0 for value in summary["ratios"].values())
    for label in ("posttrain ppo", "posttrain grpo", "floor"):
        phases = summary[label]["phases"]
        assert phases["time/generate"]["median"] > 0 and phases["total (measured)"]["median"] > 0
        parts = sum(v["median"] for k, v in phases.items() if k != "total (measured)")
        assert abs(parts - phases["total (measured)"]["median"]) < 1e-6  # one round: medians add up
    assert "time/step" not in summary["posttrain grpo"]["phases"]  # a total, not a part


def test_rollout_benchmark_compares_the_engine_with_plain_generate(tmp_path):
    out = tmp_path / "rollout"
    done = _run_benchmark(
        "rollout.py",
        *("--size", "32x1x2x64", "--rounds", "1", "--warmup", "0"),
        *TINY,
        *("--out", str(out), "--models", str(tmp_path / "models")),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "posttrain HFRolloutEngine" in done.stdout and "tokens/s vs plain" in done.stdout
    results = json.loads((out / "results.json").read_text())
    ratios = results["tokens_per_s_vs_plain"]
    assert ratios["HF generate"] == 1.0 and ratios["posttrain HFRolloutEngine"] > 0
    tokens = {label: s["tokens_per_call"]["median"] for label, s in results["summary"].items()}
    assert tokens["HF generate"] == tokens["HF generate + logprob forward"]  # same seed, same samples
    assert all(0 < count <= 2 * 2 * 8 for count in tokens.values())
