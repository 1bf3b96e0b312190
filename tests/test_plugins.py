"""load_from_spec: user code named as 'module:attr' or 'path/file.py:attr', and errors naming the kind."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain.plugins import load_from_spec, spec_of

HINT = "give 'package.module:name' or 'path/to/file.py:name'"

PLUGIN = """
from os.path import join

CONSTANT = 3


def alpha(x):
    return x + 1


def beta():
    return "beta"


def _hidden():
    return None


class Gamma:
    pass
"""


class SpecError(Exception):
    pass


def load(spec: str, kind: str = "reward function") -> tuple[str, object]:
    return load_from_spec(spec, kind=kind, error=SpecError, hint=HINT)


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path`` importable as a folder of modules; modules imported from it are forgotten after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_loads_an_attribute_from_a_module() -> None:
    name, value = load("posttrain.plugins:load_from_spec", kind="environment")
    assert name == "load_from_spec" and value is load_from_spec


def test_loads_an_attribute_from_a_file_and_caches_the_module(tmp_path: Path) -> None:
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    name, alpha = load(f"{path}:alpha")
    assert name == "alpha" and alpha(1) == 2  # type: ignore[operator]
    _, again = load(f" {path}:alpha ")  # surrounding whitespace is ignored
    assert again is alpha


def test_a_relative_file_path_is_resolved_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "local_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    _, beta = load("local_plugin.py:beta")
    assert beta() == "beta"  # type: ignore[operator]


@pytest.mark.parametrize("spec", ["no_colon_here", "posttrain.plugins:", ":alpha"])
def test_a_malformed_spec_names_the_kind_and_the_hint(spec: str) -> None:
    with pytest.raises(SpecError, match=rf"^environment '{spec}' is malformed: give 'package\.module:name'"):
        load(spec, kind="environment")


def test_a_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.py"
    with pytest.raises(
        SpecError, match=r"^reward function '.*absent\.py:fn': file '.*absent\.py' does not exist"
    ):
        load(f"{missing}:fn")


def test_a_missing_module_is_reported_with_the_fix() -> None:
    with pytest.raises(
        SpecError, match=r"^environment 'posttrain_no_such_module_xyz:Env': cannot import module .*PYTHONPATH"
    ):
        load("posttrain_no_such_module_xyz:Env", kind="environment")


def test_a_missing_attribute_lists_the_callables_defined_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plugin_file.py"
    path.write_text(PLUGIN)
    # imported names (join), private names and non-callables are not listed
    with pytest.raises(
        SpecError,
        match=r"^reward function .*has no attribute 'gamma'; callables defined there: \['Gamma', 'alpha', 'beta'\]$",
    ):
        load(f"{path}:gamma")


def test_a_missing_attribute_in_a_module_lists_only_what_it_defines(on_path: Path) -> None:
    (on_path / "plugin_module_ok.py").write_text(PLUGIN)
    with pytest.raises(
        SpecError, match=r"'plugin_module_ok' has no attribute 'delta'.*\['Gamma', 'alpha', 'beta'\]"
    ):
        load("plugin_module_ok:delta", kind="environment")


def test_an_import_time_exception_in_a_file_is_wrapped_and_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(
        SpecError, match=r"^environment .*importing '.*broken\.py' failed with RuntimeError: boom"
    ):
        load(f"{path}:Env", kind="environment")
    path.write_text(PLUGIN)  # the failed import left nothing behind: the fixed file loads
    assert load(f"{path}:beta")[1]() == "beta"  # type: ignore[operator]


def test_an_import_time_exception_in_a_module_is_wrapped(on_path: Path) -> None:
    (on_path / "plugin_module_broken.py").write_text("1 / 0\n")
    with pytest.raises(
        SpecError,
        match=r"^reward function 'plugin_module_broken:f': importing module 'plugin_module_broken' "
        r"failed with ZeroDivisionError",
    ) as caught:
        load("plugin_module_broken:f")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_spec_of_names_a_callable_so_load_from_spec_finds_it_again(tmp_path: Path) -> None:
    import json

    assert spec_of(json.dumps) == "json:dumps"
    assert load_from_spec(spec_of(json.dumps), kind="thing", error=ValueError, hint=HINT)[1] is json.dumps
    module = tmp_path / "user_rewards.py"
    module.write_text(PLUGIN)
    _, alpha = load_from_spec(f"{module}:alpha", kind="thing", error=ValueError, hint=HINT)
    assert spec_of(alpha) == f"{module}:alpha"  # a function loaded from a file is named by the file
    assert load_from_spec(spec_of(alpha), kind="thing", error=ValueError, hint=HINT)[1] is alpha

    def nested(x: int) -> int:
        return x

    for unnamed in (nested, lambda x: x):
        spec = spec_of(unnamed)
        assert spec.startswith("<unsaved callable")
        with pytest.raises(ValueError, match="lambda or nested function.*define it at module level"):
            load_from_spec(spec, kind="reward function", error=ValueError, hint=HINT)
