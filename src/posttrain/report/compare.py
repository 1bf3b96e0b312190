"""Comparing algorithms over seeds: a table, a score-curve PNG with seed bands and a markdown report.

Input: finished runs (``report.runs.RunCurve``), grouped by algorithm. Per group: the final score
(mean ± std over seeds, std with Bessel's correction), the worst seed, how many seeds reached the
threshold and, over those, the budget (sampled tokens, or environment steps) and training seconds
they spent to get there, and the peak memory of the worst seed. Higher scores are better.

The default threshold is ``start + 0.9 * (best - start)``: 90% of the way from the mean first
score of all runs (the common starting point: the evaluation before RL) to the best group's mean
final score; the best group's final mean itself when nothing improved.

The recommendation names the best group only when its lead over every other group exceeds the
seed spread (the larger of the two groups' standard deviations) and both have at least two seeds;
otherwise it says "no clear winner" and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from posttrain.report.plots import draw_seed_bands, save_figure
from posttrain.report.runs import RunCurve
from posttrain.report.tables import render_table, summary_table

DEFAULT_FRACTION = 0.9
REPORT_FILE = "report.md"
PLOT_FILE = "curves.png"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class GroupSummary:
    """One algorithm over its seeds. ``std`` is NaN for one seed; the ``*_to_threshold`` values
    are means over the ``reached`` seeds (None when none did); ``peak_rss_mb`` is the largest of
    its seeds' (None when none was measured)."""

    group: str
    finals: tuple[float, ...]
    mean: float
    std: float
    worst: float
    reached: int
    budget_to_threshold: float | None
    seconds_to_threshold: float | None
    peak_rss_mb: float | None

    @property
    def seeds(self) -> int:
        return len(self.finals)


@dataclass(frozen=True)
class Comparison:
    """A written comparison: its numbers, texts and files."""

    runs: list[RunCurve]
    summaries: list[GroupSummary]
    threshold: float
    threshold_rule: str
    table: str
    recommendation: str
    report_md: Path
    plot_png: Path
    summary_json: Path


# ------------------------------------------------------------------------------ numbers


