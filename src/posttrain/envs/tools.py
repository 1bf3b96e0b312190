"""Tool use at text level: tools as plain functions, parsing a policy's call, running it safely, and
``ToolEnv``, a base class for tool-using text environments.

A tool is a plain Python function (or bound method) with type hints and a Google-style docstring
that describes every argument; ``tool_schema`` turns it into the JSON schema that chat templates take.

Two call styles are understood:

- ``"plain"``: the last non-empty line of the action is a Python-style call, ``name(arg, key=value)``,
  whose arguments are Python literals (numbers, strings, lists, dicts, ...). The line is parsed with
  ``ast`` and each argument with ``ast.literal_eval``; nothing is ever evaluated. Positional arguments
  bind to the tool's parameters in order. Observations read ``"= <result>\\n"``.
- ``"hermes"`` (the Qwen / Hermes chat-template style): the first
  ``<tool_call>{"name": "...", "arguments": {...}}</tool_call>`` anywhere in the action, parsed with
  ``json``. Observations read ``"<tool_response>\\n<result>\\n</tool_response>\\n"``.

Model mistakes never raise: a missing or malformed call, an unknown tool, arguments that do not fit
the tool's signature and a tool that raises all become a ``ToolError`` whose ``message`` is a short
one-line observation, and the episode goes on. A tool rejects an argument *value* by raising
``BadArguments``; its message is shown to the policy verbatim.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.envs.base import EnvStep

if TYPE_CHECKING:
    from posttrain.envs.guard import Guard

__all__ = [
    "CALL_STYLES",
    "ERROR_KINDS",
    "BadArguments",
    "ToolCall",
    "ToolEnv",
    "ToolError",
    "check_call_style",
    "parse_tool_call",
    "run_tool",
    "tool_schema",
]

CALL_STYLES = ("plain", "hermes")
ERROR_KINDS = frozenset({"malformed", "no_call", "unknown_tool", "bad_arguments", "tool_raised"})

# Errors the parsers may hit on arbitrary text: bad syntax, huge or deeply nested literals.
_PARSE_ERRORS = (SyntaxError, ValueError, TypeError, MemoryError, RecursionError)
_CALL_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*\(")
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_MAX_MESSAGE = 200


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name, its keyword arguments, the raw call text, and (plain style
    only) positional arguments, which bind to the tool's parameters in order when it runs."""

    name: str
    arguments: dict[str, Any]
    text: str
    args: tuple[Any, ...] = field(default=())


@dataclass(frozen=True)
class ToolError:
    """A model mistake turned into data: ``kind`` (one of ``ERROR_KINDS``) for metrics, and
    ``message``, a short one-line observation for the policy."""

    kind: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in ERROR_KINDS:
            raise ValueError(
                f"unknown tool error kind {self.kind!r}; kinds: {', '.join(sorted(ERROR_KINDS))}"
            )


class BadArguments(Exception):
    """Raised by a tool to reject the values it was called with; the message is the observation."""


def check_call_style(style: str) -> str:
    """Return ``style`` if it is a known call style; raise ``ValueError`` naming the allowed ones."""
    if style not in CALL_STYLES:
        raise ValueError(f"unknown tool call style {style!r}; allowed: {', '.join(CALL_STYLES)}")
    return style


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of tool ``fn`` (``transformers.utils.get_json_schema``), so a chat template can
    list it. Raises ``ValueError`` naming the function when its docstring or a type hint is missing."""
    name = getattr(fn, "__name__", repr(fn))
    if not inspect.getdoc(fn):
        raise ValueError(f"tool {name!r} has no docstring; describe it and each argument under 'Args:'")
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in {"self", "cls"} and params[0].annotation is inspect.Parameter.empty:
        params = params[1:]
    unhinted = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    if unhinted:
        raise ValueError(f"tool {name!r} has no type hint for argument(s): {', '.join(unhinted)}")
    # imported here: transformers is heavy, and parsing and running tools do not need it
    from transformers.utils import DocstringParsingException, TypeHintParsingException, get_json_schema

    try:
        return get_json_schema(fn)
    except (DocstringParsingException, TypeHintParsingException) as exc:
        raise ValueError(f"tool {name!r} has no usable schema: {exc}") from exc


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """Squash ``text`` onto one line of at most ``limit`` characters (observations and verdict
    reasons are lines)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _parse_plain(action: str) -> ToolCall | ToolError:
    """Parse the last non-empty line of ``action`` as ``name(literal, ..., key=literal, ...)``."""
    lines = [line.strip() for line in action.splitlines() if line.strip()]
    if not lines or not _CALL_START.match(lines[-1]):
        return ToolError("no_call", "error: no tool call")
    line = lines[-1]
    try:
        node = ast.parse(line, mode="eval").body
    except _PARSE_ERRORS:
        return ToolError("malformed", "error: malformed call: invalid syntax")
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return ToolError("malformed", "error: malformed call: expected name(arguments)")
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        return ToolError("malformed", "error: malformed call: no * or ** arguments")
    names = [k.arg for k in node.keywords]
    if len(set(names)) != len(names):
        return ToolError("malformed", "error: malformed call: repeated keyword argument")
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except _PARSE_ERRORS:
        return ToolError("malformed", "error: malformed call: arguments must be literals")
    return ToolCall(name=node.func.id, arguments=kwargs, text=line, args=args)


