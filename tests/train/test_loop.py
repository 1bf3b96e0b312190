"""End-to-end runs of the trainer on a tiny locally built model (2 steps each)."""

import json
import math
import shutil
import time

import pytest
import torch

from posttrain.algorithms.presets import PRESETS
from posttrain.rewards.functions import RewardFunctionError
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.config import ConfigError, load_config
from posttrain.train.loop import train
from posttrain.train.watch import WARNINGS_FILE, ZERO_SPREAD_STEPS

pytestmark = pytest.mark.slow

TINY = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=2",
    "warmstart.steps=5",
    "warmstart.batch_size=16",
    "data.num_train=64",
    "data.num_test=8",
    "eval.num_prompts=8",
    "eval.every=0",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "optim.steps=2",
    "optim.micro_batch_size=8",
    "logging.tensorboard=false",
    "logging.progress=false",
]

VOLATILE = ("time/", "tokens_per_s")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("runs")


def _config(out_dir, name, *extra):
    return load_config(None, [*TINY, f"run.output_dir={out_dir}", f"run.name={name}", *extra])


def _stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.mark.parametrize("algorithm", sorted(PRESETS))
def test_every_preset_runs_two_steps_end_to_end(out_dir, algorithm, request):
    extra = []
    if algorithm == "distill":  # a teacher, and a student of its tokenizer (conftest's tiny model)
        model = request.getfixturevalue("tiny_model_dir")
        extra = [f"model.path={model}", f'distill.teachers=[{{name: tiny, path: "{model}"}}]']
    result = train(_config(out_dir, algorithm, f"algorithm={algorithm}", *extra))
    steps = [row for row in result.history if "reward_mean" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    if PRESETS[algorithm].uses_critic:
        assert "value_loss" in steps[0] and "explained_variance" in steps[0]
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "samples.jsonl").is_file()
    assert result.plot_path is not None and result.plot_path.stat().st_size > 1000
    assert (result.checkpoint / "policy" / "config.json").is_file()
    assert "after RL" in result.table


def test_lora_run_saves_a_merged_model_loadable_by_transformers_alone(out_dir):
    from transformers import AutoModelForCausalLM

    result = train(_config(out_dir, "lora", "algorithm=grpo", "model.lora={r: 4, alpha: 8}"))
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint / "policy")
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resumed_run_matches_an_uninterrupted_one(out_dir, algorithm):
    """A run that died after its step-2 checkpoint resumes to the uninterrupted run's steps 3-4,
    the learning-rate decay (which spans all 4 steps) included."""

    def config(name):
        return _config(out_dir, name, f"algorithm={algorithm}", "optim.steps=4", "logging.checkpoint_every=2")

    full = train(config(f"full-{algorithm}"))
    cut = train(config(f"cut-{algorithm}"))
    shutil.rmtree(cut.checkpoint)  # lose the step-4 checkpoint, as if the run had died before it
    assert latest_checkpoint(cut.run_dir).name == "step_000002"
    resumed = train(config(f"cut-{algorithm}"), resume=True)

    def steps(result, wanted):
        return [_stable(r) for r in result.history if r["step"] in wanted and "reward_mean" in r]

    assert steps(resumed, {3, 4}) == steps(full, {3, 4})
    assert resumed.final_eval == full.final_eval


def test_resuming_a_finished_run_changes_nothing(out_dir):
    done = train(_config(out_dir, "finished", "algorithm=grpo"))
    metrics = (done.run_dir / "metrics.jsonl").read_text()
    again = train(_config(out_dir, "finished", "algorithm=grpo"), resume=True)
    assert (done.run_dir / "metrics.jsonl").read_text() == metrics  # no second final-eval line
    assert again.final_eval == done.final_eval and again.checkpoint == done.checkpoint


def test_resume_without_checkpoint_is_a_clear_error(out_dir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_config(out_dir, "never-ran"), resume=True)


def test_user_dataset_and_reward_function_by_file_path(out_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{i}+1=", "target": str(i + 1)}) for i in range(12)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def exact(prompt, completion, **row):\n    return float(completion.strip() == row['target'])\n"
    )
    config = _config(
        out_dir,
        "user-data",
        f"data.path={data}",
        "data.prompt_field=question",
        "data.max_new_tokens=4",
        f"data.reward_fns=[{{fn: '{rewards}:exact'}}]",
        "model.path=null",
    )
    result = train(config)
    assert any(row.get("reward/exact") is not None for row in result.history)


def test_a_reward_function_that_raises_names_itself(out_dir, tmp_path):
    rewards = tmp_path / "bad_rewards.py"
    rewards.write_text("def broken(prompt, completion, **row):\n    raise KeyError('oops')\n")
    config = _config(out_dir, "bad-reward", f"data.reward_fns=[{{fn: '{rewards}:broken'}}]")
    with pytest.raises(RewardFunctionError, match="broken"):
        train(config)


