"""The distillation demo as docs/distill.md (and the README) show it, shrunk by --set flags."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow

SHRINK = [
    "data.num_train=16",
    "data.num_test=4",
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=40",
    "warmstart.batch_size=8",
    "eval.num_prompts=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
]


def documented_command() -> list[str]:
    """The demo's command line as the README writes it (docs/distill.md writes the same)."""
    commands = []
    for page in (ROOT / "README.md", ROOT / "docs" / "distill.md"):
        lines = page.read_text().splitlines()
        line = next(
            line.strip() for line in lines if line.strip().startswith("python benchmarks/distill_demo.py")
        )
        commands.append(shlex.split(line))
    assert commands[0] == commands[1], "README.md and docs/distill.md show different demo commands"
    return commands[0]


def test_the_distillation_demo_runs_as_documented_and_reports_every_model(tmp_path):
    command = documented_command()
    assert command[:2] == ["python", "benchmarks/distill_demo.py"]
    command = [sys.executable, *command[1:], "--out", str(tmp_path), "--steps", "2", "--expert-steps", "1"]
    command += ["--eval-every", "1", "--coef", "0.5", *[arg for item in SHRINK for arg in ("--set", item)]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["experts"]) == {"arithmetic", "countdown"}
    assert set(results["before"]) == {"arithmetic", "countdown"}
    for kind in ("distill", "rl", "rl-distill"):
        assert [point["step"] for point in results["curves"][kind]] == [0, 1, 2]
        assert results["curves"][kind][-1]["tokens"] > 0
    table = (tmp_path / "table.md").read_text()
    for label in (
        "expert arithmetic",
        "expert countdown",
        "student before",
        "distillation from both experts",
    ):
        assert label in table
    assert "GRPO on the task rewards" in table and "GRPO + 0.5 x the experts' signal" in table
    assert "the experts' level" in table
    metrics = [
        json.loads(line) for line in (tmp_path / "student-distill" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("distill/reverse_kl/countdown" in row for row in metrics)