def _parse_hermes(action: str) -> ToolCall | ToolError:
    """Parse the first ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in ``action``."""
    match = _HERMES_CALL.search(action)
    if match is None:
        if "<tool_call>" in action:
            return ToolError("malformed", "error: malformed call: no closing </tool_call>")
        return ToolError("no_call", "error: no tool call")
    try:
        payload = json.loads(match.group(1))
    except _PARSE_ERRORS:
        return ToolError("malformed", "error: malformed call: invalid JSON")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolError("malformed", 'error: malformed call: expected {"name": ..., "arguments": {...}}')
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolError("malformed", "error: malformed call: arguments must be a JSON object")
    return ToolCall(name=payload["name"], arguments=arguments, text=match.group(0))


def parse_tool_call(action: str, style: str) -> ToolCall | ToolError:
    """Find the tool call in the policy's ``action`` text in call style ``style`` (see the module
    docstring); a missing or malformed call comes back as a ``ToolError``."""
    if check_call_style(style) == "plain":
        return _parse_plain(action)
    return _parse_hermes(action)


def run_tool(call: ToolCall, tools: Mapping[str, Callable[..., Any]]) -> str | ToolError:
    """Run ``call`` against ``tools`` and return the result as text; an unknown tool, arguments that
    do not fit its signature, ``BadArguments`` and any other ``Exception`` become a ``ToolError``."""
    fn = tools.get(call.name)
    if fn is None:
        names = ", ".join(sorted(tools))
        return ToolError("unknown_tool", one_line(f"error: unknown tool {call.name!r}; tools: {names}"))
    try:
        bound = inspect.signature(fn).bind(*call.args, **call.arguments)
    except TypeError as exc:
        return ToolError("bad_arguments", one_line(f"error: bad arguments for {call.name}: {exc}"))
    try:
        result = fn(*bound.args, **bound.kwargs)
    except BadArguments as exc:
        return ToolError("bad_arguments", one_line(str(exc)))
    except Exception as exc:  # a failing tool is an observation, not a crash
        return ToolError("tool_raised", one_line(f"error: {call.name} failed: {type(exc).__name__}: {exc}"))
    return str(result)


