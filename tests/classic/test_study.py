import csv
from pathlib import Path

import pytest

from posttrain.classic.study import binned_curve, expand_arms, parse_arm, run_study


def test_parse_arm_modifiers_and_discount() -> None:
    assert parse_arm("ppo") == ("ppo", {})
    algo, overrides = parse_arm("grpo:togo:random@0.9")
    assert algo == "grpo"
    assert overrides == {"return_mode": "to_go", "same_start": False, "gamma": 0.9, "episode_gamma": 0.9}
    with pytest.raises(ValueError):
        parse_arm("a2c")
    with pytest.raises(ValueError):
        parse_arm("grpo:bogus")


def test_expand_arms_discount_sweep() -> None:
    assert expand_arms(["ppo", "rloo@0.5"], [0.9, 1.0]) == ["ppo@0.9", "ppo@1", "rloo@0.5", "rloo@0.5"]
    assert expand_arms(["ppo"], None) == ["ppo"]


def test_binned_curve_carries_forward() -> None:
    assert binned_curve([(1, 2.0), (2, 4.0), (9, 10.0)], steps=10, bins=5) == [2.0, 4.0, 4.0, 4.0, 10.0]


def test_run_study_writes_outputs(tmp_path: Path) -> None:
    result = run_study("CartPole-v1", ["ppo", "grpo"], 2, 1024, tmp_path, progress=False, group_size=2)
    assert [(r.arm, r.seed) for r in result.runs] == [("ppo", 0), ("ppo", 1), ("grpo", 0), ("grpo", 1)]
    with result.runs_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(int(r["steps"]) >= 1024 for r in rows)
    assert result.plot_png.stat().st_size > 1000
    assert "| ppo | 2 |" in result.table_md.read_text()
    with pytest.raises(TypeError):
        run_study("CartPole-v1", ["ppo"], 1, 10, tmp_path, progress=False, not_an_option=1)
