import csv
import json
from pathlib import Path

import pytest

from posttrain.classic.study import expand_arms, parse_arm, parse_settings, run_study


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


def test_parse_settings_reads_yaml_values_and_names_unknown_keys() -> None:
    assert parse_settings(["total_steps=2048", "lr=3e-4", "same_start=false"]) == {
        "total_steps": 2048,
        "lr": 3e-4,
        "same_start": False,
    }
    with pytest.raises(ValueError, match="--set grup_size=2: a classic run takes KEY=VALUE"):
        parse_settings(["grup_size=2"])


def test_run_study_writes_outputs(tmp_path: Path) -> None:
    result = run_study("CartPole-v1", ["ppo", "grpo"], 2, 1024, tmp_path, progress=False, group_size=2)
    assert [(r.arm, r.seed) for r in result.runs] == [("ppo", 0), ("ppo", 1), ("grpo", 0), ("grpo", 1)]
    with result.runs_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(int(r["steps"]) >= 1024 for r in rows)
    assert result.plot_png.stat().st_size > 1000
    assert "| ppo | 2 |" in result.table_md.read_text()
    # every run is a run folder the comparison read: its final return is the run's own
    summary = json.loads(result.comparison.summary_json.read_text())
    finals = {g["group"]: g["finals"] for g in summary["groups"]}
    assert finals["ppo"] == pytest.approx([r.final_return for r in result.runs if r.arm == "ppo"])
    assert (tmp_path / "grpo-s1" / "metrics.jsonl").is_file()
    with pytest.raises(TypeError):
        run_study("CartPole-v1", ["ppo"], 1, 10, tmp_path, progress=False, not_an_option=1)
