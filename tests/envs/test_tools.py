"""Tool schemas, both call styles, running tools, and the ToolEnv step contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.envs.base import EnvStep, TextEnv
from posttrain.envs.tools import (
    ERROR_KINDS,
    BadArguments,
    ToolCall,
    ToolEnv,
    ToolError,
    parse_tool_call,
    run_tool,
    tool_schema,
)


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: What to shout.
    """
    return text.upper()


def broken(x: int) -> str:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise ZeroDivisionError("boom\non two lines")


def picky(x: int) -> str:
    """Accepts only positive numbers.

    Args:
        x: A positive number.
    """
    if x <= 0:
        raise BadArguments("x must be positive")
    return "ok"


TOOLS: dict[str, Callable[..., Any]] = {"add": add, "shout": shout, "broken": broken, "picky": picky}


# ---------------------------------------------------------------- schemas


def test_schema_from_hints_and_docstring() -> None:
    assert tool_schema(add) == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first number."},
                    "b": {"type": "integer", "description": "The second number."},
                },
                "required": ["a"],
            },
            "return": {"type": "integer"},
        },
    }


def test_schema_of_a_bound_method_skips_self() -> None:
    class Box:
        def put(self, item: str) -> None:
            """Put an item in the box.

            Args:
                item: The item.
            """

    schema = tool_schema(Box().put)["function"]
    assert schema["name"] == "put"
    assert list(schema["parameters"]["properties"]) == ["item"]


def test_schema_errors_name_the_function_and_the_gap() -> None:
    def undocumented(x: int) -> int:
        return x

    def unhinted(x, y: int) -> int:  # type: ignore[no-untyped-def]
        """Doc.

        Args:
            x: An x.
            y: A y.
        """
        return y

    def undescribed(x: int) -> int:
        """Has no Args section."""
        return x

    with pytest.raises(ValueError, match=r"'undocumented' has no docstring"):
        tool_schema(undocumented)
    with pytest.raises(ValueError, match=r"'unhinted' has no type hint for argument\(s\): x"):
        tool_schema(unhinted)
    with pytest.raises(ValueError, match=r"'undescribed'.*argument 'x'"):
        tool_schema(undescribed)


# ---------------------------------------------------------------- parsing


def test_plain_call_on_the_last_non_empty_line() -> None:
    action = "I will add.\n  add(2, b=-3)  \n\n"
    assert parse_tool_call(action, "plain") == ToolCall("add", {"b": -3}, "add(2, b=-3)", args=(2,))
    call = parse_tool_call("shout('hi there', extra=[1, {'k': (2, None)}])\n", "plain")
    assert call == ToolCall(
        "shout",
        {"extra": [1, {"k": (2, None)}]},
        "shout('hi there', extra=[1, {'k': (2, None)}])",
        ("hi there",),
    )


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("", "no_call"),
        ("just thinking\n", "no_call"),
        ("add(1)\nand then some words", "no_call"),
        ("os.system('ls')", "no_call"),
        ("add(1", "malformed"),
        ("add(1) now", "malformed"),
        ("add(x)", "malformed"),
        ("add(__import__('os'))", "malformed"),
        ("add(*[1, 2])", "malformed"),
        ("add(**{'a': 1})", "malformed"),
        ("add(a=1, a=2)", "malformed"),
        ("add(1)(2)", "malformed"),
        ("add(" + "[" * 300 + "]" * 300 + ")", "malformed"),
    ],
)
def test_plain_mistakes(action: str, kind: str) -> None:
    error = parse_tool_call(action, "plain")
    assert isinstance(error, ToolError)
    assert error.kind == kind
    assert error.message.startswith("error: ") and "\n" not in error.message


