"""Reports: training-curve figures and summary tables."""

from posttrain.report.plots import (
    curves_by_group_figure,
    curves_from_metrics,
    metric_series,
    plot_curves_by_group,
    plot_training_curves,
    seed_band,
    training_curves_figure,
)
from posttrain.report.tables import mean_std, render_table, summary_table

__all__ = [
    "curves_by_group_figure",
    "curves_from_metrics",
    "mean_std",
    "metric_series",
    "plot_curves_by_group",
    "plot_training_curves",
    "render_table",
    "seed_band",
    "summary_table",
    "training_curves_figure",
]
