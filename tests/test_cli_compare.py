"""``posttrain compare`` and ``posttrain report``: bad input in one line, and tiny comparisons end to end."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest

from posttrain.algorithms.presets import PRESETS
from posttrain.cli import build_parser, main

ROOT = Path(__file__).parents[1]
TINY = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=20",
    "data.num_train=32",
    "data.num_test=8",
    "eval.num_prompts=4",
    "eval.every=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "optim.steps=2",
    "logging.tensorboard=false",
]


def test_compare_and_report_exist() -> None:
    for command in ("compare", "report"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    held = tmp_path / "held"
    (held / "ppo-s0").mkdir(parents=True)
    (held / "ppo-s0" / "metrics.jsonl").write_text('{"step": 0}\n')
    presets = ", ".join(sorted(PRESETS))
    return {
        "unknown algorithm": (
            ["compare", "--algos", "ppo,a2c"],
            f"--algos: unknown algorithm 'a2c'; registered presets: {presets}",
        ),
        "repeated algorithm": (["compare", "--algos", "ppo,ppo"], "--algos names ppo more than once"),
        "no seeds": (["compare", "--algos", "ppo", "--seeds", "0"], "--seeds must be a whole number >= 1"),
        "no workers": (
            ["compare", "--algos", "ppo", "--workers", "0"],
            "--workers must be a whole number >= 1",
        ),
        "bad threshold": (
            ["compare", "--algos", "ppo", "--threshold", "nan"],
            "--threshold must be a finite",
        ),
        "runs already there": (
            ["compare", "--algos", "ppo", "--seeds", "1", "--out", str(held)],
            "already holds a run (1 of this comparison's 1 do); pass --overwrite",
        ),
        "a setting one algorithm refuses": (
            ["compare", "--algos", "ppo,grpo", "--set", "rollout.group_size=1", "--out", str(tmp_path / "x")],
            "rollout.group_size must be >= 2 for 'grpo'",
        ),
        "not a run": (["report", str(tmp_path)], f"{tmp_path} is not a run folder"),
        "unknown classic arm": (
            ["compare", "--classic", "CartPole-v1", "--algos", "ppo,a2c"],
            "--algos: unknown algo 'a2c'",
        ),
        "unknown environment": (
            ["compare", "--classic", "NoSuchEnv-v0", "--algos", "ppo"],
            "unknown environment 'NoSuchEnv-v0' (--classic)",
        ),
        "unknown classic setting": (
            ["compare", "--classic", "CartPole-v1", "--algos", "ppo", "--set", "optim.steps=2"],
            "--set optim.steps=2: a classic run takes KEY=VALUE with KEY one of",
        ),
        "config with classic": (
            ["compare", "--classic", "CartPole-v1", "--algos", "ppo", "--config", "configs/agent_grpo.yaml"],
            "drop --config",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown algorithm",
        "repeated algorithm",
        "no seeds",
        "no workers",
        "bad threshold",
        "runs already there",
        "a setting one algorithm refuses",
        "not a run",
        "unknown classic arm",
        "unknown environment",
        "unknown classic setting",
        "config with classic",
    ],
)
def test_bad_input_is_one_line_naming_the_flag(case: str, tmp_path: Path, capsys) -> None:
    argv, expected = _bad_inputs(tmp_path)[case]
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert expected in " ".join(line.strip() for line in lines), err
    assert time.perf_counter() - start < 10  # refused before any run starts


def _table(stdout: str) -> str:
    """The printed table: from its title line to its bottom border."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "by algorithm" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return "\n".join(lines[start : end + 1])


def documented_command() -> list[str]:
    """The comparison command the README's "which algorithm?" section shows (docs/compare.md shows
    the same one)."""
    commands = []
    for page in (ROOT / "README.md", ROOT / "docs" / "compare.md"):
        block = re.search(r"```bash\n(posttrain compare .*?)\n```", page.read_text(), re.DOTALL)
        assert block is not None, f"{page.name} shows no posttrain compare command"
        commands.append(shlex.split(block.group(1)))
    assert commands[0] == commands[1], "README.md and docs/compare.md show different commands"
    return commands[0]


@pytest.mark.slow
def test_the_documented_comparison_runs_every_pair_and_report_redraws_it(tmp_path: Path, capsys) -> None:
    """The documented command as written, the runs shrunk by --set and written to a temporary --out."""
    command = documented_command()
    assert command == [
        "posttrain",
        "compare",
        "--algos",
        "ppo,grpo,dapo",
        "--seeds",
        "3",
        "--out",
        "runs/compare-demo",
    ]
    out = tmp_path / "cmp"
    assert main([*command[1:], *[arg for item in TINY for arg in ("--set", item)], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    algorithms, seeds = ["ppo", "grpo", "dapo"], [0, 1, 2]
    for algorithm in algorithms:
        for seed in seeds:
            run = out / f"{algorithm}-s{seed}"
            # the folder `posttrain train` makes, with this pair's algorithm and seed, plus compare.json
            for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "curves.png", "checkpoints"):
                assert (run / name).exists(), run / name
            config = (run / "config.yaml").read_text()
            assert f"algorithm: {algorithm}\n" in config and f"  seed: {seed}\n" in config
            stats = json.loads((run / "compare.json").read_text())
            assert stats["peak_rss_mb"] > 50 and stats["wall_s"] > 0
            assert (out / "logs" / f"{run.name}.log").is_file()
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert rows[-1]["final"] == 1.0 and max(r["step"] for r in rows) == 2
    # the same data order for every algorithm: seed s trains on the same prompts at each step
    for seed in seeds:
        first_steps = [_step_prompts(out / f"{algorithm}-s{seed}", step=1) for algorithm in algorithms]
        assert first_steps[0] == first_steps[1] == first_steps[2]
    assert _step_prompts(out / "ppo-s0", step=1) != _step_prompts(out / "ppo-s1", step=1)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(g["group"] for g in summary["groups"]) == sorted(algorithms)
    assert all(g["seeds"] == 3 and g["peak_rss_mb"] > 50 for g in summary["groups"])
    markdown = (out / "report.md").read_text()
    assert summary["recommendation"] in markdown and summary["recommendation"] in printed
    assert shlex.join(["posttrain", *command[1:]]) in markdown and "| ppo | 3 |" in markdown
    assert (out / "curves.png").stat().st_size > 5000
    table = _table(printed)
    assert all(algorithm in table for algorithm in algorithms) and "peak MiB" in table

    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert _table(capsys.readouterr().out) == table
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["groups"] == summary["groups"] and again["threshold"] == summary["threshold"]


def _step_prompts(run: Path, step: int) -> list[str]:
    lines = (run / "samples.jsonl").read_text().splitlines()
    return sorted(json.loads(line)["prompt"] for line in lines if json.loads(line)["step"] == step)


@pytest.mark.slow
def test_compare_on_a_classic_environment_uses_the_same_harness(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cartpole"
    argv = ["compare", "--classic", "CartPole-v1", "--algos", "ppo,grpo", "--seeds", "1", "--out", str(out)]
    assert main([*argv, "--set", "total_steps=1024", "--set", "group_size=2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "return_mean by arm" in printed and "environment steps to thr." in printed
    for arm in ("ppo", "grpo"):
        stats = json.loads((out / f"{arm}-s0" / "compare.json").read_text())
        assert stats["peak_rss_mb"] > 50  # each run had its own process
    assert (out / "curves.png").stat().st_size > 5000 and (out / "runs.csv").is_file()
    assert "No clear winner" in (out / "report.md").read_text()  # one seed: no spread to judge by
    assert main(argv + ["--set", "total_steps=1024"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
