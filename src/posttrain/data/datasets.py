"""User datasets: JSONL / JSON / Parquet / CSV files or a local Hugging Face dataset folder -> rows.

Rows are plain dicts with the prompt under ``"prompt"`` and every other column unchanged, so reward
functions receive the answer fields as keyword arguments. JSON and JSON-lines files are read here
(so a bad line is named by its number); Parquet, CSV and folders written by ``save_to_disk`` go
through the ``datasets`` library. Every problem with the data raises ``DataError``, naming the file,
the row (and line) and the field, and saying how to fix it.

This module also splits rows: a held-out test split (``hold_out``), the rows that carry a
demonstration for the warm-start (``demonstration_rows``) and a seeded share of rows
(``split_rows``, used to keep the warm-start's rows apart from RL's).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posttrain.data.tasks import Task
from posttrain.rewards.functions import RewardSpec, resolve_reward_fn

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "DataNotFoundError",
    "demonstration_rows",
    "hold_out",
    "load_rows",
    "split_rows",
    "task_from_rows",
]

# File suffix -> the `datasets` packaged builder that reads it ("json" files are read here).
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
PROMPT_FIELD_KEY = "data.prompt_field"


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the row or line, the field and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset path that does not exist (also a ``FileNotFoundError``)."""


# a table read from a file: column names, rows, and each row's line number (JSON lines only)
_Table = tuple[list[str], list[dict], list[int] | None]


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Loading a few thousand rows should not print progress bars into the trainer's output, nor
    `datasets`' own log line about a file it cannot read (the DataError says it once, better)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _root_cause(error: BaseException) -> BaseException:
    """`datasets` wraps parser errors in a generic DatasetGenerationError; the innermost cause holds
    the useful part (e.g. "Error tokenizing data")."""
    seen = {id(error)}
    while (inner := error.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _decode_utf8(path: Path, label: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (some editors write one) is not data
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{label}: line {line} is not valid UTF-8 (byte {data[error.start]:#x}); save the file as UTF-8"
        ) from None


def _table(rows: list[dict], lines: list[int] | None) -> _Table:
    """Columns in first-seen order; a row lacking a column gets None there (as `datasets` does)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, [{column: row.get(column) for column in columns} for row in rows], lines


def _object_or_error(value: Any, where: str, label: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"{label}: {where} is a JSON {type(value).__name__}, not an object; every row must be "
            '{"prompt": ..., "<field>": ...}'
        )
    return value


def _read_json(path: Path, label: str) -> _Table:
    """A JSON array of objects, or JSON lines (one object per line; blank lines are skipped)."""
    text = _decode_utf8(path, label)
    try:
        return _parse_json(text, label)
    except RecursionError:  # json's parser recurses once per [ or {
        raise DataError(f"{label}: nested too deeply to hold rows (one JSON object per row)") from None


def _parse_json(text: str, label: str) -> _Table:
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{label}: not valid JSON at line {error.lineno}: {error.msg}") from None
        rows = [_object_or_error(value, f"item {index}", label) for index, value in enumerate(values)]
        return _table(rows, None)
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{label}: line {number} is not valid JSON ({error.msg} at column {error.colno}): "
                f"{line[:80]!r}; each line must hold one JSON object"
            ) from None
        rows.append(_object_or_error(value, f"line {number}", label))
        lines.append(number)
    return _table(rows, lines)


# what to check when the `datasets` library cannot read a file
_READ_HINTS = {
    "csv": "; a CSV file needs a header line and the same number of comma-separated fields on every "
    "line (quote a field that holds a comma)",
    "parquet": "; write it with pandas.DataFrame.to_parquet or Dataset.to_parquet",
}


def _read_with_datasets(path: Path, builder: str, split: str, label: str) -> _Table:
    import datasets

    if path.stat().st_size == 0:
        return [], [], None
    if builder == "csv":
        # read here first: a bad byte is named by its line, and a header alone has no rows
        lines = [line for line in _decode_utf8(path, label).splitlines() if line.strip()]
        if len(lines) <= 1:
            return lines[0].split(",") if lines else [], [], None
    # A private cache: the rows are materialised as Python objects before it is removed, and the
    # user's shared cache is not filled with copies of small local files.
    with tempfile.TemporaryDirectory(prefix="posttrain-dataset-") as cache_dir:
        try:
            dataset = datasets.load_dataset(
                builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir
            )
        except Exception as error:
            root = _root_cause(error)
            hint = _READ_HINTS.get(builder, "")
            raise DataError(
                f"could not read {label} as {builder}: {type(root).__name__}: {str(root).strip().rstrip('.')}{hint}"
            ) from error
        return dataset.column_names, dataset.to_list(), None


def _read_file(path: Path, split: str, label: str) -> _Table:
    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"unsupported dataset file {label}: supported extensions are "
            f"{sorted(SUPPORTED_EXTENSIONS)}, or a folder written by Dataset.save_to_disk"
        )
    if builder == "json":
        return _read_json(path, label)
    return _read_with_datasets(path, builder, split, label)


def _read_folder(path: Path, split: str, label: str) -> _Table:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(
            f"{label} is a folder but not a saved dataset (no dataset_info.json / state.json): "
            "save it with Dataset.save_to_disk, or point to a file with one of "
            f"{sorted(SUPPORTED_EXTENSIONS)}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not found in {label}; available splits: {sorted(loaded)}")
        loaded = loaded[split]
    return loaded.column_names, loaded.to_list(), None


def _check_prompt_field(label: str, prompt_field: str, columns: list[str]) -> None:
    if prompt_field not in columns:
        raise DataError(
            f"prompt field {prompt_field!r} not found in {label}; available columns: {columns}. "
            f"Set `{PROMPT_FIELD_KEY}` in the config to the column that holds the prompt"
        )
    if prompt_field != "prompt" and "prompt" in columns:
        raise DataError(
            f"{label} has both {prompt_field!r} (the configured `{PROMPT_FIELD_KEY}`) and a 'prompt' "
            f"column; rename or drop the 'prompt' column, or set `{PROMPT_FIELD_KEY}: prompt`"
        )


def _where(index: int, lines: list[int] | None, label: str) -> str:
    """``row 3 (line 5) of 'rows.jsonl'``: rows count from 0, lines from 1."""
    return f"row {index}{f' (line {lines[index]})' if lines else ''} of {label}"


def _fields(row: dict) -> list[str]:
    return [key for key, value in row.items() if value is not None]


def _check_rows(
    label: str,
    rows: list[dict],
    lines: list[int] | None,
    columns: list[str],
    prompt_field: str,
    required_fields: Sequence[str],
) -> None:
    for field in required_fields:
        if field not in columns:
            raise DataError(
                f"required field {field!r} not found in {label}; available columns: {columns}. "
                f"Add a {field!r} column to every row, or rename the column that holds it"
            )
    for index, row in enumerate(rows):
        where = _where(index, lines, label)
        prompt = row[prompt_field]
        if prompt is None:
            raise DataError(
                f"{where} has no prompt field {prompt_field!r} (its fields: {_fields(row)}); "
                "give every row a text prompt, or remove the row"
            )
        if not isinstance(prompt, str):
            raise DataError(
                f"{where}: the prompt (column {prompt_field!r}) is a {type(prompt).__name__}, not a "
                "string; every row needs a non-empty text prompt (chat message lists are not supported here)"
            )
        if not prompt.strip():
            raise DataError(
                f"{where}: the prompt (column {prompt_field!r}) is empty; remove the row or fill in its prompt"
            )
        for field in required_fields:
            if row.get(field) is None:
                raise DataError(
                    f"{where} has no value for required field {field!r}; fill it in or remove the row"
                )


def load_rows(
    path: str | Path,
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    required_fields: Sequence[str] = (),
    limit: int | None = None,
    config_key: str | None = None,
) -> list[dict]:
    """Load a user dataset as a list of plain dicts with the prompt under ``"prompt"``.

    ``path`` is a ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` file (a file is one split; ``split``
    only names it) or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    (``split`` picks the split of a DatasetDict). ``prompt_field`` names the prompt column; it is
    renamed to ``"prompt"``. A row lacking a column has None there. ``limit`` keeps the first rows
    only. ``config_key`` (e.g. ``"data.path"``) names the setting in messages. Raises
    ``DataNotFoundError`` for a missing path and ``DataError`` (naming the path, row, field and the
    fix) for bad or empty data.
    """
    path = Path(path).expanduser()
    label = f"{config_key} {str(path)!r}" if config_key else repr(str(path))
    if not path.exists():
        raise DataNotFoundError(
            f"dataset not found: {label} (relative paths are resolved from {str(Path.cwd())!r})"
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    with _quiet_progress_bars():
        columns, rows, lines = (
            _read_folder(path, split, label) if path.is_dir() else _read_file(path, split, label)
        )
    if not rows:
        raise DataError(
            f"{label} has no rows; give a file with one row (one JSON object per line) per prompt"
        )
    _check_prompt_field(label, prompt_field, columns)
    if limit is not None:
        rows = rows[:limit]
    _check_rows(label, rows, lines, columns, prompt_field, required_fields)
    if prompt_field != "prompt":
        rows = [
            {"prompt": row[prompt_field], **{k: v for k, v in row.items() if k != prompt_field}}
            for row in rows
        ]
    return rows


# ---------------------------------------------------------------- splits


def hold_out(
    rows: list[dict], count: int, seed: int, *, label: str = "the dataset"
) -> tuple[list[dict], list[dict]]:
    """``(rest, held_out)``: ``count`` rows picked by a shuffle seeded with ``seed``; both keep the
    rows' order and share no row. At least one row must be left over."""
    if count >= len(rows):
        raise DataError(
            f"{label} has {len(rows)} rows: too few to hold out {count} for the test split and train on "
            "the rest; add rows, give data.test_path, or lower data.num_test / data.test_fraction"
        )
    picked = set(random.Random(f"test-split-{seed}").sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(picked, rest)`` of a seeded share ``fraction`` of ``rows`` (at least one row),
    each in the rows' order."""
    count = max(1, round(fraction * len(rows)))
    picked = set(random.Random(f"warmstart-split-{seed}").sample(range(len(rows)), min(count, len(rows))))
    return sorted(picked), [i for i in range(len(rows)) if i not in picked]


def demonstration_rows(
    rows: list[dict], solution_field: str, *, label: str = "the dataset"
) -> tuple[list[int], list[dict]]:
    """The rows whose ``solution_field`` holds a demonstration (the ideal completion): their indices,
    and copies with the demonstration as text under ``"solution"`` (what the warm-start imitates;
    the rows themselves, which reward functions read, are not changed)."""
    indices, demos = [], []
    for index, row in enumerate(rows):
        value = row.get(solution_field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise DataError(
                f"row {index} of {label}: the demonstration (field {solution_field!r}) is a "
                f"{type(value).__name__}; it must be the completion's text"
            )
        indices.append(index)
        demos.append({**row, "solution": str(value)})
    return indices, demos


def task_from_rows(
    train_rows: list[dict],
    test_rows: list[dict],
    reward_fns: Sequence[RewardSpec | str | Callable[..., Any]],
    name: str,
    max_new_tokens: int,
    env: str | None = None,
    *,
    demonstrations: list[dict] | None = None,
) -> Task:
    """Wrap user rows into a ``Task``. Reward specs are resolved now so a bad import path fails before
    any training; bare strings and callables get weight 1.0. A task run in environment ``env``
    needs none: the environment scores its episodes. ``demonstrations`` are the warm-start's rows
    (prompt + solution); None = the training rows."""
    if not train_rows:
        raise DataError(f"task {name!r} has no training rows")
    splits = (("train", train_rows), ("test", test_rows), ("demonstration", demonstrations or []))
    for split_name, split_rows_ in splits:
        for index, row in enumerate(split_rows_):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(
                    f"task {name!r}: {split_name} row {index} has no non-empty string 'prompt' "
                    "(load files with load_rows, which renames the prompt column)"
                )
    if not reward_fns and env is None:
        raise ValueError(f"task {name!r} needs at least one reward function")
    if max_new_tokens <= 0:
        raise ValueError(f"task {name!r}: max_new_tokens must be positive, got {max_new_tokens}")
    specs = [spec if isinstance(spec, RewardSpec) else RewardSpec(spec) for spec in reward_fns]
    for spec in specs:
        resolve_reward_fn(spec.fn)
    return Task(
        name=name,
        train=list(train_rows),
        test=list(test_rows),
        reward_fns=specs,
        max_new_tokens=int(max_new_tokens),
        description=f"User dataset {name!r}: {len(train_rows)} train / {len(test_rows)} test rows.",
        demonstrations=None if demonstrations is None else list(demonstrations),
    )
