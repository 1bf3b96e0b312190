"""The README's "scaling out" commands: each one's flags and config load as written (the runs
themselves are the shrunk ones in test_fsdp_cli.py, test_ray_cli.py and rollout/test_vllm.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"


def documented_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "the scaling-out section shows no commands"
    return [shlex.split(line) for line in block.group(1).splitlines()]


def test_the_section_shows_one_command_per_setting() -> None:
    commands = documented_commands()
    assert [c[:2] for c in commands] == [["posttrain", "train"]] * 3
    assert "rollout.engine=vllm" in commands[0]
    assert commands[1][2:4] == ["--nproc", "8"]
    assert "--ray" in commands[2] and "scale.max_policy_lag=1" in commands[2]


@pytest.mark.parametrize("index", [1, 2])
def test_the_command_loads_its_config(index: int) -> None:
    command = documented_commands()[index]
    done = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *command[1:], "--print-config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "algorithm:" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_vllm_command_loads_its_config_where_vllm_is_installed() -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "vllm_venv.sh"), str(VLLM_VENV)], check=True, timeout=2400)
    command = documented_commands()[0]
    done = subprocess.run(
        [str(VLLM_VENV / "bin" / "posttrain"), *command[1:], "--print-config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "engine: vllm" in done.stdout
    # and without vLLM the same command fails at config load, naming the key and the fix
    missing = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *command[1:], "--print-config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "rollout.engine: vllm is not installed" in missing.stderr
