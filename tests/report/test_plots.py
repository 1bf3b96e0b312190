"""Training-curve figures: panels for present metrics only, smoothing, seed bands, PNG output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from posttrain.report.plots import (
    curves_by_group_figure,
    curves_from_metrics,
    metric_series,
    moving_average,
    plot_curves_by_group,
    plot_training_curves,
    seed_band,
    training_curves_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


def history(num_steps: int) -> list[dict]:
    rows = []
    for step in range(num_steps):
        row = {"step": step, "reward_mean": step / num_steps, "kl": math.nan if step == 3 else 0.01 * step}
        if step % 5 == 0:
            row["eval_accuracy"] = step / (2 * num_steps)
        rows.append(row)
    return rows


def test_metric_series_drops_non_finite_sorts_and_keeps_last_duplicate() -> None:
    rows = [
        {"step": 2, "kl": 0.2},
        {"step": 0, "kl": 0.0},
        {"step": 1, "kl": math.nan},
        {"step": 3},
        {"step": 2, "kl": 0.25},
        {"kl": 9.0},
    ]
    x, y = metric_series(rows, "kl")
    np.testing.assert_array_equal(x, [0.0, 2.0])
    np.testing.assert_array_equal(y, [0.0, 0.25])


def test_moving_average_hand_values() -> None:
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 1), [1.5, 2.0, 3.0, 3.5])
    np.testing.assert_array_equal(moving_average(np.full(50, 0.1), 5), np.full(50, 0.1))  # no round-off
    assert moving_average(np.array([]), 2).size == 0
    with pytest.raises(ValueError):
        moving_average(np.ones(3), -1)


@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-1e6, 1e6)), st.integers(0, 40))
def test_moving_average_matches_its_definition(y: np.ndarray, half_width: int) -> None:
    expected = [y[max(0, i - half_width) : i + half_width + 1].mean() for i in range(len(y))]
    smoothed = moving_average(y, half_width)
    np.testing.assert_allclose(smoothed, expected, rtol=1e-9, atol=1e-6)
    assert smoothed.min() >= y.min() and smoothed.max() <= y.max()


def test_training_figure_has_one_panel_per_present_key_and_smooths_long_runs() -> None:
    fig = training_curves_figure(history(40), keys=("reward_mean", "accuracy", "kl", "eval_accuracy"))
    assert [ax.get_title() for ax in fig.axes] == ["reward_mean", "kl", "eval_accuracy"]
    reward_ax, kl_ax, eval_ax = fig.axes
    assert len(reward_ax.lines) == 2  # raw + moving average
    assert len(kl_ax.lines[0].get_xdata()) == 39  # the NaN step is skipped
    assert len(eval_ax.lines) == 1  # 8 points: too few to smooth


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    out = plot_training_curves(history(30), tmp_path / "sub" / "curves.png", title="grpo on arithmetic")
    assert out == tmp_path / "sub" / "curves.png"
    assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_plot_training_curves_without_any_metric_still_writes_png(tmp_path: Path) -> None:
    assert_png(plot_training_curves([{"step": 0, "loss": math.nan}], tmp_path / "empty.png"))


def test_seed_band_on_shared_x_is_pointwise() -> None:
    band = seed_band([([0, 1, 2], [0.0, 1.0, 2.0]), ([0, 1, 2], [2.0, 3.0, 1.0])])
    np.testing.assert_array_equal(band.x, [0, 1, 2])
    np.testing.assert_allclose(band.mean, [1.0, 2.0, 1.5])
    np.testing.assert_array_equal(band.low, [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(band.high, [2.0, 3.0, 2.0])
    assert band.num_seeds == 2


def test_seed_band_interpolates_on_the_common_range() -> None:
    # Both seeds follow y = 2x but are logged at different, unsorted x, one with a NaN point.
    band = seed_band([([10, 0], [20, 0]), ([5, 8, 20, 12], [10, np.nan, 40, 24])], num_points=6)
    np.testing.assert_allclose(band.x, np.linspace(5, 10, 6))
    np.testing.assert_allclose(band.mean, 2 * band.x)
    np.testing.assert_allclose(band.low, band.high)

    with pytest.raises(ValueError, match="share no x range"):
        seed_band([([0, 1], [0, 1]), ([2, 3], [0, 1])])
    with pytest.raises(ValueError, match="no finite points"):
        seed_band([([0], [np.nan])])


def test_group_figure_bands_only_for_multi_seed_groups(tmp_path: Path) -> None:
    x = np.arange(10.0)
    runs = {"ppo": [(x, x), (x, x + 1), (x, x - 1)], "grpo": [(x, 2 * x)]}
    fig = curves_by_group_figure(runs, "step", "accuracy", "ppo vs grpo")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["ppo (n=3)", "grpo"]
    assert len(ax.collections) == 1  # one shaded band, for ppo
    assert_png(plot_curves_by_group(runs, tmp_path / "compare.png", "step", "accuracy", "ppo vs grpo"))

    with pytest.raises(ValueError, match="group 'bad'"):
        curves_by_group_figure({"bad": [([0, 1], [0, 1]), ([5, 6], [0, 1])]}, "step", "y")


def test_curves_from_metrics_feeds_group_plot() -> None:
    runs = {"grpo": [history(10), history(12)], "ppo": [history(10), [{"step": 0, "loss": 1.0}]]}
    curves = curves_from_metrics(runs, "reward_mean")
    assert [len(v) for v in curves.values()] == [2, 1]
    np.testing.assert_allclose(curves["grpo"][1][1], np.arange(12) / 12)
