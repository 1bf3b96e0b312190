"""Reading finished run folders into score curves, for comparisons (no training code imported).

A run folder, as ``posttrain train`` writes it (``posttrain classic`` and ``posttrain compare``
write the same files for gymnasium runs):

- ``config.yaml``: the resolved config; ``algorithm`` names the group a run belongs to and
  ``run.seed`` its seed.
- ``metrics.jsonl``: one JSON object per line, ``{"step": int, "<metric>": float | null, ...}``.
  A training step's row holds its budget (``sampled_tokens``: tokens the policy sampled in that
  step; gymnasium runs: ``env_steps``) and its duration in seconds (``time/step``; in runs
  logged before it existed, the sum of the ``time/<phase>`` metrics); an evaluation row holds the score (``eval_accuracy``, ...; gymnasium runs: ``return_mean``); the
  final evaluation's row has ``"final": 1``.
- ``compare.json`` (optional, written by the comparison harness): ``{"peak_rss_mb": float | null,
  "wall_s": float}`` measured in the process that ran the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
STATS_FILE = "compare.json"
# the score of a run, in order of preference when none is asked for: held-out accuracy (LLM runs,
# single-turn and agent), the mean return of the last training episodes (gymnasium runs)
SCORE_KEYS = ("eval_accuracy", "return_mean")
# what a step spends, in order of preference, and how tables and axes call it
BUDGET_KEYS = {"sampled_tokens": "sampled tokens", "env_steps": "environment steps"}


class RunReadError(ValueError):
    """A folder that is not a finished run (no config.yaml / metrics.jsonl, or no score in it)."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (or of ``<run_dir>/metrics.jsonl`` when given a directory).

    ``null`` values come back as ``nan`` so every metric is a float. A truncated last line (the
    process died mid-write) is skipped; a malformed line anywhere else raises ``ValueError``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{index + 1}: malformed metrics line") from err
        rows.append({k: (math.nan if v is None and k != "step" else v) for k, v in record.items()})
    return rows


@dataclass(frozen=True)
class RunCurve:
    """One run's score over training. Every array is [num_points], one entry per evaluation:
    ``step``, ``budget`` (cumulative sampled tokens, or environment steps, spent up to that step),
    ``seconds`` (cumulative training seconds up to that step: see :func:`step_seconds`; evaluations
    and the warm-start are not counted) and ``score``."""

    path: Path
    group: str
    seed: int
    metric: str
    budget_name: str
    step: np.ndarray
    budget: np.ndarray
    seconds: np.ndarray
    score: np.ndarray
    total_budget: float
    total_seconds: float
    peak_rss_mb: float | None = None
    wall_s: float | None = None

    @property
    def final(self) -> float:
        """The score of the last evaluation (the final one of a finished run)."""
        return float(self.score[-1])


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, null/NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def step_seconds(row: Mapping[str, Any]) -> float:
    """Seconds one training step took: its ``time/step`` metric, or, in runs logged without one,
    the sum of its top-level ``time/<phase>`` metrics (``time/a/b`` would be a part of
    ``time/a``)."""
    total = _number(row.get("time/step"))
    if total is not None:
        return total
    parts = [_number(v) for k, v in row.items() if k.startswith("time/") and k.count("/") == 1]
    return sum(part for part in parts if part is not None)


