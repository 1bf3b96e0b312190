"""Training-curve figures (matplotlib, Agg canvas, no pyplot global state).

Two figures: the curves of one run (one panel per metric, raw points plus a moving average) and a
comparison of groups of runs (one line per group: the mean over its seeds on a common x grid, with
a shaded band: min-max, or mean -+ std).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DEFAULT_KEYS = ("reward_mean", "accuracy", "kl", "eval_accuracy", "guard_interception_rate")
SMOOTH_MIN_POINTS = 20  # below this, a moving average hides more than it shows


def metric_series(
    metrics: Sequence[Mapping[str, Any]], key: str, x_key: str = "step"
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one metric over rows of ``read_metrics``: finite values only, sorted by x;
    when several rows share an x the last one wins (e.g. a final eval logged at the last step)."""
    by_x: dict[float, float] = {}
    for row in metrics:
        x, y = row.get(x_key), row.get(key)
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            by_x[x] = y
    xs = np.array(sorted(by_x), dtype=np.float64)
    return xs, np.array([by_x[x] for x in xs], dtype=np.float64)


def moving_average(y: np.ndarray, half_width: int) -> np.ndarray:
    """Centred mean ``s_i = mean(y[max(0, i-h) .. min(T-1, i+h)])`` with ``h = half_width``, same
    length as ``y`` [T]; the window shrinks at the ends instead of padding, so there is no lag."""
    if half_width < 0:
        raise ValueError(f"half_width must be >= 0, got {half_width}")
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0:
        return y.copy()
    cumsum = np.concatenate([[0.0], np.cumsum(y)])
    index = np.arange(y.size)
    start = np.maximum(0, index - half_width)
    stop = np.minimum(y.size, index + half_width + 1)
    # A mean lies within [min, max]; clipping only removes float round-off (flat curves stay flat).
    return np.clip((cumsum[stop] - cumsum[start]) / (stop - start), y.min(), y.max())


def save_figure(fig: Figure, out_png: Path) -> Path:
    """Render with the Agg canvas into a temp file, then rename: readers never see half a PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = out_png.with_name(f".tmp-{out_png.stem}-{secrets.token_hex(4)}.png")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out_png)
    return out_png


def _grid(count: int) -> tuple[int, int]:
    ncols = 1 if count == 1 else 2
    return math.ceil(count / ncols), ncols


def training_curves_figure(
    metrics: Sequence[Mapping[str, Any]], keys: Sequence[str] = DEFAULT_KEYS, title: str = ""
) -> Figure:
    """The figure of :func:`plot_training_curves`, one axes per present key, in ``keys`` order."""
    series = {key: metric_series(metrics, key) for key in keys}
    series = {key: xy for key, xy in series.items() if xy[0].size}
    nrows, ncols = _grid(max(1, len(series)))
    fig = Figure(figsize=(6.0, 3.4) if ncols == 1 else (11.0, 3.4 * nrows), layout="constrained")
    if not series:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics to plot: " + ", ".join(keys), ha="center", va="center", wrap=True)
        ax.set_axis_off()
    for index, (key, (x, y)) in enumerate(series.items(), start=1):
        ax = fig.add_subplot(nrows, ncols, index)
        many = x.size >= SMOOTH_MIN_POINTS
        ax.plot(x, y, marker="" if many else "o", markersize=3, alpha=0.35 if many else 1.0, label=key)
        if many:
            ax.plot(x, moving_average(y, max(1, x.size // 20)), linewidth=2.0, label="moving average")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(
    metrics: Sequence[Mapping[str, Any]],
    out_png: Path,
    keys: Sequence[str] = DEFAULT_KEYS,
    title: str = "",
) -> Path:
    """Write a PNG with one panel per metric in ``keys`` that has at least one finite value (absent
    keys are skipped), x = step. With many points a centred moving average (about n/10 points
    wide) is drawn over the raw curve. ``metrics`` are rows as returned by ``read_metrics``."""
    return save_figure(training_curves_figure(metrics, keys, title), out_png)


@dataclass(frozen=True)
class SeedBand:
    """Seed curves of one group on a common grid: ``x``, ``mean``, ``low``, ``high``, each
    [num_points], and ``num_seeds``. The band is the seeds' min and max (``spread="minmax"``) or
    ``mean -+ std`` with Bessel's correction (``spread="std"``; zero width for one seed)."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    num_seeds: int


Spread = Literal["minmax", "std"]


