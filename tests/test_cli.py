import json

import pytest

from posttrain.cli import build_parser, main


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
    for model in (run, checkpoint, checkpoint / "policy"):
        assert main(["eval", "--model", str(model), "--num-prompts", "8"]) == 0
        out = capsys.readouterr().out
        assert f"model: {checkpoint / 'policy'}  (task settings from {run / 'config.yaml'})" in out
        assert f"mean reward {final['eval_reward']:.3f}  (8 prompts)" in out
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