def test_a_hanging_reward_function_stops_the_run_within_data_reward_timeout_s(out_dir, tmp_path):
    rewards = tmp_path / "slow_rewards.py"
    rewards.write_text(
        "import time\n\ndef slow(prompt, completion, **row):\n    time.sleep(60)\n    return 0.0\n"
    )
    config = _config(
        out_dir, "slow-reward", f"data.reward_fns=[{{fn: '{rewards}:slow'}}]", "data.reward_timeout_s=0.5"
    )
    start = time.perf_counter()
    with pytest.raises(RewardFunctionError, match=r"'slow' did not return within 0.5 s on sample 0"):
        train(config)
    assert time.perf_counter() - start < 50


def test_a_code_task_scored_by_hidden_tests_in_the_sandbox(out_dir, tmp_path):
    """python_tests end to end: completions run with the row's hidden asserts in the sandbox; the
    warm-started model writes the functions, so some pass (reward > 0) and the trainer carries on."""
    rows = [
        {
            "prompt": f"def f(x): increment (case {k})\n",
            "solution": "def f(x): return x + 1",
            "tests": f"assert f({k}) == {k + 1}\nassert f(-{k}) == {1 - k}",
        }
        for k in range(1, 10)
    ]
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    config = _config(
        out_dir,
        "code-task",
        f"data.path={data}",
        "data.max_new_tokens=16",
        "data.reward_fns=[{fn: python_tests}]",
        "warmstart.steps=150",
        "warmstart.lr=0.003",
        "data.num_train=9",
        "data.num_test=4",
        "eval.num_prompts=4",
        "rollout.prompts_per_step=3",
        "rollout.group_size=2",
    )
    result = train(config)
    steps = [row for row in result.history if "reward/python_tests" in row]
    assert len(steps) == 2
    assert max(row["reward/python_tests"] for row in steps) > 0


# ------------------------------------------------------------------------------ early warnings


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


def _user_task(tmp_path, prompts, reward_body):
    """Overrides for a JSONL of ``prompts`` scored by ``reward_body`` (the function ``score``)."""
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "target": "0"}) for p in prompts))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(f"def score(prompt, completion, **row):\n    return {reward_body}\n")
    return [f"data.path={data}", "data.max_new_tokens=4", f"data.reward_fns=[{{fn: '{rewards}:score'}}]"]


SUMS = [f"{i}+1=" for i in range(12)]


def test_a_healthy_run_prints_no_warning(out_dir, tmp_path, tiny_model_dir, capsys):
    task = _user_task(tmp_path, SUMS, "float(sum(map(ord, completion)) % 2)")
    result = train(_config(out_dir, "healthy", *task, f"model.path={tiny_model_dir}"))
    assert _warnings(capsys) == []
    assert not (result.run_dir / WARNINGS_FILE).exists()


def test_rl_at_temperature_0_is_warned_once_and_kept_in_the_run_folder(out_dir, capsys):
    result = train(_config(out_dir, "greedy", "rollout.temperature=0"))
    greedy = [line for line in _warnings(capsys) if "rollout.temperature is 0" in line]
    assert len(greedy) == 1
    assert greedy[0] in (result.run_dir / WARNINGS_FILE).read_text().splitlines()


def test_a_constant_reward_function_and_steps_without_spread_are_warned_once(
    out_dir, tmp_path, tiny_model_dir, capsys
):
    task = _user_task(tmp_path, SUMS, "0.0")
    steps = ZERO_SPREAD_STEPS + 2
    result = train(_config(out_dir, "flat", *task, f"model.path={tiny_model_dir}", f"optim.steps={steps}"))
    constant, flat = _warnings(capsys)
    assert constant.startswith("warning: reward function 'score' returned 0.0 for all 16 samples at step 1: ")
    n = ZERO_SPREAD_STEPS
    assert flat.startswith(f"warning: no group had any reward spread for {n} steps (steps 1-{n}): ")
    assert (result.run_dir / WARNINGS_FILE).read_text().splitlines() == [constant, flat]
    assert all(row["reward_std/score"] == 0.0 for row in result.history if "reward_std/score" in row)


def test_prompts_longer_than_the_model_context_warn_or_fail(out_dir, tmp_path, tiny_model_dir, capsys):
    long_prompt = "1" * 100 + "="  # digits are single tokens: 101 of the model's 128 positions
    task = _user_task(tmp_path, [*SUMS, long_prompt], "0.5")
    overrides = [*task, f"model.path={tiny_model_dir}", "optim.steps=1"]
    train(_config(out_dir, "long", *overrides, "data.max_new_tokens=40"))
    (line,) = [line for line in _warnings(capsys) if "context" in line]
    assert "prompt '1111" in line and "data.max_new_tokens (40) is 141 tokens" in line
    assert "lower data.max_new_tokens to 27" in line

    too_long = _user_task(tmp_path, [*SUMS, "1" * 130 + "="], "0.5")
    with pytest.raises(ConfigError, match="prompt '1111.* is 131 tokens.*no room to answer"):
        train(_config(out_dir, "too-long", *too_long, f"model.path={tiny_model_dir}"))
