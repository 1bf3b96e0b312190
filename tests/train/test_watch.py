"""Early warnings: each detector on hand-made metric rows and prompts, printing once per run, and
the record in the run folder. End-to-end runs that trigger them are in test_loop.py."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.algorithms.presets import PRESETS
from posttrain.train.config import ConfigError, load_config
from posttrain.train.watch import (
    WARNINGS_FILE,
    ZERO_SPREAD_STEPS,
    LongestPrompt,
    StepWatch,
    WarningLog,
    budget_message,
    check_config,
    constant_reward_terms,
    context_message,
    longest_prompt,
    model_context,
    record_warnings,
    run_warnings,
    uses_group_baseline,
    warn_once,
)


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


# ------------------------------------------------------------------------------ printing once


def test_a_key_is_printed_once_per_run_and_again_in_the_next_run(capsys):
    for _run in range(2):
        with run_warnings():
            assert warn_once("a", "first")
            assert not warn_once("a", "first, again")
            assert warn_once("b", "second")
    assert _warnings(capsys) == ["warning: first", "warning: second"] * 2


def test_outside_a_run_every_warning_prints(capsys):
    warn_once("a", "alone")
    warn_once("a", "alone")
    assert _warnings(capsys) == ["warning: alone", "warning: alone"]


def test_warnings_are_kept_in_the_run_folder_from_before_it_exists(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with run_warnings():
        warn_once("early", "before the folder")
        record_warnings(run_dir, resume=False)
        warn_once("late", "after it")
    assert (run_dir / WARNINGS_FILE).read_text() == "warning: before the folder\nwarning: after it\n"


def test_a_fresh_run_starts_the_record_empty_and_a_resumed_one_adds_without_repeats(tmp_path, capsys):
    log = WarningLog()
    log.record_to(tmp_path, resume=False)
    log.warn_once("a", "old")
    resumed = WarningLog()
    resumed.record_to(tmp_path, resume=True)
    resumed.warn_once("a", "old")
    resumed.warn_once("b", "new")
    assert (tmp_path / WARNINGS_FILE).read_text() == "warning: old\nwarning: new\n"
    WarningLog().record_to(tmp_path, resume=False)
    assert not (tmp_path / WARNINGS_FILE).exists()


# ------------------------------------------------------------------------------ settings


def test_rl_at_temperature_0_warns_naming_the_setting(capsys):
    with run_warnings():
        check_config(load_config(None, ["rollout.temperature=0"]))
        check_config(load_config(None, ["rollout.temperature=0"]))
    (line,) = _warnings(capsys)
    assert "rollout.temperature is 0" in line and "group advantages are all 0" in line
    check_config(load_config(None, ["rollout.temperature=0", "algorithm=ppo", "rollout.group_size=1"]))
    (line,) = _warnings(capsys)
    assert "greedy" in line and "group advantages" not in line  # a critic has no groups
    check_config(load_config(None, ["rollout.temperature=0.7"]))
    assert _warnings(capsys) == []


@pytest.mark.parametrize("value", [".inf", ".nan", "-1"])
def test_a_temperature_that_is_not_a_finite_non_negative_number_fails_at_config_load(value):
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(None, [f"rollout.temperature={value}"])


def test_group_baselines_are_the_estimators_that_take_group_ids():
    group = {name for name, preset in PRESETS.items() if uses_group_baseline(preset)}
    assert {"grpo", "dr_grpo", "dapo", "gspo", "rloo"} <= group
    assert not {"ppo", "reinforce_pp"} & group


# ------------------------------------------------------------------------------ step metrics

FLAT = {"reward_mean": 0.0, "zero_variance_groups": 1.0}
SPREAD = {"reward_mean": 0.3, "zero_variance_groups": 0.75}


def _watch(capsys, rows, *overrides):
    """The warnings StepWatch prints over metric rows for steps 1, 2, ..."""
    watch = StepWatch(load_config(None, ["rollout.prompts_per_step=8", "rollout.group_size=8", *overrides]))
    with run_warnings():
        for step, metrics in enumerate(rows, start=1):
            watch.after_step(step, metrics)
    return _warnings(capsys)


def test_no_spread_for_n_steps_warns_once(capsys):
    n = ZERO_SPREAD_STEPS
    (line,) = _watch(capsys, [FLAT] * (n + 3))
    assert f"no group had any reward spread for {n} steps (steps 1-{n})" in line
    assert "rollout.temperature" in line and "model.path" in line


def test_one_step_with_spread_restarts_the_count(capsys):
    rows = [FLAT] * (ZERO_SPREAD_STEPS - 1) + [SPREAD] + [FLAT] * (ZERO_SPREAD_STEPS - 1)
    assert _watch(capsys, rows) == []


def test_a_run_shorter_than_n_steps_is_judged_whole(capsys):
    (line,) = _watch(capsys, [FLAT] * 3, "optim.steps=3")
    assert "for 3 steps (steps 1-3)" in line


def test_a_critic_run_is_not_warned_about_group_spread(capsys):
    assert _watch(capsys, [FLAT] * 8, "algorithm=ppo") == []


def test_a_reward_function_constant_over_the_first_step_is_named(capsys):
    first = FLAT | {"reward/exact": 0.0, "reward_std/exact": 0.0, "reward/fmt": 0.5, "reward_std/fmt": 0.4}
    later = {"reward/fmt": 1.0, "reward_std/fmt": 0.0}  # a term may saturate later: no warning
    (line,) = _watch(capsys, [first, later])
    assert line.startswith("warning: reward function 'exact' returned 0.0 for all 64 samples at step 1")
    assert "data.reward_fns" in line


def test_constant_terms_tolerate_the_last_bit_of_a_mean():
    metrics = {
        "reward/a": 0.1,
        "reward_std/a": 1.4e-17,  # the std of [0.1, 0.1, 0.1] computed in floats
        "reward/b": 0.1,
        "reward_std/b": 0.01,
        "reward_std/no_mean": 0.0,
    }
    assert constant_reward_terms(metrics) == [("a", 0.1)]


# ------------------------------------------------------------------------------ context


def test_the_longest_prompt_is_found_with_the_models_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = {"train": [{"prompt": "1+1="}, {"question": "no prompt"}], "test": [{"prompt": "12345+678="}]}
    longest = longest_prompt(tokenizer, splits)
    assert longest == LongestPrompt("test", "12345+678=", 10)  # digits are single tokens
    assert model_context(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == 128
    assert model_context(object()) is None


def test_a_completion_that_overflows_the_context_warns_with_the_largest_budget_that_fits():
    longest = LongestPrompt("train", "x" * 80, 100)
    assert context_message(longest, 28, 128) is None
    message = context_message(longest, 64, 128)
    assert f"the longest prompt (train prompt '{'x' * 40}...', 100 tokens)" in message
    assert "data.max_new_tokens (64) is 164 tokens" in message
    assert "lower data.max_new_tokens to 28" in message


def test_a_prompt_that_alone_overflows_the_context_is_an_error():
    with pytest.raises(ConfigError, match="the test prompt 'long' is 128 tokens.*context is 128 positions"):
        context_message(LongestPrompt("test", "long", 128), 1, 128)


def test_a_context_budget_beyond_the_model_warns():
    assert budget_message(128, 128) is None
    assert "set env.context_budget to 128 or less" in budget_message(160, 128)
