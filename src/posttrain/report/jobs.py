"""Running a comparison's jobs: in parallel processes under one progress display.

A job is a picklable ``fn(arg, report) -> result`` (``fn`` a module-level function, ``result``
picklable) that calls ``report(done)`` now and then with how much of its ``total`` it has done
(steps, environment steps). ``run_jobs`` runs them in this process one after another, or each in
a new spawned process, ``workers`` at a time; a process per job makes its peak resident memory
(``ru_maxrss``) that job's own. Torch threads are the job's business (one each when several run).
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from queue import Empty
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


def _in_child(fn: Callable[[Any, Report], Any], arg: Any, index: int, queue: Any) -> None:
    """Process entry: progress as ``("progress", index, done)`` on ``queue``, then
    ``("done", index, result, seconds, peak MiB)`` or ``("error", index, message)``."""
    start = time.perf_counter()
    try:
        result = fn(arg, lambda done: queue.put(("progress", index, done)))
    except Exception as error:
        queue.put(("error", index, _one_line(error)))
        return
    queue.put(("done", index, result, time.perf_counter() - start, peak_rss_mb()))


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
            done[index] = max(done[index], min(int(now), jobs[index].total))  # late reports never go back
            bar.update(task, completed=sum(done))

        def finish(index: int, outcome: Outcome, finished: int) -> None:
            report(index, outcome.job.total)
            bar.update(task, finished=finished)
            if on_done is not None:
                bar.console.print(on_done(outcome), highlight=False)

        if workers == 1 and not isolate:
            outcomes = []
            for index, job in enumerate(jobs):
                bar.update(task, description=job.label)
                outcomes.append(_in_process(job, functools.partial(report, index)))
                finish(index, outcomes[-1], len(outcomes))
            return outcomes
        return _in_processes(jobs, workers, report, finish)


def _in_processes(
    jobs: list[Job],
    workers: int,
    report: Callable[[int, int], None],
    finish: Callable[[int, Outcome, int], None],
) -> list[Outcome]:
    """Each job in its own spawned process, ``workers`` at a time (a new process per job, so that
    its peak memory is its own). A process that dies without a result (killed, out of memory)
    fails its job with its exit code."""
    context = get_context("spawn")
    queue = context.Queue()
    waiting = list(range(len(jobs)))
    running: dict[int, Any] = {}
    outcomes: dict[int, Outcome] = {}

    def handle(message: tuple[Any, ...]) -> None:
        kind, index, *rest = message
        if kind == "progress":
            report(index, rest[0])
            return
        job = jobs[index]
        if kind == "done":
            outcomes[index] = Outcome(job, rest[0], None, rest[1], rest[2])
        else:
            outcomes[index] = Outcome(job, None, rest[0], math.nan, None)
        running.pop(index).join()
        finish(index, outcomes[index], len(outcomes))

    try:
        while waiting or running:
            while waiting and len(running) < workers:
                index = waiting.pop(0)
                running[index] = context.Process(
                    target=_in_child,
                    args=(jobs[index].fn, jobs[index].arg, index, queue),
                    name=jobs[index].label,
                )
                running[index].start()
            try:
                handle(queue.get(timeout=0.5))
            except Empty:
                _fail_dead(running, jobs, queue, handle, outcomes, finish)
    finally:
        for process in running.values():  # interrupted: give the runs a moment to save, then stop them
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join()
    return [outcomes[index] for index in range(len(jobs))]


def _fail_dead(
    running: dict[int, Any],
    jobs: list[Job],
    queue: Any,
    handle: Callable[[tuple[Any, ...]], None],
    outcomes: dict[int, Outcome],
    finish: Callable[[int, Outcome, int], None],
) -> None:
    """Fail the jobs whose process exited without sending a result (after reading what is left
    on ``queue``: a process sends its result before it exits)."""
    dead = [index for index, process in running.items() if not process.is_alive()]
    if not dead:
        return
    with contextlib.suppress(Empty):
        while True:
            handle(queue.get(timeout=0.1))
    for index in dead:
        if index in running:
            code = running.pop(index).exitcode
            message = f"its process exited with code {code} without a result (killed, or out of memory?)"
            outcomes[index] = Outcome(jobs[index], None, message, math.nan, None)
            finish(index, outcomes[index], len(outcomes))
