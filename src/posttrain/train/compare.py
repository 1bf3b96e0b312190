"""``posttrain compare`` for language-model runs: every (algorithm, seed) pair on one config.

Each pair is an ordinary ``train`` run in ``<out>/<algorithm>-s<seed>/``, with the config's task,
model, rollout sizes and ``optim.steps``, differing only in ``algorithm``; seed ``i`` is
``run.seed + i`` for every algorithm, so all algorithms see the same model init, data split,
warm-start and prompt order. The warm-starts are made first (one per seed, cached under
``<out>/.cache``), then the runs, each in its own process with one torch thread, its output in
``<out>/logs/<name>.log``. The comparison itself (table, PNG, report) is ``report.compare``'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms.presets import PRESETS
from posttrain.report.jobs import Job, Outcome, Report, run_jobs
from posttrain.report.runs import METRICS_FILE, read_metrics, write_stats
from posttrain.train.config import ConfigError, TrainConfig, load_config
from posttrain.train.run_folder import RunFolderError, run_contents

LOGS_DIR = "logs"


@dataclass(frozen=True)
class PlannedRun:
    """One (algorithm, seed) run: the config file and ``--set`` overrides that make it, where it
    writes, and where its output goes."""

    name: str
    algorithm: str
    seed: int
    config_path: str | None
    overrides: tuple[str, ...]
    run_dir: Path
    log: Path
    steps: int

    def config(self) -> TrainConfig:
        return load_config(self.config_path, list(self.overrides))


def parse_algorithms(text: str) -> list[str]:
    """``"ppo,grpo"`` -> ["ppo", "grpo"]. ``ConfigError`` naming --algos for an empty list, a
    repeated name, or a name that is not a registered preset (listing them)."""
    known = sorted(PRESETS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(
            f"--algos is empty; give comma-separated algorithms, e.g. --algos {','.join(known[:2])}"
        )
    for name in names:
        if name not in known:
            raise ConfigError(f"--algos: unknown algorithm {name!r}; registered presets: {', '.join(known)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--algos names {', '.join(repeated)} more than once; give each algorithm once")
    return names


def plan_runs(
    config_path: str | Path | None,
    overrides: list[str],
    algorithms: list[str],
    seeds: int,
    out: Path,
    *,
    overwrite: bool = False,
) -> list[PlannedRun]:
    """The runs of a comparison, algorithm-major. Every run's config is loaded here, so that a
    setting one algorithm refuses (e.g. a group of one for GRPO) fails before anything runs;
    ``RunFolderError`` when a run folder already holds a run and ``overwrite`` is not set."""
    base = load_config(config_path, overrides)
    path = None if config_path is None else str(config_path)
    planned = []
    for algorithm in algorithms:
        for seed in range(base.run.seed, base.run.seed + seeds):
            name = f"{algorithm}-s{seed}"
            fixed = (
                f"algorithm={algorithm}",
                f"run.seed={seed}",
                f"run.output_dir={out}",
                f"run.name={name}",
                "run.num_threads=1",
                "logging.progress=false",
            )
            steps = load_config(path, [*overrides, *fixed]).optim.steps
            log = out / LOGS_DIR / f"{name}.log"
            planned.append(
                PlannedRun(name, algorithm, seed, path, (*overrides, *fixed), out / name, log, steps)
            )
    held = [run.run_dir for run in planned if run_contents(run.run_dir)]
    if held and not overwrite:
        raise RunFolderError(
            f"{held[0]} already holds a run ({len(held)} of this comparison's {len(planned)} do); pass "
            "--overwrite to replace them, or choose another --out"
        )
    return planned


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so also what C code and
    child processes print) to ``log``, appending, until the block ends; no download or loading
    bars (as the command line has none)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", encoding="utf-8") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _watch_steps(metrics: Path, report: Report, stop: threading.Event, every_s: float = 1.0) -> None:
    """Report the last step logged in ``metrics`` every ``every_s`` seconds until ``stop``."""
    while not stop.wait(every_s):
        try:
            rows = read_metrics(metrics) if metrics.is_file() else []
        except (OSError, ValueError):
            continue
        if rows:
            report(max(int(row["step"]) for row in rows))


def warm_start_seed(run: PlannedRun, report: Report) -> str:
    """Job: build the task and the embedded model's warm-start (cached) that every algorithm's
    run of this seed starts from, so that parallel runs do not each make it."""
    import torch

    from posttrain.train.setup import build_task, embedded_model_path, seed_everything

    with output_to(run.log):
        config = run.config()
        if config.run.num_threads:  # as train() does: one thread per process
            torch.set_num_threads(config.run.num_threads)
        seed_everything(config.run.seed)
        task = build_task(config)
        if config.model.path is None:
            embedded_model_path(config, task)
    report(1)
    return run.name


def train_run(run: PlannedRun, report: Report) -> dict[str, Any]:
    """Job: ``train`` one planned run (replacing a run already in its folder); its output goes to
    ``run.log``, its progress (the last step logged) to ``report``. Returns the held-out
    evaluations before and after RL."""
    from posttrain.train.loop import train

    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_steps, args=(run.run_dir / METRICS_FILE, report, stop), daemon=True
    )
    with output_to(run.log):
        watcher.start()
        try:
            result = train(run.config(), overwrite=True)
        finally:
            stop.set()
            watcher.join()
    return {"initial_eval": result.initial_eval, "final_eval": result.final_eval}


def warm_start_jobs(planned: list[PlannedRun]) -> list[Job]:
    """One warm-start job per seed (the first algorithm's run of it stands for all), or none when
    the runs start from ``model.path`` or skip the warm-start."""
    first = planned[0].config()
    if first.model.path is not None or first.warmstart.steps == 0:
        return []
    by_seed: dict[int, PlannedRun] = {}
    for run in planned:
        by_seed.setdefault(run.seed, run)
    return [Job(f"warm-start seed {seed}", 1, warm_start_seed, run) for seed, run in by_seed.items()]


def run_comparison(planned: list[PlannedRun], workers: int, *, show: bool = True) -> list[Outcome]:
    """The warm-starts, then every planned run, ``workers`` processes at a time. Each finished
    run's folder gets a ``compare.json`` (``algorithm``, ``seed``, ``wall_s``, ``peak_rss_mb``,
    ``log``). Returns one outcome per run, in ``planned`` order (a run whose seed's warm-start
    failed did not start: its outcome carries that error)."""
    prepared = run_jobs(warm_start_jobs(planned), workers, show=show, on_done=done_line, title="warm-starts")
    failed = {outcome.job.arg.seed: outcome.error for outcome in prepared if outcome.error}
    jobs = [Job(run.name, run.steps, train_run, run) for run in planned]
    runnable = [job for job in jobs if job.arg.seed not in failed]
    finished = {o.job.arg.name: o for o in run_jobs(runnable, workers, show=show, on_done=done_line)}
    outcomes = []
    for job in jobs:
        run = job.arg
        outcome = finished.get(run.name) or Outcome(job, None, f"warm-start: {failed[run.seed]}", 0.0, None)
        if outcome.error is None:
            stats = {"algorithm": run.algorithm, "seed": run.seed, "wall_s": outcome.wall_s}
            write_stats(run.run_dir, stats | {"peak_rss_mb": outcome.peak_rss_mb, "log": str(run.log)})
        outcomes.append(outcome)
    return outcomes


def done_line(outcome: Outcome) -> str:
    """The line logged when a job of the comparison ends."""
    run: PlannedRun = outcome.job.arg
    if outcome.error is not None:
        return f"{outcome.job.label} failed: {outcome.error} (log: {run.log})"
    memory = "" if outcome.peak_rss_mb is None else f", peak memory {outcome.peak_rss_mb:,.0f} MiB"
    result = outcome.result
    if isinstance(result, dict) and "final_eval" in result:
        before = result["initial_eval"].get("eval_accuracy", float("nan"))
        after = result["final_eval"].get("eval_accuracy", float("nan"))
        return f"{run.name}: eval accuracy {before:.3f} -> {after:.3f} in {outcome.wall_s:.0f} s{memory}"
    return f"{outcome.job.label}: done in {outcome.wall_s:.0f} s{memory}"
