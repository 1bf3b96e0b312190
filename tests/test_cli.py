import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.cli import (
    USER_ERRORS,
    build_parser,
    format_error,
    is_user_error,
    main,
    run_command,
    user_error_classes,
)
from posttrain.train.config import load_config


def test_print_config_shows_resolved_values(capsys):
    assert main(["train", "--print-config", "--set", "algorithm=ppo", "--set", "rollout.group_size=2"]) == 0
    out = capsys.readouterr().out
    assert "algorithm: ppo" in out and "group_size: 2" in out


def test_bad_config_exits_2_naming_the_key(capsys):
    assert main(["train", "--set", "rollout.group_sise=2"]) == 2
    assert "rollout.group_sise" in capsys.readouterr().err


def test_subcommands_exist():
    parser = build_parser()
    for command in ("train", "eval", "classic"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.slow
def test_eval_accepts_a_run_a_checkpoint_or_a_model_and_uses_the_runs_task(tmp_path, capsys):
    rewards = tmp_path / "length_reward.py"  # a graded reward, so the mean tells models and prompts apart
    rewards.write_text("def length(prompt, completion, **row):\n    return len(completion) / 7\n")
    tiny = [
        "model.tiny_hidden_size=32",
        "model.tiny_layers=1",
        "warmstart.steps=20",
        "data.num_train=32",
        "data.num_test=8",
        f"data.reward_fns=[{{fn: '{rewards}:length'}}]",
        "eval.num_prompts=8",
        "eval.every=0",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "optim.steps=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        "run.seed=3",  # not the default: eval must read the run's config to find its test split
        f"run.output_dir={tmp_path}",
        "run.name=tiny",
    ]
    assert main(["train", *[arg for item in tiny for arg in ("--set", item)]]) == 0
    run = tmp_path / "tiny"
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] == 1.0
    capsys.readouterr()
    checkpoint = run / "checkpoints" / "step_000001"
    # the run's config names a reward file: evaluating the folder imports it only when trusted
    assert main(["eval", "--model", str(run), "--num-prompts", "8"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"data.reward_fns[0].fn '{rewards}:length' (file {rewards})" in err and "--trust-run-code" in err
    for model in (run, checkpoint, checkpoint / "policy"):
        assert main(["eval", "--model", str(model), "--num-prompts", "8", "--trust-run-code"]) == 0
        out = capsys.readouterr().out
        assert f"model: {checkpoint / 'policy'}  (task settings from {run / 'config.yaml'})" in out
        assert f"mean reward {final['eval_reward']:.3f}  (8 prompts)" in out
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ clean errors


def _model_folder_without(tmp_path: Path, source: Path, name: str, *, drop: tuple[str, ...]) -> Path:
    """A copy of ``source`` with the files whose names start with one of ``drop`` left out."""
    folder = tmp_path / name
    folder.mkdir()
    for file in source.iterdir():
        if not file.name.startswith(drop):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture
def bad_inputs(tmp_path: Path, tiny_model_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, a string its error must contain): one case per kind of user error."""
    (tmp_path / "empty.jsonl").write_text("")
    rows = [json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    no_tokenizer = _model_folder_without(
        tmp_path, tiny_model_dir, "no_tokenizer", drop=("tokenizer", "special")
    )
    no_config = _model_folder_without(tmp_path, tiny_model_dir, "no_config", drop=("config.json",))
    out = f"run.output_dir={tmp_path / 'runs'}"
    reward = "data.reward_fns=[{fn: arithmetic_exact}]"
    return {
        "missing config": (["train", "--config", str(tmp_path / "nope.yaml")], "config file not found"),
        "misspelt key": (["train", "--set", "optim.lrr=1"], "optim.lrr: unknown key"),
        "missing data": (
            ["train", "--set", out, "--set", f"data.path={tmp_path / 'none.jsonl'}", "--set", reward],
            "none.jsonl",
        ),
        "empty data": (
            ["train", "--set", out, "--set", f"data.path={tmp_path / 'empty.jsonl'}", "--set", reward],
            "empty.jsonl",
        ),
        "unknown reward": (
            [
                "train",
                "--set",
                out,
                "--set",
                f"data.path={tmp_path / 'rows.jsonl'}",
                "--set",
                "data.reward_fns=[{fn: no_such_reward}]",
            ],
            "no_such_reward",
        ),
        "missing model": (
            ["train", "--set", f"model.path={tmp_path / 'no_model'}"],
            f"model.path: model folder {str(tmp_path / 'no_model')!r} does not exist",
        ),
        "hub-like name": (["train", "--set", "model.path=some-org/some-model"], "set model.hub: true"),
        "no tokenizer": (
            ["train", "--set", f"model.path={no_tokenizer}"],
            f"tokenizer.save_pretrained({str(no_tokenizer)!r})",
        ),
        "no config.json": (["train", "--set", f"model.path={no_config}"], "has no config.json"),
        "missing critic": (
            ["train", "--set", f"model.critic_path={tmp_path / 'no_critic'}"],
            "model.critic_path: model folder",
        ),
    }


CASES = [
    "missing config",
    "misspelt key",
    "missing data",
    "empty data",
    "unknown reward",
    "missing model",
    "hub-like name",
    "no tokenizer",
    "no config.json",
    "missing critic",
]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_print_one_or_two_lines_and_exit_2(case: str, bad_inputs, capsys) -> None:
    argv, expected = bad_inputs[case]
    start = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and 1 <= len(lines) <= 2, err
    assert expected in " ".join(line.strip() for line in lines), err
    assert "Traceback" not in err
    assert elapsed < 5, f"{case} took {elapsed:.1f} s"  # no warm-start, no Hub requests


@pytest.mark.parametrize("case", ["misspelt key", "missing data", "missing model", "no tokenizer"])
def test_debug_shows_the_traceback_too(case: str, bad_inputs, capsys) -> None:
    argv, expected = bad_inputs[case]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "error: " in err


def test_debug_environment_variable(monkeypatch, capsys) -> None:
    monkeypatch.setenv("POSTTRAIN_DEBUG", "1")
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("POSTTRAIN_DEBUG", "0")
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_installed_command_exits_2_with_a_short_message_and_debug_adds_the_traceback() -> None:
    command = [str(Path(sys.executable).parent / "posttrain")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("POSTTRAIN_DEBUG", None)
    plain = subprocess.run(
        [*command, "train", "--set", "optim.lrr=1"], capture_output=True, text=True, env=env, timeout=120
    )
    assert plain.returncode == 2
    lines = plain.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: invalid config: optim.lrr: unknown key")
    debug = subprocess.run(
        [*command, "--debug", "train", "--set", "optim.lrr=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr


def _raise(error: Exception) -> int:
    raise error


def test_a_bug_keeps_its_traceback() -> None:
    # a ValueError from outside posttrain's input checks (here json's) is a bug, not a user error
    args = build_parser().parse_args(["train"])
    args.func = lambda _: json.loads("{")
    with pytest.raises(json.JSONDecodeError):
        run_command(args)
    args.func = lambda _: int("seven")  # a ValueError not raised by a `raise` of posttrain's
    with pytest.raises(ValueError, match="seven"):
        run_command(args)


def test_user_error_classes_resolve() -> None:
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        assert issubclass(getattr(importlib.import_module(module), name), Exception), spec
    assert len(user_error_classes()) == len(USER_ERRORS)


def test_only_posttrains_own_raises_are_user_errors(tmp_path: Path) -> None:
    from posttrain.data.datasets import load_rows

    (tmp_path / "rows.jsonl").write_text('{"question": "1+1="}\n')
    with pytest.raises(ValueError) as caught:
        load_rows(tmp_path / "rows.jsonl")
    assert is_user_error(caught.value)
    with pytest.raises(ValueError) as caught:
        # torch's own `raise ValueError`: a bug of whoever called it, not the user's
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    assert not is_user_error(caught.value)


def test_long_messages_keep_every_word_on_two_lines() -> None:
    message = "invalid config:\n  " + "\n  ".join(
        f"key{i}: value {i} is wrong, use {i + 1}" for i in range(8)
    )
    text = format_error(ValueError(message))
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: invalid config: key0:") and len(lines[0]) <= 100
    assert " ".join(text.split()) == "error: invalid config: " + "; ".join(
        f"key{i}: value {i} is wrong, use {i + 1}" for i in range(8)
    )
    assert format_error(ValueError("short")) == "error: short"


# ------------------------------------------------------------------------------ --print-config


def test_print_config_comments_every_described_key_and_reads_back(tmp_path: Path, capsys) -> None:
    overrides = [
        "algorithm=ppo",
        "rollout.group_size=2",
        "model.lora={r: 4}",
        "data.task_options={ops: '+-'}",
        "env.name=key_chain",
        "env.guard={rules: [{name: no_secrets, pattern: 'secret', tools: [read_*]}]}",
        "run.name='a: tricky # name'",  # the YAML must quote it
    ]
    assert main(["train", "--print-config", *[a for item in overrides for a in ("--set", item)]]) == 0
    out = capsys.readouterr().out
    assert "  # completions per prompt\n  group_size: 2\n" in out
    assert "# Multi-turn agent tasks: the environment and the limits of its episodes.\nenv:\n" in out
    assert "    # regular expression searched" not in out  # list items are plain YAML
    assert "  # true: path / critic_path may name a Hugging Face Hub model" in out
    assert "    # deny: the call never runs" not in out
    assert "  guard:\n    # use the built-in rules" in out  # nested sections are commented too
    saved = tmp_path / "printed.yaml"
    saved.write_text(out)
    assert load_config(saved).model_dump() == load_config(None, overrides).model_dump()


# ------------------------------------------------------------------------------ eval on a bare model


def test_eval_on_a_bare_model_folder_asks_what_to_evaluate_on(tiny_model_dir: Path, capsys) -> None:
    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: eval --model {tiny_model_dir}: this folder has no run config" in err
    assert "--set data.task=NAME / --set data.path=FILE" in " ".join(err.split())
    argv = ["eval", "--model", str(tiny_model_dir), "--set", "data.task=arithmetic", "--num-prompts", "2"]
    assert main(argv) == 0
    assert "arithmetic test: accuracy" in capsys.readouterr().out


# ------------------------------------------------------------------------------ interruptions


def test_an_interrupted_run_prints_its_message_and_exits_128_plus_the_signal(capsys) -> None:
    import signal

    from posttrain.train.interrupt import TrainingInterrupted

    stopped = TrainingInterrupted(signal.SIGTERM, at_once=False, step=3)
    stopped.describe(
        Path("runs/x"), Path("runs/x/checkpoints/step_000003"), "posttrain train --resume runs/x", True
    )
    args = build_parser().parse_args(["train"])
    args.func = lambda _: _raise_base(stopped)
    assert run_command(args) == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopped after step 3, saved runs/x/checkpoints/step_000003" in err
    assert "resume with: posttrain train --resume runs/x" in err and "Traceback" not in err
    args.func = lambda _: _raise_base(KeyboardInterrupt())  # a Ctrl-C outside a training run
    assert run_command(args) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def _raise_base(error: BaseException) -> int:
    raise error


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--num-prompts", "0", "expected an integer >= 1, got 0"),
        ("--num-prompts", "-5", "expected an integer >= 1, got -5"),
        ("--num-prompts", "ten", "expected an integer >= 1, got 'ten'"),
        ("--temperature", "inf", "expected a finite number >= 0, got inf"),
        ("--temperature", "-1", "expected a finite number >= 0, got -1"),
    ],
)
def test_eval_refuses_nonsense_counts_and_temperatures(capsys, flag, value, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "somewhere", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
