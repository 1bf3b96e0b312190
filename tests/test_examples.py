"""The scripts in examples/ run exactly as the README shows them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow


def test_custom_env_example_trains_and_prints_a_whole_episode():
    done = subprocess.run(
        [sys.executable, "examples/custom_env.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before RL" in done.stdout and "after RL" in done.stdout
    episode = json.loads(done.stdout[done.stdout.index("{\n") :])
    assert episode["prompt"].startswith("add ")
    assert episode["turns"] and {"action", "observation", "tool", "error"} <= set(episode["turns"][0])


def test_custom_reward_example_trains_with_the_readme_api(tmp_path):
    """examples/custom_reward.py as written (the embedded demo model, 10 steps), run from an empty
    folder so its runs/ lands there."""
    script = ROOT / "examples" / "custom_reward.py"
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before RL" in done.stdout and "after RL" in done.stdout
    assert (tmp_path / "runs" / "custom-reward" / "metrics.jsonl").is_file()
    saved = (tmp_path / "runs" / "custom-reward" / "config.yaml").read_text()
    assert f"fn: {script}:short_and_correct" in saved  # the callable, named so the run can resume
