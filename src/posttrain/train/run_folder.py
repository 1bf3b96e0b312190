"""One run, one folder, one process: the lock, name collisions, and what a resume may change.

- ``RunLock``: ``run_dir/.lock`` holds the pid of the process training in the folder; a second
  process refuses, naming it. The file is locked with ``flock``, which the kernel releases when the
  owner dies (kill -9 included), so a lock left by a dead process is simply taken over.
- ``claim_fresh_run``: a new run never truncates an old run's metrics or resumes its checkpoints;
  it refuses unless told to ``overwrite`` (which empties the folder first).
- ``check_resume_settings``: a resumed run continues with the settings it started with, except the
  few that do not change what is learned (``RESUMABLE``): ``config.yaml`` then says what is in effect.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from posttrain.train.checkpoint import CHECKPOINTS_DIR
from posttrain.train.config import ConfigError, TrainConfig
from posttrain.train.logging import CONFIG_FILE, METRICS_FILE, to_jsonable

LOCK_FILE = ".lock"
# settings a resume may change: the run length and what is logged or evaluated, never the model,
# the data, the algorithm or the optimizer (whose state the checkpoint restores anyway)
RESUMABLE = ("optim.steps", "eval.", "logging.", "run.num_threads")
IDENTITY = ("run.output_dir", "run.name")  # where the run is: the folder being resumed


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: in use, or already holding another run."""


# ----------------------------------------------------------------------------------------------
# Lock


def _lock_owner(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").split()
    except OSError:
        text = []
    return f"process {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


class RunLock:
    """Held while a process trains in ``run_dir`` (a context manager). ``run_dir`` is created if
    needed and removed again on release when the run left nothing in it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    self._lock(fd)
                finally:
                    if self._fd is None:  # not ours (in use, replaced, or an interrupt): let it go
                        os.close(fd)
        except RunFolderError:
            raise
        except OSError as error:  # a read-only or full disk, a filesystem without locks
            raise RunFolderError(
                f"cannot create or lock the run folder {self.run_dir}: {error.strerror or error}; set "
                "run.output_dir to a folder posttrain can write in (is the disk read-only or full?)"
            ) from error

    def _lock(self, fd: int) -> None:
        """Lock the open lock file ``fd`` and write our pid into it (``self._fd`` set once ours)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._remove_created_dir()
            raise RunFolderError(
                f"{self.run_dir} is in use by {_lock_owner(self.path)} ({self.path}); wait for it to "
                "finish or stop it, or give this run another run.name"
            ) from None
        # the previous owner may have deleted the file between our open and our lock: lock anew
        if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            return
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then locks a new file
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a run that stopped before writing anything leaves no empty folder

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# A fresh run


def run_contents(run_dir: Path) -> list[str]:
    """What makes ``run_dir`` hold a run: recorded metrics, checkpoints (even unfinished ones)."""
    found = []
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{CHECKPOINTS_DIR}/")
    return found


def claim_fresh_run(run_dir: Path, *, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run (the caller holds its lock): refuse when it holds a
    run, or, with ``overwrite``, delete everything in it first."""
    found = run_contents(run_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(found)}); continue it with `posttrain train "
            f"--resume {run_dir}`, replace it with --overwrite (Python: train(config, overwrite=True)), "
            "or choose another run.name"
        )
    if overwrite:
        for child in run_dir.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


# ----------------------------------------------------------------------------------------------
# What a resume may change


def _differences(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; keys only one side has (another posttrain version) are skipped."""
    changed = []
    for key in before.keys() & after.keys():
        old, new = before[key], after[key]
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` as plain data (None when missing or unreadable)."""
    try:
        loaded = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def changed_settings(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The keys whose value in ``config`` differs from ``saved`` (a config.yaml), as dotted names."""
    # through YAML as config.yaml was written, so equal settings compare equal (tuples, paths, floats)
    current = yaml.safe_load(yaml.safe_dump(to_jsonable(config.model_dump()), sort_keys=False))
    return sorted(_differences(saved, current))


def check_resume_settings(run_dir: Path, config: TrainConfig, checkpoint_step: int) -> None:
    """Refuse a resume whose settings differ from the run's own beyond ``RESUMABLE``, or that
    would end before the checkpoint it starts from."""
    saved = saved_config(run_dir)
    changed = [k for k in changed_settings(saved, config) if k not in IDENTITY] if saved else []
    refused = [key for key in changed if not key.startswith(RESUMABLE)]
    if refused:
        raise ConfigError(
            f"resume {run_dir}: the settings would change {', '.join(refused)} (see its {CONFIG_FILE}); a "
            "resumed run keeps its model, data, algorithm and optimizer settings (only optim.steps, eval.*, "
            "logging.* and run.num_threads may change); start a new run (another run.name) to change them"
        )
    if config.optim.steps < checkpoint_step:
        raise ConfigError(
            f"resume {run_dir}: optim.steps ({config.optim.steps}) is below the step of the checkpoint "
            f"it resumes from ({checkpoint_step}); give optim.steps >= {checkpoint_step}"
        )
