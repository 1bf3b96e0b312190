"""Summary tables: plain-text rendering, cell formatting, mean ± std over seeds."""

from __future__ import annotations

import math

import numpy as np

from posttrain.report.tables import format_cell, mean_std, render_table, summary_table


def test_render_table_contains_headers_and_values_without_escape_codes() -> None:
    rows = [
        {"algorithm": "grpo", "eval accuracy": 0.8125, "steps": 40},
        {"algorithm": "ppo", "eval accuracy": math.nan},
    ]
    text = render_table(summary_table(rows, ["algorithm", "eval accuracy", "steps"], title="arithmetic"))
    assert "\x1b[" not in text
    assert all(len(line) <= 120 for line in text.splitlines())
    for expected in ("arithmetic", "algorithm", "eval accuracy", "steps", "grpo", "0.8125", "40", "ppo"):
        assert expected in text
    ppo_line = next(line for line in text.splitlines() if "ppo" in line)
    assert ppo_line.count("-") == 2  # NaN and the missing "steps" both show as "-"


def test_numeric_columns_are_right_aligned() -> None:
    table = summary_table([{"name": "a", "value": 1.5}, {"name": "b", "value": None}], ["name", "value"])
    assert [column.justify for column in table.columns] == ["left", "right"]


def test_render_table_respects_width() -> None:
    rows = [{"note": "word " * 60, "x": 1}]
    text = render_table(summary_table(rows, ["note", "x"]), width=50)
    assert max(len(line) for line in text.splitlines()) <= 50


def test_format_cell() -> None:
    assert format_cell(3) == "3"
    assert format_cell(2.0) == "2"
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(np.float32(1234567.0)) == "1.235e+06"
    assert format_cell(None) == "-"
    assert format_cell(float("nan")) == "-"
    assert format_cell(True) == "True"
    assert format_cell("12.5%") == "12.5%"


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"  # sample std, ddof=1
    assert mean_std(np.array([0.5, 0.7]), digits=2) == "0.60 ± 0.14"
    assert mean_std([0.25]) == "0.250"
    assert mean_std([]) == "-"
    assert mean_std([1.0, float("nan")]) == "nan ± nan"
