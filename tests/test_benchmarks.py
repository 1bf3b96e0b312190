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
