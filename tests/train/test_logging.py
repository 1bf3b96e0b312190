"""Run logging: strict-JSON metrics, resume truncation, TensorBoard, config, progress output."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from posttrain.train.logging import (
    METRICS_FILE,
    SAMPLES_FILE,
    RunLogger,
    TrainProgress,
    format_metrics,
    read_metrics,
)


def strict_loads(line: str) -> dict:
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def test_metrics_are_floats_and_non_finite_is_null(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_metrics(
            3,
            {
                "reward_mean": torch.tensor(0.5),
                "kl": np.float32(0.25),
                "count": 4,
                "flag": True,
                "loss": float("nan"),
                "ratio_max": torch.tensor([float("inf")]),
            },
        )
        # flushed per line: readable before close
        lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1
    record = strict_loads(lines[0])
    assert record == {
        "step": 3,
        "reward_mean": 0.5,
        "kl": 0.25,
        "count": 4.0,
        "flag": 1.0,
        "loss": None,
        "ratio_max": None,
    }
    assert isinstance(record["count"], float)
    (row,) = read_metrics(tmp_path)
    assert row["step"] == 3 and row["reward_mean"] == 0.5 and math.isnan(row["loss"])


def test_bad_metric_values_raise(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="scalar"):
            logger.log_metrics(1, {"x": torch.ones(2)})
        with pytest.raises(TypeError, match="number"):
            logger.log_metrics(1, {"x": "high"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log_metrics(1, {"step": 2})
    assert (tmp_path / METRICS_FILE).read_text() == ""


def fake_checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(f"{step}\n")


def log_step(logger: RunLogger, step: int) -> None:
    logger.log_metrics(step, {"reward_mean": step / 10, "kl": math.nan if step == 2 else 0.01 * step})
    logger.log_samples(step, [{"prompt": f"{step}+1=", "completion": str(step + 1), "reward": 1.0}])


@pytest.mark.parametrize("explicit_step", [True, False])
def test_resumed_files_equal_uninterrupted_run(tmp_path: Path, explicit_step: bool) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    with RunLogger(straight, tensorboard=False) as logger:
        for step in range(7):
            log_step(logger, step)

    with RunLogger(interrupted, tensorboard=False) as logger:
        for step in range(6):
            log_step(logger, step)
    # Killed mid-write after the checkpoint at step 3: steps 4, 5 and a cut line must go.
    with open(interrupted / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "reward_m')
    fake_checkpoint(interrupted, 3)
    kwargs = {"resume_step": 3} if explicit_step else {}
    with RunLogger(interrupted, tensorboard=False, resume=True, **kwargs) as logger:
        assert logger.resume_step == 3
        for step in range(4, 7):
            log_step(logger, step)

    for name in (METRICS_FILE, SAMPLES_FILE):
        assert (interrupted / name).read_text() == (straight / name).read_text()
    assert [row["step"] for row in read_metrics(interrupted)] == list(range(7))


def test_resume_without_checkpoint_raises_and_fresh_logger_starts_empty(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        log_step(logger, 1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        RunLogger(tmp_path, tensorboard=False, resume=True)
    with RunLogger(tmp_path, tensorboard=False) as logger:
        log_step(logger, 5)
    assert [row["step"] for row in read_metrics(tmp_path)] == [5]


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def test_tensorboard_scalars_and_purge_on_resume(tmp_path: Path) -> None:
    with RunLogger(tmp_path) as logger:
        for step in range(4):
            logger.log_metrics(step, {"reward_mean": float(step)})
    assert scalars(tmp_path / "tensorboard", "reward_mean") == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}

    # The resumed process logs only step 2: the old run's step 3 must not survive beside it.
    with RunLogger(tmp_path, resume=True, resume_step=1) as logger:
        logger.log_metrics(2, {"reward_mean": 20.0})
    assert scalars(tmp_path / "tensorboard", "reward_mean") == {0: 0.0, 1: 1.0, 2: 20.0}


def test_samples_and_config_are_plain_json_and_yaml(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(2, [{"prompt": "1+1=", "ids": torch.tensor([4, 5]), "reward": np.float64("nan")}])
        path = logger.write_config({"run": {"output_dir": Path("runs"), "seed": 1}, "betas": (0.9, 0.99)})
    (line,) = (tmp_path / SAMPLES_FILE).read_text().splitlines()
    assert strict_loads(line) == {"step": 2, "prompt": "1+1=", "ids": [4, 5], "reward": None}
    assert yaml.safe_load(path.read_text()) == {
        "run": {"output_dir": "runs", "seed": 1},
        "betas": [0.9, 0.99],
    }


def test_read_metrics_skips_cut_last_line_but_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "kl": null}\n\n{"step": 1, "kl": 0.5}\n{"step": 2, "k')
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1] and math.isnan(rows[0]["kl"]) and rows[1]["kl"] == 0.5
    path.write_text('{"step": 0}\ngarbage\n{"step": 1}\n')
    with pytest.raises(ValueError, match=":2: malformed"):
        read_metrics(path)


METRICS = {
    "reward_mean": 0.5,
    "accuracy": 0.25,
    "kl": 0.0123,
    "clipfrac": 0.1,
    "tokens_per_s": 812.4,
    "lr": 1.0,
}


def test_format_metrics_is_compact_and_ordered() -> None:
    assert format_metrics(METRICS) == "reward 0.5 | acc 0.25 | kl 0.0123 | clip 0.1 | tok/s 812"
    assert format_metrics({"kl": torch.tensor(float("nan"))}) == "kl nan"
    assert format_metrics({"lr": 1.0}) == ""


def test_plain_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with TrainProgress(10, console=console, log_every=5) as progress:
        assert not progress.live
        for step in range(1, 11):
            progress.update(step, METRICS)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 5/10 | reward 0.5 | acc 0.25 | kl 0.0123 | clip 0.1 | tok/s 812 | eta ")
    assert lines[1].startswith("step 10/10 |") and lines[1].endswith("eta 0:00")


def test_disabled_progress_is_plain_even_on_a_terminal() -> None:
    out = io.StringIO()
    with TrainProgress(4, enabled=False, start_step=2, console=Console(file=out, force_terminal=True)) as p:
        assert not p.live
        p.update(3, {"reward_mean": 1.0})
        p.update(4, {"reward_mean": 1.0})
    assert out.getvalue().splitlines()[0].startswith("step 3/4 | reward 1 | eta 0:0")
    assert "\x1b[" not in out.getvalue()


def test_live_progress_renders_bar_and_metrics() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150)
    with TrainProgress(3, console=console) as progress:
        assert progress.live
        for step in range(1, 4):
            progress.update(step, METRICS)
    text = out.getvalue()
    assert "3/3" in text and "reward 0.5" in text and "tok/s 812" in text
