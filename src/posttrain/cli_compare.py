"""``posttrain compare`` and ``posttrain report``: the command-line side of the comparison harness.

``compare`` runs every (algorithm, seed) pair of one config (``train.compare``), or of a
classic-control environment (``classic.study``), then writes the comparison (``report.compare``);
``report`` writes the same comparison for runs that already exist.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.cli import UsageError

if TYPE_CHECKING:  # the report's imports (matplotlib) wait until a comparison is drawn
    from posttrain.report.compare import Comparison

CLASSIC_STEPS = 300_000  # environment steps per classic run unless --set total_steps=N


def _check_compare_flags(args: argparse.Namespace) -> None:
    """Counts, the threshold and flag combinations, each refused with the flag and the fix."""
    if args.seeds < 1:
        raise UsageError(f"--seeds must be a whole number >= 1 (runs per algorithm), got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be a whole number >= 1 (parallel processes), got {args.workers}")
    _check_threshold(args)
    if args.classic is not None:
        for flag, given in (("--config", args.config), ("--metric", args.metric)):
            if given:
                raise UsageError(
                    f"--classic {args.classic} runs gymnasium arms scored by their return; drop {flag}"
                )


def _check_threshold(args: argparse.Namespace) -> None:
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UsageError(f"--threshold must be a finite score, got {args.threshold}")


def _workers(args: argparse.Namespace, jobs: int) -> int:
    """``--workers``, else one process per core, at most one per job."""
    if args.workers is not None:
        return int(args.workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, jobs))


def _print_comparison(comparison: Comparison) -> None:
    print(comparison.table, end="")
    print(comparison.recommendation)
    print(f"report:  {comparison.report_md}")
    print(f"curves:  {comparison.plot_png}")
    print(f"summary: {comparison.summary_json}")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (``main`` records it), for the report."""
    return str(getattr(args, "command_line", ""))


def compare(args: argparse.Namespace) -> int:
    _check_compare_flags(args)
    if args.classic is not None:
        return _compare_classic(args)
    from posttrain.train.compare import parse_algorithms, plan_runs, run_comparison

    planned = plan_runs(
        args.config, args.set, parse_algorithms(args.algos), args.seeds, args.out, overwrite=args.overwrite
    )
    outcomes = run_comparison(planned, _workers(args, len(planned)), show=not args.no_progress)
    failures = [f"{o.job.label}: {o.error} (log: {o.job.arg.log})" for o in outcomes if o.error]
    finished = [o.job.arg.run_dir for o in outcomes if o.error is None]
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    if not finished:
        print("error: every run failed; their logs say why", file=sys.stderr)
        return 1
    from posttrain.report.compare import write_report
    from posttrain.report.runs import read_runs

    comparison = write_report(
        read_runs(finished, args.metric),
        args.out,
        threshold=args.threshold,
        command=_command_line(args),
        failures=failures,
    )
    _print_comparison(comparison)
    print(f"runs:    {args.out}/<algorithm>-s<seed>/")
    return 1 if failures else 0


def _compare_classic(args: argparse.Namespace) -> int:
    from posttrain.classic.study import check_study, parse_arm, parse_settings, run_study

    arms = [arm.strip() for arm in args.algos.split(",") if arm.strip()]
    if not arms or len(set(arms)) < len(arms):
        raise UsageError(f"--algos {args.algos!r}: give each arm once, e.g. --algos ppo,grpo,rloo")
    for arm in arms:
        try:
            parse_arm(arm)
        except ValueError as error:
            raise UsageError(f"--algos: {error}") from None
    settings = parse_settings(args.set)
    steps = settings.pop("total_steps", CLASSIC_STEPS)
    try:
        check_study(args.classic, arms, args.seeds, steps, args.workers or 1)
    except ValueError as error:  # the study's own flags are --env and --steps
        message = str(error).replace("(--env)", "(--classic)").replace("(--steps)", "(--set total_steps=N)")
        raise UsageError(message) from None
    held = [args.out / f"{arm}-s{seed}" for arm in arms for seed in range(args.seeds)]
    held = [path for path in held if (path / "metrics.jsonl").is_file()]
    if held and not args.overwrite:
        raise UsageError(
            f"{held[0]} already holds a run; pass --overwrite to replace it, or choose another --out"
        )
    result = run_study(
        args.classic,
        arms,
        args.seeds,
        steps,
        args.out,
        workers=_workers(args, len(arms) * args.seeds),
        isolate=True,
        progress=not args.no_progress,
        threshold=args.threshold,
        command=_command_line(args),
        **settings,
    )
    _print_comparison(result.comparison)
    print(f"runs:    {args.out}/<arm>-s<seed>/ (raw numbers: {result.runs_csv}, {result.curves_csv})")
    return 0


def report(args: argparse.Namespace) -> int:
    from posttrain.report.compare import write_report
    from posttrain.report.runs import read_runs

    _check_threshold(args)
    comparison = write_report(
        read_runs(args.runs, args.metric), args.out, threshold=args.threshold, command=_command_line(args)
    )
    _print_comparison(comparison)
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``posttrain compare`` options."""
    parser.add_argument(
        "--algos",
        required=True,
        help="comma-separated algorithm presets, e.g. ppo,grpo,gspo,dapo,dr_grpo (with --classic: "
        "classic arms, e.g. ppo,grpo,rloo)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs per algorithm: seeds run.seed, run.seed+1, ..."
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: the embedded demo)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run, e.g. --set optim.steps=50 (with --classic: a "
        f"classic setting, e.g. --set total_steps=100000; default {CLASSIC_STEPS:,} steps)",
    )
    parser.add_argument(
        "--classic",
        default=None,
        metavar="ENV_ID",
        help="compare classic-control arms on a gymnasium environment (e.g. CartPole-v1) instead",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel processes, one torch thread each (default: cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    _add_report_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``posttrain report`` arguments."""
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="run folders, or folders of runs (a compare --out)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder")
    _add_report_options(parser)


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="score a run must reach (default: 90%% of the way from the mean starting score to the best "
        "algorithm's mean final score)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        help="metrics.jsonl key to score by (default: eval_accuracy; classic runs: return_mean)",
    )