def budget_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The first of ``BUDGET_KEYS`` any row has, else None (the step is the budget)."""
    for key in BUDGET_KEYS:
        if any(_number(row.get(key)) is not None for row in rows):
            return key
    return None


def score_key(rows: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """``metric`` if given and present, else the first of ``SCORE_KEYS`` present; raises
    ``RunReadError`` listing the evaluation metrics there are."""
    present = {key for row in rows for key, value in row.items() if _number(value) is not None}
    wanted = [metric] if metric else list(SCORE_KEYS)
    for key in wanted:
        if key in present:
            return key
    known = sorted(k for k in present if k.startswith("eval_") or k in SCORE_KEYS)
    raise RunReadError(
        f"no {' or '.join(wanted)} in its metrics.jsonl; metrics there to score with (--metric): "
        f"{', '.join(known) or 'none'}"
    )


def curve_from_metrics(
    rows: Sequence[Mapping[str, Any]], metric: str
) -> tuple[list[float], list[float], list[float], list[float], float, float]:
    """``(steps, budgets, seconds, scores, total_budget, total_seconds)`` of the rows with
    ``metric``, in file order. A row's budget and seconds are those of the training steps up to and
    including its step (an evaluation at step s comes after step s); several rows at one step
    (a step's metrics, then the final evaluation) count that step once, and its last score wins."""
    key = budget_key(rows)
    spent: dict[int, tuple[float, float]] = {}  # step -> (its budget, its seconds)
    points: dict[int, float] = {}
    for row in rows:
        step = int(row["step"])
        amount = _number(row.get(key)) if key else None
        seconds = step_seconds(row)
        if amount is not None or seconds:
            before = spent.get(step, (0.0, 0.0))
            spent[step] = (before[0] + (amount or 0.0), before[1] + seconds)
        score = _number(row.get(metric))
        if score is not None:
            points[step] = score
    steps = sorted(points)
    budgets, times = [], []
    for step in steps:
        done = [value for s, value in spent.items() if s <= step]
        budgets.append(float(step) if key is None else sum(b for b, _ in done))
        times.append(sum(t for _, t in done))
    total_budget = float(max(spent, default=0)) if key is None else sum(b for b, _ in spent.values())
    total_seconds = sum(t for _, t in spent.values())
    return [float(s) for s in steps], budgets, times, [points[s] for s in steps], total_budget, total_seconds


def is_run_folder(path: Path) -> bool:
    """True when ``path`` holds a ``config.yaml`` and a ``metrics.jsonl``."""
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def run_identity(config: Mapping[str, Any]) -> tuple[str, int]:
    """``(algorithm, seed)`` from a run's config.yaml data (``algorithm``, ``run.seed``)."""
    run = config.get("run") if isinstance(config.get("run"), Mapping) else {}
    seed = run.get("seed", 0) if isinstance(run, Mapping) else 0
    return str(config.get("algorithm", "?")), int(seed) if isinstance(seed, int) else 0


def read_run(path: Path, metric: str | None = None) -> RunCurve:
    """The score curve of the run folder ``path``; ``RunReadError`` when it is not one."""
    path = Path(path)
    if not is_run_folder(path):
        raise RunReadError(
            f"{path} is not a run folder (it needs {CONFIG_FILE} and {METRICS_FILE}, as `posttrain train` "
            "or `posttrain compare` write them); give run folders, or a folder of them"
        )
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise RunReadError(f"{path / CONFIG_FILE}: unreadable ({error})") from None
    group, seed = run_identity(config if isinstance(config, Mapping) else {})
    rows = read_metrics(path / METRICS_FILE)
    try:
        key = score_key(rows, metric)
    except RunReadError as error:
        raise RunReadError(f"{path}: {error}") from None
    steps, budgets, seconds, scores, total_budget, total_seconds = curve_from_metrics(rows, key)
    stats = read_stats(path)
    name = budget_key(rows)
    return RunCurve(
        path=path,
        group=group,
        seed=seed,
        metric=key,
        budget_name=BUDGET_KEYS[name] if name else "steps",
        step=np.asarray(steps),
        budget=np.asarray(budgets),
        seconds=np.asarray(seconds),
        score=np.asarray(scores),
        total_budget=total_budget,
        total_seconds=total_seconds,
        peak_rss_mb=_number(stats.get("peak_rss_mb")),
        wall_s=_number(stats.get("wall_s")),
    )


def read_stats(run_dir: Path) -> dict[str, Any]:
    """The run's ``compare.json`` as a dict (empty when absent or unreadable)."""
    try:
        loaded = json.loads((Path(run_dir) / STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_stats(run_dir: Path, stats: Mapping[str, Any]) -> Path:
    """Write ``stats`` (JSON values) as the run's ``compare.json``."""
    path = Path(run_dir) / STATS_FILE
    path.write_text(json.dumps(dict(stats), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def expand_run_folders(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each folder of runs (a comparison's output) replaced by the run folders in
    it, sorted by name; a path that is neither is kept, for ``read_run`` to refuse by name."""
    out: list[Path] = []
    for path in map(Path, paths):
        children = sorted(p for p in path.iterdir() if is_run_folder(p)) if path.is_dir() else []
        out += children if children and not is_run_folder(path) else [path]
    return out


def read_runs(paths: Sequence[Path], metric: str | None = None) -> list[RunCurve]:
    """Every run of ``paths`` (run folders or folders of runs), scored by one metric: ``metric``,
    else the first of ``SCORE_KEYS`` the first run has (so that all runs compare the same thing)."""
    folders = expand_run_folders(paths)
    if not folders:
        raise RunReadError("no run folder given")
    first = read_run(folders[0], metric)
    return [first] + [read_run(path, first.metric) for path in folders[1:]]
