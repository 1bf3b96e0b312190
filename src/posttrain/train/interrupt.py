"""Ctrl-C and SIGTERM during ``train``: finish the step, save a checkpoint, say how to resume.

While ``train`` runs (main thread only; the previous handlers come back after), SIGINT and SIGTERM
are caught. Once the RL steps have begun, the first signal lets the running step finish (an
update is never half applied); the loop then writes a checkpoint and ``train`` raises
``TrainingInterrupted``, whose message names the checkpoint and the resume command; the CLI exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal, or one during the set-up
and the initial evaluation (nothing learned yet, nothing to save), stops at once. Once the final
evaluation has begun, the run finishes instead (its final checkpoint is seconds away).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """``train`` stopped on a signal. ``checkpoint`` is what a resume starts from (None: nothing to
    resume); ``at_once`` is True when the stop did not wait for the running step (nothing new saved).
    A ``KeyboardInterrupt``, so code that handles Ctrl-C keeps doing so."""

    def __init__(self, signum: int, *, at_once: bool, step: int | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.at_once = at_once
        self.step = step
        self.run_dir: Path | None = None
        self.checkpoint: Path | None = None
        self.resume_command = ""
        self.holds_run = False  # the folder holds metrics: starting again needs --overwrite

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process killed by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum

    def describe(self, run_dir: Path, checkpoint: Path | None, resume_command: str, holds_run: bool) -> None:
        """Fill in where the run stands (``train`` does, on its way out)."""
        self.run_dir, self.checkpoint = run_dir, checkpoint
        self.resume_command, self.holds_run = resume_command, holds_run

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.at_once:
            head = f"{name}: stopped at once"
        else:
            head = f"{name}: stopped after step {self.step}, saved {self.checkpoint}"
        if self.checkpoint is None:
            again = " with --overwrite" if self.holds_run else ""
            return f"{head}; no checkpoint yet, so nothing to resume: start the run again{again}"
        if self.at_once:
            head += f"; the newest checkpoint is {self.checkpoint} (steps after it were not saved)"
        return f"{head}\nresume with: {self.resume_command}"


def _say(text: str) -> None:
    # os.write, not print: a handler may run in the middle of a print, and print is not reentrant
    with suppress(OSError):
        os.write(2, text.encode())


class StopRequest:
    """The signal that asked the run to stop, if any. Before ``defer`` (set-up, initial eval) a
    signal raises ``TrainingInterrupted`` at once; after it, the first signal is recorded for the
    loop to act on at the end of the running step, and a second one raises at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def defer(self) -> None:
        self.deferred = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested or not self.deferred:
            raise TrainingInterrupted(signum, at_once=True)
        self.signum = signum
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
        _say(
            f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
            f"({again} to stop at once, losing that step)\n"
        )

    def interrupted(self, step: int) -> TrainingInterrupted:
        """The exception for a stop the loop honoured after ``step``."""
        assert self.signum is not None
        return TrainingInterrupted(self.signum, at_once=False, step=step)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM for the duration (see the module docstring). Off the main thread
    nothing is installed (Python delivers signals to the main thread only), and a signal the
    process ignores (a background job's SIGINT) stays ignored."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:
            previous[signum] = handler
            signal.signal(signum, stop.handle)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
