"""The classic-control study: arms x seeds on one environment -> CSV, table, learning-curve PNG.

An arm is written ``algo[:modifier...][@gamma]``: ``ppo``, ``grpo``, ``rloo``, ``batch_mean``,
``ema``, ``none``, with modifiers ``togo`` (per-step return-to-go instead of the whole-episode
return) and ``random`` (groups of G different random starts instead of G same-seed starts), and
an optional discount, e.g. ``grpo:togo@0.99``. ``gammas`` sweeps every arm over discounts.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from posttrain.classic.config import ALGOS, ENV_DEFAULTS, RunResult, TrainConfig, is_count, make_config

MODIFIERS: dict[str, dict[str, Any]] = {"togo": {"return_mode": "to_go"}, "random": {"same_start": False}}


def parse_arm(arm: str) -> tuple[str, dict[str, Any]]:
    """``"grpo:togo:random@0.9"`` -> ("grpo", {return_mode, same_start, gamma overrides})."""
    spec, at, gamma = arm.partition("@")
    algo, *mods = spec.split(":")
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r} in arm {arm!r}; choose one of {ALGOS}")
    overrides: dict[str, Any] = {}
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"unknown modifier {mod!r} in arm {arm!r}; choose from {sorted(MODIFIERS)}")
        overrides.update(MODIFIERS[mod])
    if at:
        try:
            value = float(gamma)
        except ValueError:
            raise ValueError(
                f"arm {arm!r}: '@' must be followed by a discount in [0, 1], e.g. grpo@0.99; got {gamma!r}"
            ) from None
        overrides["gamma"] = overrides["episode_gamma"] = value
    return algo, overrides


def expand_arms(algos: list[str], gammas: list[float] | None) -> list[str]:
    """Every arm once per discount of the sweep (arms that already name a discount are kept)."""
    if not gammas:
        return list(algos)
    return [arm if "@" in arm else f"{arm}@{g:g}" for arm in algos for g in gammas]


def train_arm(config: TrainConfig, arm: str, progress: Callable[[int], None] | None = None) -> RunResult:
    """Dispatch one run to PPO or the critic-free trainer; the result is labelled with ``arm``."""
    if config.algo == "ppo":
        from posttrain.classic.ppo import train_ppo

        result = train_ppo(config, progress)
    else:
        from posttrain.classic.baselines import train_critic_free

        result = train_critic_free(config, progress)
    result.arm = arm
    return result


def _run_job(config: TrainConfig, arm: str, queue: Any) -> RunResult:
    """Worker-process entry: report progress as (arm, seed, steps) on ``queue``."""
    return train_arm(config, arm, lambda steps: queue.put((arm, config.seed, steps)))


@dataclass
class StudyResult:
    """All runs of a study and where its outputs were written."""

    env_id: str
    runs: list[RunResult]
    runs_csv: Path
    curves_csv: Path
    table_md: Path
    plot_png: Path

    def summary(self) -> list[dict[str, Any]]:
        """Per arm: seeds, mean/std of final return, mean steps/s (arms in first-run order)."""
        arms = list(dict.fromkeys(r.arm for r in self.runs))
        rows = []
        for arm in arms:
            runs = [r for r in self.runs if r.arm == arm]
            finals = [r.final_return for r in runs]
            rows.append(
                {
                    "arm": arm,
                    "seeds": len(runs),
                    "mean": statistics.fmean(finals),
                    "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "min": min(finals),
                    "steps_per_sec": statistics.fmean(r.steps_per_sec for r in runs),
                }
            )
        return rows


def run_study(
    env_id: str, algos: list[str], seeds: int, steps: int, out_dir: Path, **options: Any
) -> StudyResult:
    """Run every arm for ``seeds`` seeds and ``steps`` env steps; write CSVs, a table and a PNG.

    ``options``: ``workers`` (parallel processes, default 1), ``gammas`` (discount sweep),
    ``progress`` (rich progress bar, default True), and any ``TrainConfig`` field as an override
    (``group_size``, ``num_groups``, ``lr``, ...; None keeps the per-environment default).
    """
    workers = options.pop("workers", None)
    workers = 1 if workers is None else workers
    gammas = options.pop("gammas", None)
    show_progress = bool(options.pop("progress", True))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown study option(s) {unknown}")
    check_study(env_id, algos, seeds, steps, workers)
    jobs: list[tuple[TrainConfig, str]] = []
    for arm in expand_arms(algos, gammas):
        algo, arm_overrides = parse_arm(arm)
        for seed in range(seeds):
            try:
                config = make_config(
                    env_id, algo, **{**options, **arm_overrides, "seed": seed, "total_steps": steps}
                )
            except ValueError as error:  # say which arm's setting it is (e.g. the discount of grpo@1.5)
                raise ValueError(f"arm {arm!r}: {error}") from None
            jobs.append((config, arm))
    runs = _execute(jobs, steps, workers, show_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = StudyResult(
        env_id,
        runs,
        out_dir / "runs.csv",
        out_dir / "curves.csv",
        out_dir / "summary.md",
        out_dir / "learning_curves.png",
    )
    write_outputs(result, steps)
    return result


def check_study(env_id: str, algos: list[str], seeds: int, steps: int, workers: int) -> None:
    """Raise ``ValueError`` for a study that would run nothing (0 seeds, 0 steps, no arm: it would
    still overwrite the results already in its folder) or an environment gymnasium does not know."""
    counts = (
        ("seeds", "--seeds", seeds, "runs per arm"),
        ("steps", "--steps", steps, "environment steps per run"),
        ("workers", "--workers", workers, "parallel processes"),
    )
    for name, flag, value, meaning in counts:
        if not is_count(value):
            raise ValueError(f"{name} ({flag}) must be a whole number >= 1 ({meaning}), got {value!r}")
    if not algos:
        raise ValueError("no arm to run: give --algos, e.g. ppo,grpo,rloo")
    import gymnasium as gym

    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise ValueError(
            f"unknown environment {env_id!r} (--env): {error} Known here: {', '.join(ENV_DEFAULTS)}"
        ) from None


def _execute(jobs: list[tuple[TrainConfig, str]], steps: int, workers: int, show: bool) -> list[RunResult]:
    """Run the jobs (in-process, or in ``workers`` spawned processes) under one progress bar."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    done: dict[tuple[str, int], int] = {}
    with Progress(*columns, disable=not show, transient=False) as bar:
        task = bar.add_task(f"{len(jobs)} runs", total=len(jobs) * steps)

        def report(arm: str, seed: int, now: int) -> None:
            done[(arm, seed)] = min(now, steps)
            bar.update(task, completed=sum(done.values()))

        if workers <= 1:
            results = []
            for config, arm in jobs:
                bar.update(task, description=f"{arm} seed {config.seed}")
                results.append(train_arm(config, arm, partial(report, arm, config.seed)))
                _log_finished(bar, results[-1])
            return results
        context = get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
            queue = manager.Queue()
            futures: dict[Future[RunResult], int] = {
                pool.submit(_run_job, config, arm, queue): i for i, (config, arm) in enumerate(jobs)
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    _log_finished(bar, future.result())
                while not queue.empty():
                    report(*queue.get())
            ordered = sorted(futures, key=futures.__getitem__)
            return [f.result() for f in ordered]


def _log_finished(bar: Progress, run: RunResult) -> None:
    """One line per finished run, so that a log without the live bar still shows progress."""
    bar.console.log(
        f"{run.env_id} {run.arm} seed {run.seed}: final return {run.final_return:.1f}, "
        f"{run.steps_per_sec:,.0f} steps/s"
    )


def binned_curve(curve: list[tuple[int, float]], steps: int, bins: int = 50) -> list[float]:
    """Mean episode return in each of ``bins`` equal step intervals, carried forward over empty ones."""
    sums, counts = [0.0] * bins, [0] * bins
    for step, ret in curve:
        b = min(int(step * bins / max(steps, 1)), bins - 1)
        sums[b] += ret
        counts[b] += 1
    out, last = [], math.nan
    for s, c in zip(sums, counts):
        last = s / c if c else last
        out.append(last)
    return out


def write_outputs(result: StudyResult, steps: int) -> None:
    """runs.csv, curves.csv, summary.md (markdown table) and learning_curves.png."""
    with result.runs_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "arm", "seed", "steps", "final_return", "steps_per_sec", "wall_s"])
        for r in result.runs:
            writer.writerow(
                [
                    r.env_id,
                    r.arm,
                    r.seed,
                    r.steps,
                    f"{r.final_return:.2f}",
                    f"{r.steps_per_sec:.0f}",
                    f"{r.wall_s:.1f}",
                ]
            )
    with result.curves_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "step", "episode_return"])
        for r in result.runs:
            writer.writerows([r.arm, r.seed, step, f"{ret:.2f}"] for step, ret in r.curve)
    lines = [
        f"{result.env_id}, {steps:,} steps per run",
        "",
        "| arm | seeds | final return (mean ± std) | worst seed | steps/s |",
        "|---|---|---|---|---|",
    ]
    for row in result.summary():
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {row['mean']:.1f} ± {row['std']:.1f} | {row['min']:.1f} "
            f"| {row['steps_per_sec']:,.0f} |"
        )
    result.table_md.write_text("\n".join(lines) + "\n")
    plot_curves(result, steps)


