"""env_factory: built-in names, 'module:Class' and 'path/file.py:Class' specs, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.envs.base import TextEnv
from posttrain.envs.builtin.key_chain import KeyChainEnv
from posttrain.envs.registry import EnvSpecError, env_factory

ROW = {"prompt": "find the end of chain 482", "answer": "517", "chain": [482, 915, 103, 517], "horizon": 3}

ENV_FILE = '''
class CountdownEnv:
    """Counts down from the row's start; done at zero."""

    def __init__(self, step_size: int = 1) -> None:
        self.step_size = step_size
        self.left = 0

    def reset(self, row, *, seed):
        self.left = int(row["start"])
        return f"count down from {self.left}\\n"

    def step(self, action):
        from posttrain.envs.base import EnvStep

        self.left -= self.step_size
        return EnvStep(f"= {self.left}\\n", reward=float(self.left <= 0), done=self.left <= 0)

    def summary(self):
        return f"left {self.left}"


class NotAnEnv:
    def reset(self, row, *, seed):
        return ""
'''


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_envs.py"
    path.write_text(ENV_FILE)
    return path


def test_builtin_name_gives_a_factory_of_fresh_environments() -> None:
    make = env_factory("key_chain")
    first, second = make(), make()
    assert isinstance(first, KeyChainEnv) and isinstance(first, TextEnv) and first is not second
    assert first.reset(ROW, seed=0) == "find the end of chain 482\n"
    assert first.step("lookup(482)\n").observation == "= 915\n"
    assert first.lookups == 1 and second.lookups == 0  # no state shared between instances


def test_options_are_passed_to_every_instance() -> None:
    make = env_factory("key_chain", {"call_style": "hermes", "step_reward": 0.25})
    env = make()
    assert env.call_style == "hermes" and env.step_reward == 0.25
    assert env.stop_strings == ("</tool_call>",)
    assert make().step_reward == 0.25


def test_module_colon_class_spec() -> None:
    env = env_factory("posttrain.envs.builtin.key_chain:KeyChainEnv", {"step_reward": 0.5})()
    assert type(env) is KeyChainEnv and env.step_reward == 0.5


def test_file_colon_class_spec(env_file: Path) -> None:
    make = env_factory(f"{env_file}:CountdownEnv", {"step_size": 2})
    env = make()
    assert env.reset({"start": 3}, seed=0) == "count down from 3\n"
    assert env.step("tick").observation == "= 1\n"
    last = env.step("tick")
    assert last.done and last.reward == 1.0 and env.summary() == "left -1"
    assert type(make()).__name__ == "CountdownEnv"


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(
        EnvSpecError, match=r"env\.name: unknown environment 'kee_chain'.*\['key_chain', 'leaky_chain'\]"
    ):
        env_factory("kee_chain")


def test_missing_class_in_a_module_is_an_env_spec_error() -> None:
    with pytest.raises(EnvSpecError, match=r"environment .*has no attribute 'NoSuchEnv'.*KeyChainEnv"):
        env_factory("posttrain.envs.builtin.key_chain:NoSuchEnv")


def test_unknown_option_names_env_options() -> None:
    with pytest.raises(EnvSpecError, match=r"env\.options: 'key_chain' does not accept \['horizon'\]"):
        env_factory("key_chain", {"horizon": 3})


def test_bad_option_value_names_env_options() -> None:
    with pytest.raises(EnvSpecError, match=r"env\.options: 'key_chain'.*unknown tool call style 'json'"):
        env_factory("key_chain", {"call_style": "json"})


def test_a_class_that_is_not_a_text_env_is_rejected(env_file: Path) -> None:
    with pytest.raises(EnvSpecError, match=r"env\.name: .*built a NotAnEnv, which lacks reset/step/summary"):
        env_factory(f"{env_file}:NotAnEnv")
    with pytest.raises(EnvSpecError, match=r"built a OrderedDict"):
        env_factory("collections:OrderedDict")


def test_an_object_that_is_not_callable_is_rejected() -> None:
    with pytest.raises(EnvSpecError, match=r"env\.name: .*KEYS' is a range, not a class or factory"):
        env_factory("posttrain.envs.builtin.key_chain:KEYS")


def test_env_spec_error_is_a_value_error() -> None:
    assert issubclass(EnvSpecError, ValueError)