def _clean_curve(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x_arr, y_arr = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x_arr.shape != y_arr.shape:
        raise ValueError(f"x and y differ in length: {x_arr.size} vs {y_arr.size}")
    keep = np.isfinite(x_arr) & np.isfinite(y_arr)
    order = np.argsort(x_arr[keep], kind="stable")
    return x_arr[keep][order], y_arr[keep][order]


def seed_band(
    curves: Sequence[tuple[Any, Any]], num_points: int = 200, spread: Spread = "minmax"
) -> SeedBand:
    """Mean and band (see :class:`SeedBand`) of several seeds' ``(x, y)`` curves.

    Seeds sharing the same x values are combined point by point; otherwise each curve is linearly
    interpolated (``np.interp``) onto ``num_points`` evenly spaced x over the range every seed
    covers, so the mean never averages over a different number of seeds at different x.
    """
    if spread not in ("minmax", "std"):
        raise ValueError(f"spread must be 'minmax' or 'std', got {spread!r}")
    cleaned = [_clean_curve(x, y) for x, y in curves]
    cleaned = [(x, y) for x, y in cleaned if x.size]
    if not cleaned:
        raise ValueError("no finite points in any curve")
    first_x = cleaned[0][0]
    if all(x.shape == first_x.shape and np.array_equal(x, first_x) for x, _ in cleaned):
        grid = first_x
        stacked = np.stack([y for _, y in cleaned])
    else:
        low_x = max(float(x[0]) for x, _ in cleaned)
        high_x = min(float(x[-1]) for x, _ in cleaned)
        if low_x > high_x:
            raise ValueError(f"seed curves share no x range (latest start {low_x} > earliest end {high_x})")
        grid = np.linspace(low_x, high_x, num_points) if high_x > low_x else np.array([low_x])
        stacked = np.stack([np.interp(grid, x, y) for x, y in cleaned])
    mean = stacked.mean(axis=0)
    if spread == "minmax":
        return SeedBand(grid, mean, stacked.min(axis=0), stacked.max(axis=0), len(cleaned))
    std = stacked.std(axis=0, ddof=1) if len(cleaned) > 1 else np.zeros_like(mean)
    return SeedBand(grid, mean, mean - std, mean + std, len(cleaned))


def draw_seed_bands(
    ax: Axes,
    runs: Mapping[str, Sequence[tuple[Any, Any]]],
    num_points: int = 200,
    spread: Spread = "minmax",
) -> None:
    """On ``ax``: per group of ``runs`` (name -> seed curves) the mean line of its seeds, labelled
    with its seed count, and the band shaded when it has several seeds (see :func:`seed_band`)."""
    if not runs:
        raise ValueError("runs is empty")
    for name, curves in runs.items():
        try:
            band = seed_band(curves, num_points, spread)
        except ValueError as err:
            raise ValueError(f"group {name!r}: {err}") from err
        label = f"{name} (n={band.num_seeds})" if band.num_seeds > 1 else name
        (line,) = ax.plot(band.x, band.mean, linewidth=2.0, label=label)
        if band.num_seeds > 1:
            ax.fill_between(band.x, band.low, band.high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def curves_by_group_figure(
    runs: Mapping[str, Sequence[tuple[Any, Any]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    num_points: int = 200,
    spread: Spread = "minmax",
) -> Figure:
    """The figure of :func:`plot_curves_by_group` (one axes, one line per group)."""
    if not runs:
        raise ValueError("runs is empty")
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    draw_seed_bands(ax, runs, num_points, spread)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return fig


def plot_curves_by_group(
    runs: Mapping[str, Sequence[tuple[Any, Any]]],
    out_png: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    num_points: int = 200,
    spread: Spread = "minmax",
) -> Path:
    """Write a PNG comparing groups of runs (e.g. algorithms): per group the mean of its seeds'
    ``(x, y)`` curves, with the band (min-max, or mean -+ std) shaded when it has several seeds.
    ``runs`` maps a group name to its seed curves; see :func:`seed_band` for the common x grid."""
    return save_figure(curves_by_group_figure(runs, xlabel, ylabel, title, num_points, spread), out_png)


def curves_from_metrics(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], key: str, x_key: str = "step"
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``{group: [metrics rows of seed 1, seed 2, ...]}`` -> the ``runs`` argument of
    :func:`plot_curves_by_group` for one metric (seeds without the metric are left out)."""
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, seeds in runs.items():
        series = [metric_series(rows, key, x_key) for rows in seeds]
        out[name] = [(x, y) for x, y in series if x.size]
    return out