def plot_curves(result: StudyResult, steps: int, bins: int = 50) -> None:
    """Mean ± std over seeds of the binned episode return, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [(i + 0.5) * steps / bins for i in range(bins)]
    for row in result.summary():
        per_seed = [binned_curve(r.curve, steps, bins) for r in result.runs if r.arm == row["arm"]]
        means, stds = [], []
        for column in zip(*per_seed):
            values = [v for v in column if not math.isnan(v)]
            means.append(statistics.fmean(values) if values else math.nan)
            stds.append(statistics.pstdev(values) if len(values) > 1 else 0.0)
        ax.plot(xs, means, label=row["arm"])
        ax.fill_between(
            xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2
        )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return (training)")
    ax.set_title(f"{result.env_id}: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(result.plot_png, dpi=120)
    plt.close(fig)


def print_table(result: StudyResult, console: Console | None = None) -> None:
    """The summary as a rich table."""
    table = Table(title=f"{result.env_id}: final return (mean of last episodes) over seeds")
    for name in ("arm", "seeds", "final return", "worst seed", "steps/s"):
        table.add_column(name, justify="left" if name == "arm" else "right")
    for row in result.summary():
        table.add_row(
            row["arm"],
            str(row["seeds"]),
            f"{row['mean']:.1f} ± {row['std']:.1f}",
            f"{row['min']:.1f}",
            f"{row['steps_per_sec']:,.0f}",
        )
    (console or Console()).print(table)


def _floats(text: str) -> list[float]:
    """``--gammas 0.9,0.99`` -> [0.9, 0.99]; argparse reports a bad list with this message."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated discounts such as 0.9,0.99,1.0; got {text!r}"
        )
    return values


def add_classic_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``posttrain classic`` options."""
    parser.add_argument("--env", default="CartPole-v1", help="gymnasium environment id")
    parser.add_argument(
        "--algos", default="ppo,grpo,rloo", help="comma-separated arms, e.g. ppo,grpo:togo@0.99"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300_000, help="environment steps per run")
    parser.add_argument("--out", type=Path, default=Path("runs/classic"), help="output folder")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one torch thread each)")
    parser.add_argument("--gammas", type=_floats, default=None, help="discount sweep, e.g. 0.9,0.99,1.0")
    parser.add_argument("--group-size", type=int, default=None, help="G episodes per group (critic-free)")
    parser.add_argument("--num-groups", type=int, default=None, help="groups per round (critic-free)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_from_args(args: argparse.Namespace) -> int:
    """Run the study described by parsed ``add_classic_arguments`` options; print the table."""
    out_dir = args.out / args.env
    result = run_study(
        args.env,
        [a for a in args.algos.split(",") if a],
        args.seeds,
        args.steps,
        out_dir,
        workers=args.workers,
        gammas=args.gammas,
        progress=not args.no_progress,
        group_size=args.group_size,
        num_groups=args.num_groups,
        lr=args.lr,
    )
    print_table(result)
    print(f"wrote {result.runs_csv}, {result.curves_csv}, {result.table_md}, {result.plot_png}")
    return 0
