import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.train.config import (
    ConfigError,
    GuardConfig,
    GuardRuleConfig,
    TrainConfig,
    load_config,
    parse_overrides,
)


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


def test_guard_settings_are_validated_at_load(tmp_path) -> None:
    agent = ["data.task=key_chain"]
    cfg = load_config(None, [*agent, "env.guard={penalty: 0.5, decoy: empty}"])
    guard = cfg.env.guard.build()
    assert (guard.penalty, guard.decoy, guard.enforce, len(guard.rules)) == (0.5, "empty", True, 5)
    own = load_config(None, [*agent, "env.guard={default_rules: false, rules: [{name: r, pattern: 'x+'}]}"])
    assert [rule.name for rule in own.env.guard.build().rules] == ["r"]
    judge_file = tmp_path / "judge.py"
    judge_file.write_text("def judge(query):\n    return False, 'no'\n")
    judged = load_config(None, [*agent, f"env.guard={{judge: {{kind: callable, fn: '{judge_file}:judge'}}}}"])
    assert judged.env.guard.build().judge.__name__ == "judge"
    cases = [
        (
            "env.guard={rules: [{name: r, pattern: '('}]}",
            r"env\.guard\.rules\.0\.pattern: '\(' is not a regular",
        ),
        ("env.guard={default_rules: false}", "env.guard has no rules"),
        ("env.guard={decoy: nothing}", "env.guard.decoy"),
        ("env.guard={decoy: text}", "decoy_text"),
        ("env.guard={penalty: -1}", "env.guard.penalty"),
        ("env.guard={penalty: .inf}", "env.guard.penalty"),
        ("env.guard={enforse: false}", "env.guard.enforse"),
        (
            "env.guard={judge: {kind: http, url: 'http://127.0.0.1:9/v1'}}",
            "env.guard.judge.model is required",
        ),
        ("env.guard={judge: {kind: hf, model_path: m, url: u}}", "env.guard.judge.url is not used"),
        ("env.guard={judge: {kind: callable, fn: 'no_such_module_xyz:judge'}}", "no_such_module_xyz"),
        ("env.guard={judge: {kind: callable, fn: 'json:__doc__'}}", "not a callable"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*agent, override])
    with pytest.raises(ConfigError, match="env.guard is set, but the task 'arithmetic' is single-turn"):
        load_config(None, ["env.guard={}"])


def test_guard_needs_a_tool_env(tmp_path) -> None:
    module = tmp_path / "bare_env.py"
    module.write_text(
        "class Bare:\n"
        "    def reset(self, row, *, seed): return 'x'\n"
        "    def step(self, action): raise NotImplementedError\n"
        "    def summary(self): return ''\n"
    )
    assert load_config(None, [f"env.name={module}:Bare", "data.task=key_chain"]).uses_env()
    with pytest.raises(ConfigError, match="env.guard: .* is a Bare, not a ToolEnv"):
        load_config(None, [f"env.name={module}:Bare", "data.task=key_chain", "env.guard={}"])


def test_reward_functions_may_be_callables_from_python_and_are_saved_by_name() -> None:
    import json

    cfg = TrainConfig(data={"reward_fns": [{"fn": json.loads, "weight": 2.0}, {"fn": "arithmetic_exact"}]})
    assert cfg.data.reward_fns[0].fn is json.loads  # the run uses the function itself
    dumped = cfg.model_dump()["data"]["reward_fns"]
    assert dumped == [{"fn": "json:loads", "weight": 2.0}, {"fn": "arithmetic_exact", "weight": 1.0}]
    assert yaml.safe_load(yaml.safe_dump(cfg.model_dump()))["data"]["reward_fns"] == dumped
    with pytest.raises(ValueError, match="data.reward_fns.0.fn"):
        TrainConfig(data={"reward_fns": [{"fn": 3}]})
    with pytest.raises(ValueError, match="data.reward_fns.0.weight"):
        TrainConfig(data={"reward_fns": [{"fn": "arithmetic_exact", "weight": float("nan")}]})


# ---------------------------------------------------------------- your own data


