"""FSDP2 over 2 real gloo processes (torchrun) takes the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.train.config import load_config
from posttrain.train.setup import build_task, embedded_model_path

WORKER = Path(__file__).parent / "_fsdp_worker.py"
SETTINGS = [
    "data.num_train=16",
    "data.num_test=2",
    "rollout.prompts_per_step=3",
    "rollout.group_size=3",
    "optim.micro_batch_size=2",  # 9 rows: ranks hold 5 and 4, so one rank runs a weightless pass
    "optim.lr_schedule=constant",
    "logging.tensorboard=false",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    cfg = load_config(
        None,
        [
            "model.tiny_hidden_size=32",
            "model.tiny_layers=2",
            "warmstart.steps=0",
            f"run.output_dir={out}",
            *SETTINGS,
        ],
    )
    return embedded_model_path(cfg, build_task(cfg))


def _run(model_dir: Path, out: Path, algorithm: str, nproc: int, *extra: str) -> tuple[list, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(WORKER), str(model_dir), str(out), algorithm, *SETTINGS, *extra]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        command = [sys.executable]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text()), torch.load(out / "weights.pt")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [("grpo", ["optim.num_mini_batches=1"]), ("ppo", ["optim.num_mini_batches=3", "optim.epochs=2"])],
)
def test_two_processes_take_the_steps_of_one(model_dir: Path, tmp_path: Path, algorithm: str, extra) -> None:
    one_metrics, one_weights = _run(model_dir, tmp_path / "one", algorithm, 1, *extra)
    two_metrics, two_weights = _run(model_dir, tmp_path / "two", algorithm, 2, *extra)
    keys = ["reward_mean", "policy_loss", "grad_norm", "advantage_abs", "updates"]
    if algorithm == "ppo":
        keys += ["value_loss", "explained_variance"]
    for one, two in zip(one_metrics, two_metrics, strict=True):
        assert one["grad_norm"] > 0 and one["advantage_abs"] > 0  # a step that trains
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert one_weights.keys() == two_weights.keys()
    moved = 0
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-4)
        moved += name.startswith("policy.")
    assert moved
