"""A classic-control run as a run folder, so that the comparison harness reads it like an LLM run.

``<run_dir>/config.yaml``: ``{"algorithm": arm, "run": {"name", "seed"}, "classic": TrainConfig
fields}``. ``<run_dir>/metrics.jsonl``: one row per ``1/bins`` of the run's environment steps,
``{"step": env steps so far, "env_steps": env steps in this bin, "time/train": seconds (the run's
wall time spread evenly over its steps), "return_mean": mean return of the last ``final_window``
episodes finished so far}`` (no ``return_mean`` before the first episode ends), then the final row
``{"step": env steps, "return_mean": final return, "final": 1}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from posttrain.classic.config import RunResult, TrainConfig
from posttrain.report.runs import CONFIG_FILE, METRICS_FILE

BINS = 50


def metric_rows(result: RunResult, window: int, bins: int = BINS) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows of ``result`` (see the module docstring)."""
    steps = max(result.steps, 1)
    rows: list[dict[str, Any]] = []
    previous = 0
    finished = 0  # episodes of result.curve ended by the current bin
    for index in range(1, bins + 1):
        end = round(index * steps / bins)
        if end <= previous:
            continue
        while finished < len(result.curve) and result.curve[finished][0] <= end:
            finished += 1
        row: dict[str, Any] = {
            "step": end,
            "env_steps": end - previous,
            "time/train": result.wall_s * (end - previous) / steps,
        }
        if finished:
            recent = [ret for _, ret in result.curve[max(0, finished - window) : finished]]
            row["return_mean"] = sum(recent) / len(recent)
        rows.append(row)
        previous = end
    if math.isfinite(result.final_return):
        rows.append({"step": result.steps, "return_mean": result.final_return, "final": 1.0})
    return rows


def write_run_folder(result: RunResult, config: TrainConfig, run_dir: Path, bins: int = BINS) -> Path:
    """Write ``config.yaml`` and ``metrics.jsonl`` of one finished run into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = {
        "algorithm": result.arm,
        "run": {"name": run_dir.name, "seed": result.seed},
        "classic": asdict(config),
    }
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False), encoding="utf-8")
    lines = [json.dumps(row, allow_nan=False) for row in metric_rows(result, config.final_window, bins)]
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir
