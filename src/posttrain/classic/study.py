"""The classic-control study: arms x seeds on one environment, through the comparison harness.

Every run gets a run folder (``<out>/<arm>-s<seed>/``, see ``classic.folders``); the jobs run under
``report.jobs`` (parallel processes, one progress bar) and ``report.compare`` writes the table, the
curve PNG (mean ± std over seeds) and ``report.md``; ``runs.csv`` and ``curves.csv`` hold the raw
numbers.

An arm is written ``algo[:modifier...][@gamma]``: ``ppo``, ``grpo``, ``rloo``, ``batch_mean``,
``ema``, ``none``, with modifiers ``togo`` (per-step return-to-go instead of the whole-episode
return) and ``random`` (groups of G different random starts instead of G same-seed starts), and
an optional discount, e.g. ``grpo:togo@0.99``. ``gammas`` sweeps every arm over discounts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from posttrain.classic.config import ALGOS, ENV_DEFAULTS, RunResult, TrainConfig, is_count, make_config
from posttrain.classic.folders import write_run_folder
from posttrain.report.compare import Comparison, write_report
from posttrain.report.jobs import Job, Outcome, run_jobs
from posttrain.report.runs import read_runs, write_stats

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


@dataclass(frozen=True)
class ClassicRun:
    """One job of a study: the run's settings, its arm label and its folder."""

    config: TrainConfig
    arm: str
    run_dir: Path


def train_job(run: ClassicRun, report: Callable[[int], None]) -> RunResult:
    """Job (``report.jobs``): train one run (one torch thread) and write its run folder."""
    result = train_arm(run.config, run.arm, report)
    write_run_folder(result, run.config, run.run_dir)
    return result


@dataclass
class StudyResult:
    """All runs of a study and where its outputs were written (``table_md`` is the comparison's
    ``report.md``, ``plot_png`` its ``curves.png``)."""

    env_id: str
    runs: list[RunResult]
    runs_csv: Path
    curves_csv: Path
    table_md: Path
    plot_png: Path
    comparison: Comparison


def run_study(
    env_id: str, algos: list[str], seeds: int, steps: int, out_dir: Path, **options: Any
) -> StudyResult:
    """Run every arm for ``seeds`` seeds and ``steps`` env steps; write the run folders, CSVs and
    the comparison (table, PNG, report.md) into ``out_dir``.

    ``options``: ``workers`` (parallel processes, default 1), ``isolate`` (each run in its own
    process even with one worker, so that its peak memory is measured; default False),
    ``gammas`` (discount sweep), ``progress`` (rich progress bar, default True), ``threshold``
    (of the comparison; default: its rule), ``command`` (shown in report.md), and any
    ``TrainConfig`` field as an override (``group_size``, ``num_groups``, ``lr``, ...; None keeps
    the per-environment default).
    """
    workers = options.pop("workers", None)
    workers = 1 if workers is None else workers
    isolate = bool(options.pop("isolate", False))
    gammas = options.pop("gammas", None)
    show_progress = bool(options.pop("progress", True))
    threshold = options.pop("threshold", None)
    command = str(options.pop("command", ""))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown study option(s) {unknown}")
    check_study(env_id, algos, seeds, steps, workers)
    jobs: list[Job] = []
    for arm in expand_arms(algos, gammas):
        algo, arm_overrides = parse_arm(arm)
        for seed in range(seeds):
            try:
                config = make_config(
                    env_id, algo, **{**options, **arm_overrides, "seed": seed, "total_steps": steps}
                )
            except ValueError as error:  # say which arm's setting it is (e.g. the discount of grpo@1.5)
                raise ValueError(f"arm {arm!r}: {error}") from None
            run = ClassicRun(config, arm, out_dir / f"{arm}-s{seed}")
            jobs.append(Job(f"{arm} seed {seed}", steps, train_job, run))
    outcomes = run_jobs(
        jobs, workers, show=show_progress, isolate=isolate or workers > 1, on_done=_done_line, title=env_id
    )
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        raise RuntimeError(f"{failed[0].job.label} failed: {failed[0].error}")
    for outcome in outcomes:
        write_stats(outcome.job.arg.run_dir, {"wall_s": outcome.wall_s, "peak_rss_mb": outcome.peak_rss_mb})
    runs = [o.result for o in outcomes]
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = read_runs([o.job.arg.run_dir for o in outcomes])
    title = f"{env_id}, {steps:,} steps per run: {curves[0].metric} by arm"
    comparison = write_report(curves, out_dir, threshold=threshold, title=title, command=command)
    result = StudyResult(
        env_id,
        runs,
        out_dir / "runs.csv",
        out_dir / "curves.csv",
        comparison.report_md,
        comparison.plot_png,
        comparison,
    )
    write_csvs(result)
    return result


def _done_line(outcome: Outcome) -> str:
    """One line per finished run, so that a log without the live bar still shows progress."""
    if outcome.error is not None:
        return f"{outcome.job.label} failed: {outcome.error}"
    run: RunResult = outcome.result
    return (
        f"{run.env_id} {run.arm} seed {run.seed}: final return {run.final_return:.1f}, "
        f"{run.steps_per_sec:,.0f} steps/s"
    )


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


def write_csvs(result: StudyResult) -> None:
    """runs.csv (one row per run) and curves.csv (one row per finished training episode)."""
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


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> ``TrainConfig`` overrides (values read as YAML: ``lr=3e-4``,
    ``same_start=false``); ``ValueError`` naming the item for a malformed or unknown key."""
    import yaml

    types = {f.name: str(f.type) for f in fields(TrainConfig) if f.name not in ("env_id", "algo", "seed")}
    known = list(types)
    settings: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or key not in known:
            raise ValueError(
                f"--set {item}: a classic run takes KEY=VALUE with KEY one of {', '.join(known)} "
                "(e.g. --set total_steps=100000)"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set {item}: {text!r} is not a value") from None
        if isinstance(value, str) and "float" in types[key]:  # YAML 1.1 reads 3e-4 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        settings[key] = value  # a value of the wrong kind is refused by make_config, naming the setting
    return settings


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
    print(result.comparison.table, end="")
    print(result.comparison.recommendation)
    print(f"wrote {result.runs_csv}, {result.curves_csv}, {result.table_md}, {result.plot_png}")
    return 0
