import pytest
import yaml

from posttrain.train.config import ConfigError, TrainConfig, load_config, parse_overrides


def test_defaults_validate_and_resolve_the_preset():
    config = TrainConfig()
    preset = config.preset()
    assert preset.name == "grpo" and preset.advantage == "grpo"


def test_set_overrides_are_parsed_as_yaml_and_nested():
    tree = parse_overrides(["algorithm=ppo", "rollout.group_size=8", "algo.loss_kwargs={clip_high: 0.3}"])
    assert tree == {
        "algorithm": "ppo",
        "rollout": {"group_size": 8},
        "algo": {"loss_kwargs": {"clip_high": 0.3}},
    }
    config = load_config(None, ["algorithm=ppo", "rollout.group_size=8", "algo.loss_kwargs={clip_high: 0.3}"])
    assert config.rollout.group_size == 8
    assert config.preset().loss_kwargs == {"clip_low": 0.2, "clip_high": 0.3}


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: dapo\nrollout:\n  group_size: 4\n  temperature: 0.7\n")
    config = load_config(path, ["rollout.group_size=6"])
    assert (config.algorithm, config.rollout.group_size, config.rollout.temperature) == ("dapo", 6, 0.7)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algorithm=grpo2"], "unknown algorithm 'grpo2'; allowed: .*'gspo'"),
        (["rollout.group_sise=4"], r"rollout\.group_sise: unknown key"),
        (["rollout.temperature=-1"], r"rollout\.temperature: .*greater than or equal to 0"),
        (["algo.policy_loss=ppo"], r"algo\.policy_loss: unknown policy loss 'ppo'; allowed: .*ppo_clip"),
        (["algo.aggregation=mean"], r"algo\.aggregation: unknown aggregation 'mean'"),
        (["rollout.group_size=1"], r"rollout\.group_size must be >= 2 for 'grpo'"),
        (["data.task=null"], r"set data\.task .* or data\.path"),
        (
            ["optim.num_mini_batches=1000", "rollout.prompts_per_step=2", "rollout.group_size=2"],
            "num_mini_batches",
        ),
        (["algo.kl_placement=everywhere"], r"algo\.kl_placement"),
        (["algorithm=ppo", "algo.kl_importance_ratio=true"], r"also set algo\.kl_placement=loss"),
        (
            ["algorithm=ppo", "optim.steps=5", "optim.critic_warmup_steps=5"],
            r"optim\.critic_warmup_steps \(5\) must be below optim\.steps \(5\)",
        ),
        (["optim.lr_schedule=step"], r"optim\.lr_schedule: .*'constant', 'linear' or 'cosine'"),
        (
            ["rollout.batch_size=30", "rollout.group_size=8"],
            r"rollout\.batch_size \(30\) must be a multiple of rollout\.group_size \(8\).*use 24 or 32",
        ),
        (["rollout.batch_size=4", "rollout.group_size=8"], r"use 8, or change group_size"),
        (
            ["rollout.batch_size=64", "rollout.group_size=8", "rollout.prompts_per_step=4"],
            r"rollout\.prompts_per_step \(4\) disagrees with rollout\.batch_size",
        ),
    ],
)
def test_bad_configs_fail_before_any_work_naming_key_and_allowed_values(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_ppo_allows_a_single_sample_per_prompt():
    assert load_config(None, ["algorithm=ppo", "rollout.group_size=1"]).rollout.group_size == 1


def test_missing_config_file_and_malformed_set(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["rollout.group_size"])


def test_batch_size_sets_prompts_per_step_and_survives_a_round_trip(tmp_path):
    config = load_config(None, ["rollout.batch_size=48", "rollout.group_size=4"])
    assert (config.rollout.prompts_per_step, config.rollout.batch_size) == (12, 48)
    path = tmp_path / "config.yaml"  # what a run writes and --resume reads back
    path.write_text(yaml.safe_dump(config.model_dump()))
    assert load_config(path).rollout.prompts_per_step == 12
    assert load_config(None, ["rollout.prompts_per_step=5"]).rollout.batch_size is None


def test_env_settings_on_a_single_turn_task_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"env.context_budget is set, but the task 'arithmetic' is single-turn"
    ):
        load_config(None, ["env.context_budget=64"])


def test_an_agent_task_validates_its_environment_at_load() -> None:
    cfg = load_config(None, ["data.task=key_chain", "env.context_budget=64"])
    assert cfg.uses_env() and cfg.env.context_budget == 64
    with pytest.raises(ConfigError, match=r"env.options: 'key_chain' does not accept \['stepreward'\]"):
        load_config(None, ["data.task=key_chain", "env.options={stepreward: 0.1}"])
    with pytest.raises(ConfigError, match=r"env.name: unknown environment 'maze'"):
        load_config(None, ["env.name=maze"])
    with pytest.raises(ConfigError, match="env.compaction"):
        load_config(None, ["data.task=key_chain", "env.compaction=summarise"])