def test_a_dataset_replaces_the_builtin_task_in_the_saved_config(tmp_path) -> None:
    config = load_config(None, ["data.path=rows.jsonl"])
    assert config.data.task is None and config.env_name() is None
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    assert yaml.safe_load(saved.read_text())["data"]["task"] is None
    assert load_config(saved) == config  # the saved config loads back as it was
    assert load_config(None, []).data.task == "arithmetic"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.path=x.jsonl", "data.task=countdown"],
            r"data\.task \('countdown'\) and data\.path are both set",
        ),
        (["data.test_path=t.jsonl"], r"data\.test_path applies to a dataset given by data\.path"),
        (["data.demonstrations_path=d.jsonl"], r"data\.demonstrations_path applies to a dataset"),
        (["data.test_fraction=0.2"], r"data\.test_fraction applies to a dataset"),
        (["data.solution_field=target"], r"data\.solution_field applies to a dataset"),
        (["data.path=x.jsonl", "data.test_path=t.jsonl", "data.test_fraction=0.2"], r"set only one of them"),
        (
            ["data.path=x.jsonl", "data.num_test=5", "data.test_fraction=0.2"],
            r"test_fraction and data\.num_test",
        ),
        (["data.path=x.jsonl", "data.test_fraction=1"], r"data\.test_fraction: .*less than 1"),
        (
            ["warmstart.split_fraction=0.3"],
            r"warmstart\.split_fraction applies when .*set warmstart\.rows=split",
        ),
        (
            ["data.path=x.jsonl", "warmstart.rows=all", "warmstart.split_fraction=0.3"],
            r"split_fraction applies",
        ),
        (
            ["data.path=x.jsonl", "data.demonstrations_path=d.jsonl", "warmstart.rows=split"],
            r"warmstart\.rows: the warm-start imitates the data\.demonstrations_path file",
        ),
        (
            ["data.path=x.jsonl", "env.name=key_chain", "data.demonstrations_path=d.jsonl"],
            r"the environment 'key_chain' writes the warm-start's demonstrations itself",
        ),
        (["warmstart.rows=some"], r"warmstart\.rows: Input should be 'split' or 'all'"),
        (["model.tiny_tokenizer=word"], r"model\.tiny_tokenizer: Input should be 'bpe' or 'char'"),
    ],
)
def test_data_settings_that_would_be_ignored_are_refused(overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_warm_start_split_defaults_to_datasets_only() -> None:
    assert load_config(None, ["data.path=x.jsonl"]).warmstart_split()
    assert not load_config(None, []).warmstart_split()  # the built-in demo keeps its numbers
    assert load_config(None, ["warmstart.rows=split"]).warmstart_split()
    assert not load_config(None, ["data.path=x.jsonl", "warmstart.rows=all"]).warmstart_split()
    assert not load_config(None, ["data.path=x.jsonl", "data.demonstrations_path=d.jsonl"]).warmstart_split()


# ---------------------------------------------------------------- bad input: values that act, files that parse


def test_every_preset_and_function_switch_loads_with_its_own_hyper_parameters() -> None:
    from posttrain.algorithms.presets import PRESETS

    for name in PRESETS:
        if name == "distill":  # needs teachers: tests/train/test_distill.py
            continue
        assert load_config(None, [f"algorithm={name}"]).preset().name == name
    # the preset's clip range belongs to ppo_clip: switching the loss starts from the new one's defaults
    switched = load_config(None, ["algo.policy_loss=sapo", "algo.advantage=rloo"]).preset()
    assert (switched.loss_kwargs, switched.advantage_kwargs) == ({}, {})
    tuned = load_config(None, ["algo.policy_loss=sapo", "algo.loss_kwargs={tau_neg: 2}"]).preset()
    assert tuned.loss_kwargs == {"tau_neg": 2}
    assert (
        load_config(None, ["algo.loss_kwargs={dual_clip: 3, clip_low: 1}"]).preset().loss_kwargs["dual_clip"]
        == 3
    )


def test_kl_settings_that_act_still_load() -> None:
    assert (
        load_config(None, ["algorithm=dr_grpo", "algo.kl_placement=loss", "algo.kl_coef=0.1"])
        .preset()
        .kl_coef
        == 0.1
    )
    assert load_config(None, ["algo.kl_coef=0"]).preset().kl_coef == 0.0  # the way to turn the KL off
    assert load_config(None, ["algo.kl_placement=none"]).preset().kl_placement == "none"
    assert (
        load_config(None, ["algo.kl_estimator=k2", "optim.adaptive_kl_target=0.1"]).preset().kl_estimator
        == "k2"
    )


def test_every_float_setting_refuses_inf_and_nan() -> None:
    from pydantic import BaseModel

    def floats(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, field in model.model_fields.items():
            inner = getattr(field.annotation, "model_fields", None)
            if inner is not None:
                keys += floats(field.annotation, f"{prefix}{name}.")
            elif "float" in str(field.annotation):
                keys.append(prefix + name)
        return keys

    keys = floats(TrainConfig, "")
    assert {"optim.lr", "eval.temperature", "algo.kl_coef", "rollout.temperature"} <= set(keys)
    for key in keys:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match=rf"{key}: must be a finite number \(not inf or NaN\)"):
                load_config(
                    None,
                    [f"{key}={bad}", "data.path=x.jsonl"] if key.startswith("data.") else [f"{key}={bad}"],
                )


def test_yaml_merge_keys_and_a_byte_order_mark_are_fine(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    # a << merge may be overridden (not a duplicate key); an editor's BOM is not content
    path.write_bytes(
        b"\xef\xbb\xbfshared: &r {group_size: 4, temperature: 0.7}\nrollout:\n  <<: *r\n  group_size: 6\n"
    )
    with pytest.raises(ConfigError, match=r"shared: unknown key"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbfrollout: &r\n  group_size: 6\n")
    assert load_config(path).rollout.group_size == 6
    path.write_text("# nothing but a comment\n")
    assert load_config(path) == TrainConfig()


def test_a_dataset_takes_no_task_options() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.task_options applies to a built-in task, but data\.path gives"
    ):
        load_config(None, ["data.path=x.jsonl", "data.task_options={ops: '+'}"])
    assert load_config(None, ["data.task_options={ops: '+'}"]).data.task_options == {"ops": "+"}


# ---------------------------------------------------------------- fuzzing: a TrainConfig or a ConfigError, never a crash

_SECTIONS = {
    name: list(getattr(f.annotation, "model_fields", {})) for name, f in TrainConfig.model_fields.items()
}
_WORDS = [
    "grpo",
    "ppo",
    "gspo",
    "cispo",
    "sapo",
    "rloo",
    "gae",
    "key_chain",
    "arithmetic",
    "math",
    "loss",
    "reward",
    "none",
    "k1",
    "token-mean",
    "episode-mean",
    "deny",
    "suspect",
    "char",
    "x.jsonl",
    "group",
    "split",
    "rule",
    "arithmetic_exact",
    "[a-",
    "x+",
    "seed",
    "clip_low",
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 10)
    | st.integers()
    | st.floats()
    | st.sampled_from(_WORDS)
    | st.text(max_size=6)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.sampled_from(_WORDS), inner, max_size=3)
    ),
    max_leaves=8,
)
_HYPER = ["clip_low", "clip_high", "dual_clip", "gamma", "lam", "whiten", "scale", "epsilon", "tau", "bogus"]
_SPECIAL = {
    ("algo", "loss_kwargs"): st.dictionaries(st.sampled_from(_HYPER), _scalars, max_size=3),
    ("algo", "advantage_kwargs"): st.dictionaries(st.sampled_from(_HYPER), _scalars, max_size=3),
    ("data", "task_options"): st.dictionaries(
        st.sampled_from(["ops", "max_operand", "templates", "seed", "x"]), _values, max_size=2
    ),
    ("data", "reward_fns"): st.lists(
        st.dictionaries(st.sampled_from(["fn", "weight", "x"]), _scalars, max_size=2), max_size=2
    ),
    ("env", "guard"): st.none()
    | st.dictionaries(
        st.sampled_from(list(GuardConfig.model_fields)),
        _scalars
        | st.lists(
            st.dictionaries(st.sampled_from(list(GuardRuleConfig.model_fields)), _scalars, max_size=4),
            max_size=2,
        ),
        max_size=3,
    ),
}