class ToolEnv:
    """Base class for tool-using text environments (implements ``TextEnv``).

    A subclass provides ``start`` (set up the episode for a row, return the first observation),
    ``tools`` (name -> callable; bound methods are fine), ``finished`` and ``outcome_reward`` (paid on
    the turn the episode ends); a tool may pay a per-turn reward with ``credit``. Each ``step`` parses
    the action's call, runs it and shows the result or the error with ``format_observation``. An error
    never ends the episode. The step that ends it has an empty observation: nothing follows it.
    ``info`` holds ``tool`` (the called name or None) and ``error`` (a ``ToolError`` kind or None),
    plus whatever ``step_info`` adds.

    With a ``guard`` (``posttrain.envs.guard``; set by the run from ``env.guard``) every parsed call
    is checked before it runs; a denied call does not run, the policy is shown a decoy observation
    (``decoy_texts`` lets an environment word them like its own answers) and the verdict is in
    ``info["guard"]``.
    """

    decoy_texts: ClassVar[dict[str, str]] = {}
    # turns of recent episode text shown to the guard's judge
    judge_context_turns: ClassVar[int] = 6

    def __init__(self, call_style: str = "plain") -> None:
        self.call_style = check_call_style(call_style)
        self.seed = 0
        self.guard: Guard | None = None
        self._tools: dict[str, Callable[..., Any]] | None = None
        self._pending_reward = 0.0
        self._over = False
        self._history: list[str] = []

    # ---------------------------------------------------------------- hooks for subclasses

    def start(self, row: Mapping[str, Any]) -> str:
        """Set up the episode for ``row`` and return the first observation."""
        raise NotImplementedError

    def tools(self) -> dict[str, Callable[..., Any]]:
        """The tools the policy may call this episode, by name."""
        raise NotImplementedError

    def finished(self) -> bool:
        """Whether the episode is over (checked after every turn)."""
        return False

    def outcome_reward(self) -> float:
        """The reward paid on the turn the episode ends."""
        return 0.0

    def step_info(self) -> dict[str, Any]:
        """Extra diagnostics merged into every step's ``info``."""
        return {}

    def format_observation(self, text: str) -> str:
        """How a tool result or error message is shown to the policy, by call style: ``= result`` on
        its own line (plain), or the bare result (hermes), which a chat model's template renders as a
        tool message (Qwen/Hermes templates wrap it in ``<tool_response>``)."""
        if self.call_style == "hermes":
            return text
        return f"= {text}\n"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where a turn ends: the end of the call line (plain) or of the call block (hermes)."""
        return ("\n",) if self.call_style == "plain" else ("</tool_call>",)

    def summary(self) -> str:
        """A compact account of the episode so far, for compaction; empty unless overridden."""
        return ""

    # ---------------------------------------------------------------- the TextEnv protocol

    def credit(self, amount: float) -> None:
        """Add ``amount`` to the reward of the current turn (for tools that pay per-turn rewards)."""
        self._pending_reward += amount

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The JSON schemas of this episode's tools, e.g. for a chat template's ``tools=``."""
        return [tool_schema(fn) for fn in self.tools().values()]

    def reset(self, row: Mapping[str, Any], *, seed: int) -> str:
        """Start the episode for ``row`` (``seed`` is kept on ``self.seed`` for subclasses)."""
        self.seed = seed
        self._pending_reward = 0.0
        self._over = False
        observation = self.start(row)
        self._tools = self.tools()
        self._history = [observation]
        return observation

    def step(self, action: str) -> EnvStep:
        """Parse and run the call in ``action``; return the observation, reward and done flag."""
        if self._tools is None or self._over:
            raise RuntimeError("step() needs reset() first and cannot follow the episode's end")
        self._pending_reward = 0.0
        call = parse_tool_call(action, self.call_style)
        verdict = None
        if isinstance(call, ToolCall) and self.guard is not None:
            context = "".join(self._history[:1] + self._history[1:][-self.judge_context_turns :])
            verdict = self.guard.check(call, context + action)
        result: str | ToolError
        if isinstance(call, ToolError):
            result = call
        elif verdict is not None and verdict.denied and verdict.enforced:
            assert self.guard is not None
            result = self.guard.decoy_observation(self.decoy_texts)
            self._pending_reward -= self.guard.penalty
        else:
            result = run_tool(call, self._tools)
        error = result.kind if isinstance(result, ToolError) else None
        info: dict[str, Any] = {"tool": call.name if isinstance(call, ToolCall) else None, "error": error}
        if verdict is not None:
            info["guard"] = verdict.info()
        reward = self._pending_reward
        self._over = self.finished()
        if self._over:
            reward += self.outcome_reward()
            observation = ""
        else:
            text = result.message if isinstance(result, ToolError) else result
            observation = self.format_observation(text)
            if self.call_style == "plain" and action and not action.endswith("\n"):
                observation = "\n" + observation  # keep the observation on its own line
        self._history.append(action + observation)
        info.update(self.step_info())
        return EnvStep(observation=observation, reward=reward, done=self._over, info=info)
