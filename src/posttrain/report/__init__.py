"""Reports: training-curve figures, summary tables, and comparisons of runs over algorithms and seeds."""

from posttrain.report.compare import Comparison, write_report
from posttrain.report.plots import (
    curves_by_group_figure,
    curves_from_metrics,
    metric_series,
    plot_curves_by_group,
    plot_training_curves,
    seed_band,
    training_curves_figure,
)
from posttrain.report.runs import RunCurve, read_run, read_runs
from posttrain.report.tables import mean_std, render_table, summary_table

__all__ = [
    "Comparison",
    "RunCurve",
    "curves_by_group_figure",
    "curves_from_metrics",
    "mean_std",
    "metric_series",
    "plot_curves_by_group",
    "plot_training_curves",
    "read_run",
    "read_runs",
    "render_table",
    "seed_band",
    "summary_table",
    "training_curves_figure",
    "write_report",
]
