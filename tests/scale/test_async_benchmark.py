"""benchmarks/async_vs_sync.py runs end to end, shrunk: a 1-layer model, 2 prompts x 2 samples, 2 steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
SHRINK = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=20",
    "data.num_train=16",
    "data.num_test=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
]


def test_the_benchmark_prints_both_modes_and_their_ratio(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/async_vs_sync.py", "--steps", "2", "--rounds", "1"]
    command += ["--out", str(tmp_path / "out"), "--set", f"run.output_dir={tmp_path}"]
    for override in SHRINK:
        command += ["--set", override]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    sync = next(line for line in lines if line.startswith("  sync "))
    asynchronous = next(line for line in lines if line.startswith("  async "))
    assert "policy lag 0" in sync and "policy lag 1" in asynchronous
    assert any(line.startswith("ratio sync / async: ") for line in lines)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["ratio_sync_over_async"] > 0
    assert [len(run) for run in results["history"]["async"]] == [2]
    assert (tmp_path / "out" / "table.txt").read_text() in done.stdout