def _section(name: str) -> st.SearchStrategy:
    """Some of a section's real keys (plus a stray one), each with a random value."""
    if not _SECTIONS[name]:  # a plain key such as `algorithm`
        return _values
    keys = st.sampled_from([*_SECTIONS[name], "typo"])
    return st.lists(keys, max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({k: _SPECIAL.get((name, k), _values) for k in names})
    )


_trees = st.lists(st.sampled_from([*_SECTIONS, "extra"]), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: _section(n) if n in _SECTIONS else _values for n in names})
)
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _config_or_config_error(load) -> None:
    try:
        config = load()
    except ConfigError:
        return
    assert isinstance(config, TrainConfig)


@_FUZZ
@given(tree=_trees)
def test_fuzz_any_nested_config_is_loaded_or_refused_with_a_config_error(tmp_path, tree) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    _config_or_config_error(lambda: load_config(path))


@_FUZZ
@given(data=st.binary(max_size=160) | st.text(max_size=160).map(str.encode))
def test_fuzz_any_file_is_loaded_or_refused_with_a_config_error(tmp_path, data) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    _config_or_config_error(lambda: load_config(path))


@_FUZZ
@given(
    items=st.lists(
        st.tuples(
            st.lists(st.sampled_from([*_SECTIONS, *_WORDS]) | st.text(max_size=4), min_size=1, max_size=3),
            _values | st.text(),
        ),
        max_size=4,
    )
)
def test_fuzz_any_set_items_are_applied_or_refused_with_a_config_error(items) -> None:
    overrides = [
        ".".join(keys)
        + "="
        + (value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip())
        for keys, value in items
    ]
    _config_or_config_error(lambda: load_config(None, overrides))
