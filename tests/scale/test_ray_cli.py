"""``posttrain train --ray``: Ray rollout workers and a trainer task, asynchronous with lag 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.train.config import load_config
from posttrain.train.setup import build_task, embedded_model_path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_flag_trains_with_stale_rollouts_corrected(tmp_path: Path) -> None:
    tiny = ["model.tiny_hidden_size=32", "model.tiny_layers=1", "warmstart.steps=0", "data.num_test=4"]
    cfg = load_config(None, [*tiny, f"run.output_dir={tmp_path / 'models'}"])
    model = embedded_model_path(cfg, build_task(cfg))
    sets = [
        f"model.path={model}",
        "data.num_test=4",
        "eval.num_prompts=4",
        "optim.steps=3",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "scale.max_policy_lag=1",
        "algo.rollout_correction.mode=truncate",
        f"run.output_dir={tmp_path}",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    args = [item for s in sets for item in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "train", "--ray", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after RL" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "policy_loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert [row["async/policy_lag"] for row in steps] == [0.0, 1.0, 1.0]  # the first has nothing ahead
    assert all("correction/rollout_is_mean" in row for row in steps)
