"""Run outputs: ``metrics.jsonl``, ``samples.jsonl``, ``config.yaml``, TensorBoard, a live progress bar.

Every line of ``metrics.jsonl`` is ``{"step": int, "<metric>": float | null, ...}``; non-finite
values are written as ``null`` so the file stays strict JSON. On resume the files are cut back to
the checkpoint's step, so a resumed run's files equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

# the file names and the metrics reader are shared with the reports, which read finished runs
from posttrain.report.runs import CONFIG_FILE, METRICS_FILE, read_metrics  # noqa: F401 (re-exported)
from posttrain.train.checkpoint import checkpoint_step, latest_checkpoint, write_text_atomic

SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"

# (metric key, short label) shown by the progress bar, in this order, when present.
PROGRESS_FIELDS: tuple[tuple[str, str], ...] = (
    ("reward_mean", "reward"),
    ("accuracy", "acc"),
    ("eval_accuracy", "eval"),
    ("kl", "kl"),
    ("clipfrac", "clip"),
    ("tokens_per_s", "tok/s"),
)


# ----------------------------------------------------------------------------------------------
# Value conversion


def to_float(value: Any) -> float:
    """A metric value as a python float: accepts numbers, numpy scalars, one-element tensors/arrays."""
    if isinstance(value, torch.Tensor | np.ndarray):
        numel = value.numel() if isinstance(value, torch.Tensor) else value.size
        if numel != 1:
            raise TypeError(f"metric must be a scalar, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool | int | float | np.number | np.bool_):
        return float(value)
    raise TypeError(f"metric must be a number, got {type(value).__name__}")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def to_jsonable(value: Any) -> Any:
    """Recursively convert tensors, numpy values, paths and tuples into strict-JSON values
    (non-finite floats become ``None``)."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return str(value)


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# Files


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep only the lines of a JSONL file whose ``step`` is <= ``step`` (atomic rewrite).
    Unparsable lines (a write cut by a crash) are dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class RunLogger:
    """Writes a run's metrics, samples and config under ``run_dir``.

    A fresh logger (``resume=False``) starts ``metrics.jsonl`` and ``samples.jsonl`` empty. With
    ``resume=True`` the lines with ``step > resume_step`` are removed first; ``resume_step``
    defaults to the step of the run's latest complete checkpoint. TensorBoard events after that
    step are purged the same way (``SummaryWriter(purge_step=...)``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        resume: bool = False,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self.resume_step: int | None = None
        if resume:
            self.resume_step = resume_step if resume_step is not None else self._checkpoint_step()
            truncate_jsonl_after(self.metrics_path, self.resume_step)
            truncate_jsonl_after(self.samples_path, self.resume_step)
        mode = "a" if resume else "w"
        self._metrics_file: IO[str] = open(self.metrics_path, mode, encoding="utf-8")  # noqa: SIM115
        self._samples_file: IO[str] = open(self.samples_path, mode, encoding="utf-8")  # noqa: SIM115
        self._writer: Any = None
        if tensorboard:
            # Imported lazily: it pulls in the tensorboard package, slow to import.
            from torch.utils.tensorboard import SummaryWriter

            purge = self.resume_step + 1 if self.resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def _checkpoint_step(self) -> int:
        ckpt = latest_checkpoint(self.run_dir)
        step = checkpoint_step(ckpt) if ckpt is not None else None
        if step is None:
            raise FileNotFoundError(f"resume=True but {self.run_dir} has no complete checkpoint")
        return step

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` (NaN/inf -> null) and TensorBoard."""
        if "step" in metrics:
            raise ValueError("'step' is reserved; pass it as the step argument")
        values = {str(key): to_float(value) for key, value in metrics.items()}
        record = {"step": int(step)} | {key: _finite_or_none(v) for key, v in values.items()}
        self._metrics_file.write(_dumps(record) + "\n")
        self._metrics_file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=int(step))
            self._writer.flush()

    def log_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        """Append one line ``{"step": step, **sample}`` per sample to ``samples.jsonl``."""
        for sample in samples:
            record = {"step": int(step)} | to_jsonable(dict(sample))
            self._samples_file.write(_dumps(record) + "\n")
        self._samples_file.flush()

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved config to ``config.yaml`` (atomically) and return its path."""
        path = self.run_dir / CONFIG_FILE
        write_text_atomic(path, yaml.safe_dump(to_jsonable(config), sort_keys=False))
        return path

    def close(self) -> None:
        for f in (self._metrics_file, self._samples_file):
            if not f.closed:
                f.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Progress


def _format_value(label: str, value: float) -> str:
    if not math.isfinite(value):
        return f"{label} {value}"
    if label == "tok/s" or abs(value) >= 1000:
        return f"{label} {value:.0f}"
    return f"{label} {value:.3g}"


def format_metrics(metrics: Mapping[str, Any], fields: Sequence[tuple[str, str]] = PROGRESS_FIELDS) -> str:
    """Compact one-line summary, e.g. ``reward 0.52 | acc 0.41 | kl 0.0031 | tok/s 812``."""
    parts = []
    for key, label in fields:
        if key in metrics:
            try:
                parts.append(_format_value(label, to_float(metrics[key])))
            except TypeError:
                continue
    return " | ".join(parts)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainProgress:
    """Live progress bar (step/total, bar, ETA, compact metrics) for a training run.

    When ``enabled=False`` or the console is not a terminal (CI logs, files) it prints a plain
    line every ``log_every`` steps (default: about 20 lines per run, plus the last step) instead.
    ``start_step`` is where a resumed run begins; the ETA only counts steps run in this process.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        console: Console | None = None,
        log_every: int | None = None,
        fields: Sequence[tuple[str, str]] = PROGRESS_FIELDS,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.fields = tuple(fields)
        self.console = console if console is not None else Console(file=sys.stdout)
        self.live = enabled and self.console.is_terminal
        self.log_every = log_every if log_every is not None else max(1, total_steps // 20)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step, metrics=""
        )
        self._progress.start()

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record that ``step`` steps are done, with that step's metrics."""
        text = format_metrics(metrics, self.fields)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, metrics=text)
            return
        if step % self.log_every == 0 or step >= self.total_steps:
            line = f"step {step}/{self.total_steps}"
            if text:
                line += f" | {text}"
            self.console.file.write(f"{line} | eta {_format_duration(self.eta_seconds(step))}\n")
            self.console.file.flush()

    def eta_seconds(self, step: int) -> float:
        """Remaining time at the mean pace of the steps run since :meth:`start`."""
        done = step - self.start_step
        if done <= 0:
            return math.inf if step < self.total_steps else 0.0
        pace = (time.perf_counter() - self._t0) / done
        return pace * max(0, self.total_steps - step)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    def __enter__(self) -> TrainProgress:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