def test_hermes_takes_the_first_call_anywhere() -> None:
    action = (
        "thinking...\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        '<tool_call>{"name": "shout", "arguments": {"text": "x"}}</tool_call> trailing'
    )
    call = parse_tool_call(action, "hermes")
    assert isinstance(call, ToolCall)
    assert (call.name, call.arguments, call.args) == ("add", {"a": 1, "b": 2}, ())
    assert (
        call.text.startswith("<tool_call>")
        and call.text.endswith("</tool_call>")
        and "shout" not in call.text
    )
    no_args = parse_tool_call('<tool_call>{"name": "add"}</tool_call>', "hermes")
    assert no_args == ToolCall("add", {}, '<tool_call>{"name": "add"}</tool_call>')


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("add(1, 2)", "no_call"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}', "malformed"),
        ("<tool_call>{name: add}</tool_call>", "malformed"),
        ('<tool_call>["add", {"a": 1}]</tool_call>', "malformed"),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', "malformed"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "malformed"),
        ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", "malformed"),
    ],
)
def test_hermes_mistakes(action: str, kind: str) -> None:
    error = parse_tool_call(action, "hermes")
    assert isinstance(error, ToolError) and error.kind == kind


def test_unknown_style_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="unknown tool call style 'json'; allowed: plain, hermes"):
        parse_tool_call("add(1)", "json")
    with pytest.raises(ValueError, match="allowed: plain, hermes"):
        CounterEnv(call_style="xml")


# ---------------------------------------------------------------- running


def test_run_tool_binds_positional_and_keyword_arguments() -> None:
    assert run_tool(ToolCall("add", {}, "", args=(2, 5)), TOOLS) == "7"
    assert run_tool(ToolCall("add", {"b": 10}, "", args=(2,)), TOOLS) == "12"
    assert run_tool(ToolCall("add", {"a": 4}, ""), TOOLS) == "5"


def test_run_tool_turns_mistakes_into_one_line_errors() -> None:
    unknown = run_tool(ToolCall("ad", {}, ""), {"lookup": add, "answer": add})
    assert unknown == ToolError("unknown_tool", "error: unknown tool 'ad'; tools: answer, lookup")
    missing = run_tool(ToolCall("add", {}, ""), TOOLS)
    assert missing == ToolError(
        "bad_arguments", "error: bad arguments for add: missing a required argument: 'a'"
    )
    extra = run_tool(ToolCall("add", {"c": 1}, "", args=(1,)), TOOLS)
    assert isinstance(extra, ToolError) and extra.kind == "bad_arguments" and "'c'" in extra.message
    too_many = run_tool(ToolCall("add", {}, "", args=(1, 2, 3)), TOOLS)
    assert isinstance(too_many, ToolError) and too_many.kind == "bad_arguments"
    assert run_tool(ToolCall("picky", {"x": -1}, ""), TOOLS) == ToolError(
        "bad_arguments", "x must be positive"
    )
    raised = run_tool(ToolCall("broken", {"x": 1}, ""), TOOLS)
    assert raised == ToolError("tool_raised", "error: broken failed: ZeroDivisionError: boom on two lines")


def test_long_error_messages_are_cut() -> None:
    def loud(x: str) -> str:
        raise RuntimeError(x)

    error = run_tool(ToolCall("loud", {"x": "y" * 1000}, ""), {"loud": loud})
    assert isinstance(error, ToolError) and len(error.message) == 200 and error.message.endswith("...")


def test_tool_error_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown tool error kind 'oops'"):
        ToolError("oops", "x")


# ---------------------------------------------------------------- ToolEnv


class CounterEnv(ToolEnv):
    """A toy env: ``bump`` pays 0.25 per call, ``fail`` raises, ``stop(n)`` ends with reward 1 if n == bumps."""

    def start(self, row: dict[str, Any]) -> str:
        self.bumps = 0
        self.stopped: int | None = None
        return f"{row['prompt']}\n"

    def tools(self) -> dict[str, Callable[..., Any]]:
        return {"bump": self.bump, "fail": broken, "stop": self.stop}

    def bump(self) -> int:
        self.bumps += 1
        self.credit(0.25)
        return self.bumps

    def stop(self, n: int) -> str:
        self.stopped = n
        return "bye"

    def finished(self) -> bool:
        return self.stopped is not None

    def outcome_reward(self) -> float:
        return 1.0 if self.stopped == self.bumps else 0.0


