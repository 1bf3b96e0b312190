"""``posttrain train --nproc 2``: one run folder written by rank 0, resumable by one process."""

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
def test_nproc_2_trains_checkpoints_and_resumes_in_one_process(tmp_path: Path) -> None:
    tiny = ["model.tiny_hidden_size=32", "model.tiny_layers=1", "warmstart.steps=0", "data.num_test=8"]
    cfg = load_config(None, [*tiny, f"run.output_dir={tmp_path / 'models'}"])
    model = embedded_model_path(cfg, build_task(cfg))
    sets = [
        f"model.path={model}",
        "data.num_test=8",
        "optim.steps=2",
        "rollout.prompts_per_step=3",
        "rollout.group_size=2",
        "eval.num_prompts=4",
        f"run.output_dir={tmp_path}",
        "run.name=sharded",
        "algorithm=ppo",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    cli = [sys.executable, "-m", "posttrain.cli", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [item for s in sets for item in ("--set", s)]
    done = subprocess.run([*cli, "--nproc", "2", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("after RL") == 1  # rank 0 alone reports
    assert done.stdout.count("step 2/2") == 1
    run = tmp_path / "sharded"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # initial eval, 2 steps, final eval: one line each
    assert (run / "checkpoints" / "step_000002" / "critic").is_dir()

    resumed = subprocess.run(
        [*cli, "--resume", str(run), "--set", "optim.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2, 3]