def groups(runs: Sequence[RunCurve]) -> dict[str, list[RunCurve]]:
    """Runs by algorithm, groups in the order they first appear, seeds sorted."""
    out: dict[str, list[RunCurve]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return {name: sorted(members, key=lambda r: r.seed) for name, members in out.items()}


def default_threshold(runs: Sequence[RunCurve], fraction: float = DEFAULT_FRACTION) -> tuple[float, str]:
    """``(threshold, how it was chosen)`` by the rule of the module docstring."""
    start = float(np.mean([run.score[0] for run in runs]))
    best = max(float(np.mean([r.final for r in members])) for members in groups(runs).values())
    if best <= start:
        return best, f"the best final mean ({best:.4g}), as no algorithm improved on the start ({start:.4g})"
    threshold = start + fraction * (best - start)
    return threshold, (
        f"{100 * fraction:.0f}% of the way from the mean starting score {start:.4g} to the best final mean "
        f"{best:.4g}"
    )


def first_reaching(run: RunCurve, threshold: float) -> int | None:
    """Index of the first evaluation of ``run`` scoring >= ``threshold``, else None."""
    hits = np.flatnonzero(run.score >= threshold)
    return int(hits[0]) if hits.size else None


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(runs: Sequence[RunCurve], threshold: float) -> list[GroupSummary]:
    """One :class:`GroupSummary` per algorithm, best mean final score first (ties by name), so
    that the same runs give the same table however they were listed."""
    out = []
    for name, members in groups(runs).items():
        finals = tuple(run.final for run in members)
        hits = [(run, first_reaching(run, threshold)) for run in members]
        reached = [(run, index) for run, index in hits if index is not None]
        peaks = [run.peak_rss_mb for run in members if run.peak_rss_mb is not None]
        out.append(
            GroupSummary(
                group=name,
                finals=finals,
                mean=float(np.mean(finals)),
                std=float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan,
                worst=min(finals),
                reached=len(reached),
                budget_to_threshold=_mean_or_none([float(run.budget[i]) for run, i in reached]),
                seconds_to_threshold=_mean_or_none([float(run.seconds[i]) for run, i in reached]),
                peak_rss_mb=max(peaks) if peaks else None,
            )
        )
    return sorted(out, key=lambda s: (-s.mean, s.group))


# ------------------------------------------------------------------------------ texts


def _digits(summaries: Sequence[GroupSummary]) -> int:
    """Decimals for scores: 3 for scores within [-10, 10] (accuracies, rewards), else 1 (returns)."""
    return 3 if all(abs(v) < 10 for s in summaries for v in s.finals) else 1


def score_text(summary: GroupSummary, digits: int) -> str:
    """``"0.865 ± 0.010"``; one seed: ``"0.865"``."""
    if summary.seeds == 1:
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"


def table_rows(summaries: Sequence[GroupSummary], metric: str, budget_name: str) -> list[dict[str, str]]:
    """The comparison table as rows of text cells, one per algorithm, keyed by column name."""
    digits = _digits(summaries)
    rows = []
    for s in summaries:
        rows.append(
            {
                "algorithm": s.group,
                "seeds": str(s.seeds),
                f"final {metric}": score_text(s, digits),
                "worst seed": f"{s.worst:.{digits}f}",
                "reached thr.": f"{s.reached}/{s.seeds}",
                f"{budget_name} to thr.": _count(s.budget_to_threshold),
                "train s to thr.": _seconds(s.seconds_to_threshold),
                "peak MiB": _count(s.peak_rss_mb),
            }
        )
    return rows


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """``rows`` (same keys each) as a GitHub markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _reach_text(s: GroupSummary, budget_name: str) -> str:
    text = f"{s.group} in {s.reached}/{s.seeds} seeds"
    if s.budget_to_threshold is not None and s.seconds_to_threshold is not None:
        text += f" ({s.budget_to_threshold:,.0f} {budget_name}, {s.seconds_to_threshold:.0f} s of training)"
    return text


def _over(seeds: int) -> str:
    return "one seed" if seeds == 1 else f"mean ± std over {seeds} seeds"


def recommendation(
    summaries: Sequence[GroupSummary], metric: str, threshold: float, threshold_rule: str, budget_name: str
) -> str:
    """One paragraph: which algorithm, by how much, with what spread, whether the lead exceeds the
    seed spread (else "no clear winner"), and who reached the threshold with what budget."""
    digits = _digits(summaries)
    ranked = sorted(summaries, key=lambda s: s.mean, reverse=True)
    best = ranked[0]
    reach = (
        f" Threshold {threshold:.{digits}f} ({threshold_rule}): reached by "
        + "; ".join(_reach_text(s, budget_name) for s in ranked)
        + " (means over the seeds that reached it)."
    )
    if len(ranked) == 1:
        return (
            f"**Only one algorithm ({best.group}): nothing to compare.** Its final {metric} is "
            f"{score_text(best, digits)} ({_over(best.seeds)})." + reach
        )
    runner_up = ranked[1]
    lead = best.mean - runner_up.mean
    if lead > 0:
        leading = (
            f"{best.group} has the highest final {metric}, {score_text(best, digits)} ({_over(best.seeds)}), "
            f"{lead:.{digits}f} above {runner_up.group} ({score_text(runner_up, digits)})"
        )
    else:
        leading = (
            f"{best.group} and {runner_up.group} tie for the highest final {metric}, "
            f"{score_text(best, digits)} ({_over(best.seeds)}) and {score_text(runner_up, digits)}"
        )
    if min(s.seeds for s in ranked) < 2:
        return (
            f"**No clear winner.** {leading}, but with a single seed there is no seed spread to judge that "
            "lead by; run --seeds 3 or more." + reach
        )
    within = [s for s in ranked[1:] if best.mean - s.mean <= max(best.std, s.std)]
    if within:
        names = ", ".join(s.group for s in within)
        spread = max(max(best.std, s.std) for s in within)
        return (
            f"**No clear winner.** {leading}; its lead over {names} does not exceed the seed spread (std up to "
            f"{spread:.{digits}f}), so more seeds or a longer budget are needed to separate them." + reach
        )
    spread = max(best.std, runner_up.std)
    return (
        f"**Recommendation: {best.group}.** {leading}; the lead exceeds the seed spread (the larger std is "
        f"{spread:.{digits}f}), and so does its lead over every other algorithm." + reach
    )


# ------------------------------------------------------------------------------ figure


def comparison_figure(runs: Sequence[RunCurve], threshold: float, title: str = "") -> Figure:
    """Score against budget (and against step, when the budget is not the step): per algorithm
    the mean over seeds with a mean ± std band, and the threshold as a dashed line."""
    by_group = groups(runs)
    metric, budget_name = runs[0].metric, runs[0].budget_name
    axes_x = [("budget", budget_name)]
    if budget_name not in ("steps", "environment steps"):
        axes_x.append(("step", "step"))
    fig = Figure(figsize=(6.5 * len(axes_x), 4.2), layout="constrained")
    for column, (attribute, label) in enumerate(axes_x, start=1):
        ax = fig.add_subplot(1, len(axes_x), column)
        curves = {
            name: [(getattr(run, attribute), run.score) for run in members]
            for name, members in by_group.items()
        }
        draw_seed_bands(ax, curves, spread="std")
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1.0)
        ax.set_xlabel(f"{label} (cumulative)" if attribute == "budget" else label)
        ax.set_ylabel(metric)
    fig.suptitle(title or f"{metric}: mean ± std over seeds (dashed: threshold {threshold:.4g})")
    return fig


# ------------------------------------------------------------------------------ files


def write_report(
    runs: Sequence[RunCurve],
    out_dir: Path,
    *,
    threshold: float | None = None,
    title: str = "",
    command: str = "",
    failures: Sequence[str] = (),
) -> Comparison:
    """Write ``report.md`` (the command, the table, the recommendation, the figure, the runs),
    ``curves.png`` and ``summary.json`` into ``out_dir``; return them with the plain-text table."""
    if not runs:
        raise ValueError("no finished run to compare")
    runs = list(runs)
    if threshold is None:
        threshold, rule = default_threshold(runs)
    else:
        rule = "given with --threshold"
    metric, budget_name = runs[0].metric, runs[0].budget_name
    summaries = summarize(runs, threshold)
    rows = table_rows(summaries, metric, budget_name)
    steps = max(int(run.step[-1]) for run in runs)
    heading = title or f"{metric} by algorithm (mean ± std over seeds), {steps} steps per run"
    table = render_table(summary_table(rows, list(rows[0]), title=heading), width=160)
    paragraph = recommendation(summaries, metric, threshold, rule, budget_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = save_figure(comparison_figure(runs, threshold), out_dir / PLOT_FILE)
    report = out_dir / REPORT_FILE
    report.write_text(_markdown(heading, command, rows, paragraph, runs, failures), encoding="utf-8")
    summary = out_dir / SUMMARY_FILE
    data = {
        "metric": metric,
        "budget": budget_name,
        "threshold": threshold,
        "threshold_rule": rule,
        "recommendation": paragraph,
        "groups": [_finite_or_none(asdict(s) | {"seeds": s.seeds}) for s in summaries],
        "runs": [str(run.path) for run in runs],
        "failures": list(failures),
    }
    summary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return Comparison(runs, summaries, threshold, rule, table, paragraph, report, plot, summary)


def _finite_or_none(record: dict[str, object]) -> dict[str, object]:
    """``record`` with NaN floats (the std of one seed) as None, so that it is strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def _markdown(
    heading: str,
    command: str,
    rows: Sequence[dict[str, str]],
    paragraph: str,
    runs: Sequence[RunCurve],
    failures: Sequence[str],
) -> str:
    parts = [f"# {heading}", ""]
    if command:
        parts += ["```bash", command, "```", ""]
    parts += [markdown_table(rows), "", paragraph, "", f"![score curves]({PLOT_FILE})", ""]
    parts += [
        "Final score: the last evaluation of each run. Training seconds: the steps' own time "
        "(evaluations and the warm-start excluded). Peak memory: the largest resident set of one run's "
        "process over its seeds.",
        "",
        "Runs:",
        "",
    ]
    parts += [f"- `{run.path}`: {run.group}, seed {run.seed}, final {run.final:.4g}" for run in runs]
    if failures:
        parts += ["", "Failed runs (not in the table):", ""] + [f"- {line}" for line in failures]
    return "\n".join(parts) + "\n"
