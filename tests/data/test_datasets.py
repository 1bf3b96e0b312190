"""User datasets from JSONL / JSON / Parquet / CSV files and saved dataset folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data.datasets import (
    SUPPORTED_EXTENSIONS,
    DataError,
    DataNotFoundError,
    demonstration_rows,
    hold_out,
    load_rows,
    split_rows,
    task_from_rows,
)
from posttrain.data.tasks import Task
from posttrain.rewards.functions import RewardSpec, RewardSpecError, resolve_reward_specs, score_completions

ROWS = [
    {"question": "2+3=", "answer": "5", "level": 1},
    {"question": "7-9=", "answer": "-2", "level": 2},
    {"question": "4+4=", "answer": "8", "level": 1},
]
EXPECTED = [{"prompt": r["question"], "answer": r["answer"], "level": r["level"]} for r in ROWS]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_json_array(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user_data")
    saved_dataset = folder / "saved_dataset"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved_dataset))
    saved_dict = folder / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    ).save_to_disk(str(saved_dict))
    return {
        "jsonl": _write_jsonl(folder / "rows.jsonl", ROWS),
        "json": _write_json_array(folder / "rows.json", ROWS),
        "csv": _write_csv(folder / "rows.csv", ROWS),
        "parquet": _write_parquet(folder / "rows.parquet", ROWS),
        "saved_dataset": saved_dataset,
        "saved_dict": saved_dict,
    }


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved_dataset"])
def test_each_format_loads_the_same_rows(files: dict[str, Path], kind: str) -> None:
    assert load_rows(files[kind], prompt_field="question") == EXPECTED


def test_csv_loads_with_inferred_types(files: dict[str, Path]) -> None:
    rows = load_rows(files["csv"], prompt_field="question")
    assert [row["prompt"] for row in rows] == ["2+3=", "7-9=", "4+4="]
    # CSV has no types: numeric-looking answers come back as numbers, which the verifiers accept.
    assert [int(row["answer"]) for row in rows] == [5, -2, 8]


def test_dataset_dict_split_is_selected(files: dict[str, Path]) -> None:
    assert load_rows(files["saved_dict"], prompt_field="question") == EXPECTED[:2]
    assert load_rows(files["saved_dict"], split="test", prompt_field="question") == EXPECTED[2:]


def test_missing_split_lists_available(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_rows(files["saved_dict"], split="validation", prompt_field="question")


def test_prompt_column_named_prompt_needs_no_setting(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    assert load_rows(path) == [{"prompt": "1+1=", "answer": "2"}]


def test_limit_keeps_the_first_rows(files: dict[str, Path]) -> None:
    assert load_rows(files["jsonl"], prompt_field="question", limit=2) == EXPECTED[:2]
    assert load_rows(files["jsonl"], prompt_field="question", limit=0) == []


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset not found: .*nowhere\.jsonl"):
        load_rows(tmp_path / "nowhere.jsonl")


def test_unsupported_extension_names_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "rows.xlsx"
    path.write_text("not really a spreadsheet")
    with pytest.raises(
        ValueError, match=r"unsupported dataset file .*rows\.xlsx.*'\.csv', '\.json', '\.jsonl'"
    ):
        load_rows(path)
    assert set(SUPPORTED_EXTENSIONS) == {".jsonl", ".json", ".parquet", ".csv"}


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "random_folder").mkdir()
    with pytest.raises(ValueError, match=r"not a saved dataset.*save_to_disk"):
        load_rows(tmp_path / "random_folder")


def test_malformed_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{this is not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl': line 3 is not valid JSON .*one JSON object"):
        load_rows(path)


def test_a_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "ok"}\n["a", "b"]\n')
    with pytest.raises(DataError, match=r"line 2 is a JSON list, not an object"):
        load_rows(path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1\.jsonl': line 2 is not valid UTF-8 .*save the file as UTF-8"
    ):
        load_rows(path)


@pytest.mark.parametrize(
    ("name", "content"), [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.csv", "")]
)
def test_a_file_without_rows_says_so(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"data.path '.*{name}' has no rows"):
        load_rows(path, config_key="data.path")


def test_a_json_array_file_with_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"rows\.json': not valid JSON at line 3"):
        load_rows(path)


def test_a_row_without_the_prompt_field_names_the_row_and_its_fields(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "gap.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}]
    )
    with pytest.raises(
        DataError,
        match=r"row 1 \(line 2\) of .*gap\.jsonl' has no prompt field 'prompt' \(its fields: \['answer', 'question'\]\)",
    ):
        load_rows(path)


def test_data_errors_are_value_errors_and_a_missing_file_is_also_file_not_found(tmp_path: Path) -> None:
    assert issubclass(DataError, ValueError)
    with pytest.raises(
        DataNotFoundError, match=r"dataset not found: data.test_path '.*nowhere\.jsonl'"
    ) as caught:
        load_rows(tmp_path / "nowhere.jsonl", config_key="data.test_path")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, DataError)


def test_missing_prompt_field_names_field_columns_and_config_key(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"prompt field 'prompt' not found") as caught:
        load_rows(files["parquet"])
    message = str(caught.value)
    assert "['question', 'answer', 'level']" in message
    assert "data.prompt_field" in message


def test_conflicting_prompt_columns_are_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "both.jsonl", [{"prompt": "a", "question": "b"}])
    with pytest.raises(ValueError, match=r"both 'question'.*and a 'prompt' column.*data.prompt_field"):
        load_rows(path, prompt_field="question")


@pytest.mark.parametrize(
    ("bad_prompt", "message"),
    [
        ("", "row 1 .*is empty"),
        ("   ", "row 1 .*is empty"),
        (None, r"row 1 \(line 2\) .*has no prompt field"),
    ],
)
def test_bad_prompt_names_the_row(tmp_path: Path, bad_prompt: object, message: str) -> None:
    rows = [{"prompt": "fine", "answer": "1"}, {"prompt": bad_prompt, "answer": "2"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_rows(path)


def test_non_string_prompt_names_the_row(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "ints.parquet", [{"prompt": 1}, {"prompt": 2}])
    with pytest.raises(ValueError, match=r"row 0 .*is a int, not a string"):
        load_rows(path)


def test_required_field_missing_from_a_row_names_field_and_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c"}]
    path = _write_jsonl(tmp_path / "gaps.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 2 .*required field 'answer'"):
        load_rows(path, required_fields=["answer"])
    assert len(load_rows(path)) == 3  # not required: missing values are None
    assert load_rows(path, required_fields=["answer"], limit=2)[1]["answer"] == "2"


def test_required_column_missing_names_field_and_columns(files: dict[str, Path]) -> None:
    with pytest.raises(
        ValueError, match=r"required field 'nums' not found.*\['question', 'answer', 'level'\]"
    ):
        load_rows(files["jsonl"], prompt_field="question", required_fields=["nums"])


# ---------------------------------------------------------------- task_from_rows


def test_task_from_rows_builds_a_task_that_scores(files: dict[str, Path]) -> None:
    rows = load_rows(files["jsonl"], prompt_field="question", required_fields=["answer"])
    task = task_from_rows(rows[:2], rows[2:], ["arithmetic_exact"], "my_arith", 8)
    assert isinstance(task, Task)
    assert (task.name, task.max_new_tokens, len(task.train), len(task.test)) == ("my_arith", 8, 2, 1)
    assert task.reward_fns == [RewardSpec("arithmetic_exact")]
    fns = resolve_reward_specs(task.reward_fns)
    totals, _ = score_completions(fns, [r["prompt"] for r in rows], ["5", "2", "8"], rows)
    assert totals == [1.0, 0.0, 1.0]


def test_task_from_rows_fails_early_on_bad_reward_spec() -> None:
    with pytest.raises(RewardSpecError, match="no_such_module_abc"):
        task_from_rows([{"prompt": "p"}], [], ["no_such_module_abc:fn"], "t", 8)


def test_task_from_rows_validates_rows_and_arguments() -> None:
    with pytest.raises(ValueError, match="no training rows"):
        task_from_rows([], [], ["countdown"], "t", 8)
    with pytest.raises(ValueError, match="test row 0 has no non-empty string 'prompt'"):
        task_from_rows([{"prompt": "p"}], [{"question": "q"}], ["countdown"], "t", 8)
    with pytest.raises(ValueError, match="at least one reward"):
        task_from_rows([{"prompt": "p"}], [], [], "t", 8)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        task_from_rows([{"prompt": "p"}], [], ["countdown"], "t", 0)


def test_task_from_rows_keeps_the_warm_starts_own_rows() -> None:
    demos = [{"prompt": "d", "solution": "x"}]
    task = task_from_rows([{"prompt": "p"}], [], ["countdown"], "t", 8, demonstrations=demos)
    assert task.demonstrations == demos and task.warmstart_rows() == demos
    assert task_from_rows([{"prompt": "p"}], [], ["countdown"], "t", 8).warmstart_rows() == [{"prompt": "p"}]
    with pytest.raises(DataError, match="demonstration row 0 has no non-empty string 'prompt'"):
        task_from_rows([{"prompt": "p"}], [], ["countdown"], "t", 8, demonstrations=[{"solution": "x"}])


# ---------------------------------------------------------------- splits


def test_hold_out_is_seeded_disjoint_and_keeps_the_order() -> None:
    rows = [{"prompt": str(i)} for i in range(20)]
    rest, held = hold_out(rows, 5, seed=0)
    assert len(held) == 5 and len(rest) == 15
    assert sorted(map(id, rest + held)) == sorted(map(id, rows))  # every row once, in one split only
    assert rest == sorted(rest, key=lambda r: int(r["prompt"])) and held == sorted(
        held, key=lambda r: int(r["prompt"])
    )
    assert hold_out(rows, 5, seed=0) == (rest, held)
    assert hold_out(rows, 5, seed=1)[1] != held
    assert held != rows[:5]  # not simply the first rows


def test_hold_out_leaves_rows_to_train_on() -> None:
    with pytest.raises(DataError, match=r"rows.jsonl has 3 rows: too few to hold out 3 .*data.test_path"):
        hold_out([{"prompt": "a"}] * 3, 3, seed=0, label="rows.jsonl")


def test_split_rows_takes_a_seeded_share_and_at_least_one() -> None:
    rows = [{"prompt": str(i)} for i in range(10)]
    picked, rest = split_rows(rows, 0.3, seed=0)
    assert len(picked) == 3 and sorted(picked + rest) == list(range(10))
    assert split_rows(rows, 0.3, seed=0) == (picked, rest) and split_rows(rows, 0.3, seed=5) != (picked, rest)
    assert len(split_rows(rows[:1], 0.1, seed=0)[0]) == 1


def test_demonstration_rows_takes_the_configured_field_as_text() -> None:
    rows = [{"prompt": "a", "target": 7}, {"prompt": "b"}, {"prompt": "c", "target": "x", "solution": "old"}]
    indices, demos = demonstration_rows(rows, "target")
    assert indices == [0, 2]
    assert demos == [
        {"prompt": "a", "target": 7, "solution": "7"},
        {"prompt": "c", "target": "x", "solution": "x"},
    ]
    assert rows[2]["solution"] == "old"  # the rows reward functions read are not changed
    with pytest.raises(
        DataError, match=r"row 0 of rows\.jsonl: the demonstration \(field 'target'\) is a list"
    ):
        demonstration_rows([{"prompt": "a", "target": [1]}], "target", label="rows.jsonl")


# ---------------------------------------------------------------- bad input: garbage is named, never a raw parser error


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert load_rows(path) == [{"prompt": "a"}]


def test_an_unreadable_csv_is_reported_once_not_also_by_the_datasets_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes(b'prompt,answer\n"open,1\nb,2\n')
    with pytest.raises(DataError, match=r"could not read .*rows\.csv' as csv: ParserError"):
        load_rows(path)
    assert "Failed to read file" not in capfd.readouterr().err


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["prompt", "answer"]) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_json_files = (
    st.binary(max_size=120)
    | st.lists(_json_values, max_size=5).map(lambda values: "\n".join(map(json.dumps, values)).encode())
    | st.lists(_json_values, max_size=4).map(lambda values: json.dumps(values).encode())
)
_table_files = st.binary(max_size=120) | st.text(alphabet='prompt,ans"\n\r x1é', max_size=80).map(str.encode)


def _rows_or_named_data_error(path: Path) -> None:
    """The property: rows with a text prompt each, or a DataError that names the file."""
    try:
        rows = load_rows(path)
    except DataError as error:
        assert path.name in str(error)
        return
    assert rows and all(isinstance(row["prompt"], str) and row["prompt"].strip() for row in rows)


_NO_FIXTURE_CHECK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=150, deadline=None, suppress_health_check=_NO_FIXTURE_CHECK)
@given(suffix=st.sampled_from([".jsonl", ".json"]), data=_json_files)
def test_fuzz_json_files_give_rows_or_a_data_error_naming_the_file(
    tmp_path: Path, suffix: str, data: bytes
) -> None:
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data)
    _rows_or_named_data_error(path)


@settings(max_examples=30, deadline=None, suppress_health_check=_NO_FIXTURE_CHECK)
@given(suffix=st.sampled_from([".csv", ".parquet"]), data=_table_files)
def test_fuzz_table_files_give_rows_or_a_data_error_naming_the_file(
    tmp_path: Path, suffix: str, data: bytes
) -> None:
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data)
    _rows_or_named_data_error(path)
