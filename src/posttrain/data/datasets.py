"""User datasets: JSONL / JSON / Parquet / CSV files or a local Hugging Face dataset folder -> rows.

Rows are plain dicts with the prompt under ``"prompt"`` and every other column unchanged, so reward
functions receive the answer fields as keyword arguments. Loading goes through the ``datasets``
library (``load_dataset`` for files, ``load_from_disk`` for folders written by ``save_to_disk``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posttrain.data.tasks import Task
from posttrain.rewards.functions import RewardSpec, resolve_reward_fn

__all__ = ["SUPPORTED_EXTENSIONS", "load_rows", "task_from_rows"]

# File suffix -> the `datasets` packaged builder that reads it.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
PROMPT_FIELD_KEY = "data.prompt_field"


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Loading a few thousand rows should not print progress bars into the trainer's output."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bar()


def _root_cause(error: BaseException) -> BaseException:
    """`datasets` wraps parser errors in a generic DatasetGenerationError; the innermost cause holds
    the useful part (e.g. "JSON parse error ... in row 1")."""
    seen = {id(error)}
    while (inner := error.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _read_file(path: Path, split: str) -> tuple[list[str], list[dict]]:
    import datasets

    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"unsupported dataset file {str(path)!r}: supported extensions are "
            f"{sorted(SUPPORTED_EXTENSIONS)}, or a folder written by Dataset.save_to_disk"
        )
    # A private cache: the rows are materialised as Python objects before it is removed, and the
    # user's shared cache is not filled with copies of small local files.
    with tempfile.TemporaryDirectory(prefix="posttrain-dataset-") as cache_dir:
        try:
            dataset = datasets.load_dataset(
                builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir
            )
        except Exception as error:
            root = _root_cause(error)
            raise ValueError(
                f"could not read {str(path)!r} as {builder}: {type(root).__name__}: {root}"
            ) from error
        return dataset.column_names, dataset.to_list()


def _read_folder(path: Path, split: str) -> tuple[list[str], list[dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(
            f"{str(path)!r} is a folder but not a saved dataset (no dataset_info.json / state.json): "
            "save it with Dataset.save_to_disk, or point to a file with one of "
            f"{sorted(SUPPORTED_EXTENSIONS)}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"split {split!r} not found in {str(path)!r}; available splits: {sorted(loaded)}"
            )
        loaded = loaded[split]
    return loaded.column_names, loaded.to_list()


def _check_prompt_field(path: Path, prompt_field: str, columns: list[str]) -> None:
    if prompt_field not in columns:
        raise ValueError(
            f"prompt field {prompt_field!r} not found in {str(path)!r}; available columns: {columns}. "
            f"Set `{PROMPT_FIELD_KEY}` in the config to the column that holds the prompt"
        )
    if prompt_field != "prompt" and "prompt" in columns:
        raise ValueError(
            f"{str(path)!r} has both {prompt_field!r} (the configured `{PROMPT_FIELD_KEY}`) and a 'prompt' "
            f"column; rename or drop the 'prompt' column, or set `{PROMPT_FIELD_KEY}: prompt`"
        )


def _check_rows(
    path: Path, rows: list[dict], columns: list[str], prompt_field: str, required_fields: Sequence[str]
) -> None:
    for field in required_fields:
        if field not in columns:
            raise ValueError(
                f"required field {field!r} not found in {str(path)!r}; available columns: {columns}. "
                f"Add a {field!r} column to every row, or rename the column that holds it"
            )
    for index, row in enumerate(rows):
        prompt = row[prompt_field]
        if not isinstance(prompt, str):
            raise ValueError(
                f"row {index} of {str(path)!r}: the prompt (column {prompt_field!r}) is a "
                f"{type(prompt).__name__}, not a string; every row needs a non-empty text prompt "
                f"(chat message lists are not supported here)"
            )
        if not prompt.strip():
            raise ValueError(
                f"row {index} of {str(path)!r}: the prompt (column {prompt_field!r}) is empty; "
                "remove the row or fill in its prompt"
            )
        for field in required_fields:
            if row.get(field) is None:
                raise ValueError(
                    f"row {index} of {str(path)!r} has no value for required field {field!r}; "
                    "fill it in or remove the row"
                )


def _rename_prompt(row: dict, prompt_field: str) -> dict:
    return {"prompt": row[prompt_field], **{k: v for k, v in row.items() if k != prompt_field}}


def load_rows(
    path: str | Path,
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    required_fields: Sequence[str] = (),
    limit: int | None = None,
) -> list[dict]:
    """Load a user dataset as a list of plain dicts with the prompt under ``"prompt"``.

    ``path`` is a ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` file (a file is one split; ``split``
    only names it) or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    (``split`` picks the split of a DatasetDict). ``prompt_field`` names the prompt column; it is
    renamed to ``"prompt"``. ``limit`` keeps the first rows only. Raises ``FileNotFoundError`` for a
    missing path and ``ValueError`` (naming the path, field, row and the fix) for bad data.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset not found: {str(path)!r} (relative paths are resolved from {str(Path.cwd())!r})"
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    with _quiet_progress_bars():
        columns, rows = _read_folder(path, split) if path.is_dir() else _read_file(path, split)
    _check_prompt_field(path, prompt_field, columns)
    if limit is not None:
        rows = rows[:limit]
    _check_rows(path, rows, columns, prompt_field, required_fields)
    if prompt_field != "prompt":
        rows = [
            {"prompt": row[prompt_field], **{k: v for k, v in row.items() if k != prompt_field}}
            for row in rows
        ]
    return rows


def task_from_rows(
    train_rows: list[dict],
    test_rows: list[dict],
    reward_fns: Sequence[RewardSpec | str | Callable[..., Any]],
    name: str,
    max_new_tokens: int,
    env: str | None = None,
) -> Task:
    """Wrap user rows into a ``Task``. Reward specs are resolved now so a bad import path fails before
    any training; bare strings and callables get weight 1.0. A task run in environment ``env``
    needs none: the environment scores its episodes."""
    if not train_rows:
        raise ValueError(f"task {name!r} has no training rows")
    for split_name, split_rows in (("train", train_rows), ("test", test_rows)):
        for index, row in enumerate(split_rows):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
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
    )
