"""Running a comparison's jobs: in parallel processes under one progress display.

A job is a picklable ``fn(arg, report) -> result`` (``fn`` a module-level function) that calls
``report(done)`` now and then with how much of its ``total`` it has done (steps, environment
steps). ``run_jobs`` runs them in this process one after another, or each in a fresh spawned
process, ``workers`` at a time; a fresh process per job makes its peak resident memory
(``ru_maxrss``) that job's own. Torch threads are the job's business (one each when several run).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Report = Callable[[int], None]


@dataclass(frozen=True)
class Job:
    """One run: ``fn(arg, report)`` with ``report(done)``, ``done`` out of ``total``."""

    label: str
    total: int
    fn: Callable[[Any, Report], Any]
    arg: Any


@dataclass(frozen=True)
class Outcome:
    """What a job returned (``result``) or the one-line ``error`` it raised (then ``result`` is
    None), with its wall-clock seconds and, when it had its own process, its peak resident memory."""

    job: Job
    result: Any
    error: str | None
    wall_s: float
    peak_rss_mb: float | None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def _in_child(fn: Callable[[Any, Report], Any], arg: Any, index: int, queue: Any) -> tuple[Any, float, float]:
    """Worker-process entry: ``(result, seconds, peak MiB)``; progress goes to ``queue`` as
    ``(index, done)``."""
    start = time.perf_counter()
    result = fn(arg, lambda done: queue.put((index, done)))
    return result, time.perf_counter() - start, peak_rss_mb()


def _in_process(job: Job, report: Report) -> Outcome:
    start = time.perf_counter()
    try:
        result = job.fn(job.arg, report)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        return Outcome(job, None, _one_line(error), time.perf_counter() - start, None)
    return Outcome(job, result, None, time.perf_counter() - start, None)


def run_jobs(
    jobs: list[Job],
    workers: int = 1,
    *,
    show: bool = True,
    isolate: bool = True,
    on_done: Callable[[Outcome], str] | None = None,
    title: str = "runs",
) -> list[Outcome]:
    """Run ``jobs``, ``workers`` at a time, and return their outcomes in ``jobs`` order.

    ``isolate``: each job in a fresh spawned process (else, with one worker, in this process, and
    no peak memory is measured). One rich progress bar counts every job's ``done`` against the sum
    of the ``total``; ``on_done(outcome)`` returns a line printed when a job ends, so a log without
    the live bar still shows progress. A job that raises does not stop the others: its outcome
    carries the error.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[finished]}/{task.fields[jobs]} done"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    done = [0] * len(jobs)
    with Progress(*columns, disable=not show, transient=False) as bar:
        task = bar.add_task(title, total=max(1, sum(job.total for job in jobs)), finished=0, jobs=len(jobs))

        def report(index: int, now: int) -> None:
            done[index] = max(0, min(int(now), jobs[index].total))
            bar.update(task, completed=sum(done))

        def finish(index: int, outcome: Outcome, finished: int) -> None:
            report(index, outcome.job.total)
            bar.update(task, finished=finished)
            if on_done is not None:
                bar.console.log(on_done(outcome))

        if workers == 1 and not isolate:
            outcomes = []
            for index, job in enumerate(jobs):
                bar.update(task, description=job.label)
                outcomes.append(_in_process(job, lambda now, i=index: report(i, now)))
                finish(index, outcomes[-1], len(outcomes))
            return outcomes
        return _in_processes(jobs, workers, report, finish)


def _in_processes(
    jobs: list[Job],
    workers: int,
    report: Callable[[int, int], None],
    finish: Callable[[int, Outcome, int], None],
) -> list[Outcome]:
    context = get_context("spawn")
    outcomes: dict[int, Outcome] = {}
    with context.Manager() as manager:
        queue = manager.Queue()
        pool = ProcessPoolExecutor(min(workers, max(1, len(jobs))), mp_context=context, max_tasks_per_child=1)
        try:
            futures: dict[Future[Any], int] = {
                pool.submit(_in_child, job.fn, job.arg, index, queue): index for index, job in enumerate(jobs)
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    report(*queue.get())
                for future in finished:
                    index = futures[future]
                    outcomes[index] = _outcome(jobs[index], future)
                    finish(index, outcomes[index], len(outcomes))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [outcomes[index] for index in range(len(jobs))]


def _outcome(job: Job, future: Future[Any]) -> Outcome:
    """The outcome of a finished future; a job that failed has no time or memory to report."""
    error = future.exception()
    if error is None:
        result, seconds, peak = future.result()
        return Outcome(job, result, None, seconds, peak)
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not a failed run
        raise error
    return Outcome(job, None, _one_line(error), math.nan, None)