def test_tool_env_episode() -> None:
    env = CounterEnv()
    assert isinstance(env, TextEnv)
    assert env.summary() == ""
    assert env.reset({"prompt": "count"}, seed=3) == "count\n" and env.seed == 3
    assert env.step("bump()\n") == EnvStep("= 1\n", 0.25, False, {"tool": "bump", "error": None})
    assert env.step("bmp()\n") == EnvStep(
        "= error: unknown tool 'bmp'; tools: bump, fail, stop\n",
        0.0,
        False,
        {"tool": "bmp", "error": "unknown_tool"},
    )
    assert env.step("fail(1)\n") == EnvStep(
        "= error: fail failed: ZeroDivisionError: boom on two lines\n",
        0.0,
        False,
        {"tool": "fail", "error": "tool_raised"},
    )
    assert env.step("bump()") == EnvStep("\n= 2\n", 0.25, False, {"tool": "bump", "error": None})
    assert env.step("stop(2)\n") == EnvStep("", 1.0, True, {"tool": "stop", "error": None})
    with pytest.raises(RuntimeError):
        env.step("bump()\n")


def test_tool_env_needs_reset_and_restarts_cleanly() -> None:
    env = CounterEnv()
    with pytest.raises(RuntimeError):
        env.step("bump()\n")
    env.reset({"prompt": "a"}, seed=0)
    env.step("stop(5)\n")
    env.reset({"prompt": "b"}, seed=1)
    assert env.step("bump()\n").observation == "= 1\n"


def test_tool_env_hermes_style() -> None:
    env = CounterEnv(call_style="hermes")
    env.reset({"prompt": "count"}, seed=0)
    step = env.step('<tool_call>{"name": "bump", "arguments": {}}</tool_call>\n')
    assert step == EnvStep("1", 0.25, False, {"tool": "bump", "error": None})
    assert env.step("bump()\n").info == {"tool": None, "error": "no_call"}
    assert env.step('<tool_call>{"name": "stop", "arguments": {"n": 1}}</tool_call>').reward == 1.0


def test_tool_schemas_of_an_env_need_documented_tools() -> None:
    env = CounterEnv()
    env.reset({"prompt": "p"}, seed=0)
    with pytest.raises(ValueError, match="'bump' has no docstring"):
        env.tool_schemas()


_names = st.sampled_from(["bump", "fail", "stop", "nope", "", "x y"])
_actions = st.one_of(
    st.text(),
    st.builds(lambda name, body: f"{name}({body})\n", _names, st.text()),
    st.builds(
        lambda name, args: f"{name}({args})", _names, st.sampled_from(["1", "'a'", "n=1", "n='x'", "1, 2"])
    ),
    st.builds(lambda body: f"<tool_call>{body}</tool_call>", st.text()),
    st.builds(
        lambda name, args: f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>',
        _names,
        st.sampled_from(["{}", '{"n": 1}', '{"n": "1"}', '{"m": 1}', "[]", "null"]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(style=st.sampled_from(["plain", "hermes"]), actions=st.lists(_actions, min_size=1, max_size=6))
def test_arbitrary_actions_never_raise(style: str, actions: list[str]) -> None:
    env = CounterEnv(call_style=style)
    env.reset({"prompt": "p"}, seed=0)
    for action in actions:
        step = env.step(action)
        assert step.info["error"] is None or step.info["error"] in ERROR_KINDS
        if step.info["error"] is not None:
            assert not step.done and step.observation.strip()
        if step.done:
            assert step.info["tool"] == "stop"
            break
