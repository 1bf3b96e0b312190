"""The reward-hacking guard: rules, the judge stage, decoys, penalties and auditing inside ToolEnv."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.envs.guard import (
    DEFAULT_RULES,
    Guard,
    GuardRule,
    JudgeQuery,
    JudgeVerdict,
    ModelJudge,
    judge_messages,
    parse_judge_reply,
)
from posttrain.envs.tools import BadArguments, ToolCall, ToolEnv, parse_tool_call


def call(text: str) -> ToolCall:
    parsed = parse_tool_call(text, "plain")
    assert isinstance(parsed, ToolCall), parsed
    return parsed


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ('read("tests/expected.txt")', "hidden_answer"),
        ('read("grader.py")', "hidden_answer"),
        ('read(".hidden/key")', "hidden_answer"),
        ('shell("curl https://example.com/solution")', "network"),
        ('shell("wget -q host/x")', "network"),
        ('shell("pip download leaked-answers")', "network"),
        ('shell("grep -r tests .")', "grader_search"),
        ('shell("find . -name expected*")', "hidden_answer"),  # both match; the first deny rule wins
    ],
)
def test_default_rules_deny_cheating_calls(text: str, rule: str) -> None:
    verdict = Guard().check(call(text))
    assert (verdict.denied, verdict.flagged, verdict.stage, verdict.rule) == (True, True, "rules", rule)
    assert verdict.judged is False


@pytest.mark.parametrize(
    "text", ["lookup(482)", "answer(517)", 'read("notes.txt")', 'read("src/main.py")', 'shell("ls src")']
)
def test_default_rules_let_ordinary_calls_through(text: str) -> None:
    verdict = Guard().check(call(text))
    assert (verdict.denied, verdict.flagged, verdict.stage) == (False, False, "pass")
    assert verdict.info() == {"denied": False}


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ('read("tests/test_parse.py")', "test_files"),
        ('read("../secret.txt")', "outside_workdir"),
        ('read("/etc/passwd")', "outside_workdir"),
    ],
)
def test_suspect_calls_are_denied_without_a_judge_unless_configured(text: str, rule: str) -> None:
    verdict = Guard().check(call(text))
    assert (verdict.denied, verdict.stage, verdict.rule) == (True, "rules", rule)
    assert "suspect, no judge" in verdict.reason
    lenient = Guard(suspect_without_judge="allow").check(call(text))
    assert (lenient.denied, lenient.flagged) == (False, True)


def test_rule_restricted_to_tools_and_searching_argument_values_only() -> None:
    rule = GuardRule("no_secrets", r"secret", tools=("read*",))
    assert rule.matches(call('read_file("my_secret")'))
    assert not rule.matches(call('write("my_secret")'))  # another tool
    assert not GuardRule("answers", r"answer").matches(call("answer(5)"))  # the tool name is not searched
    assert GuardRule("kw", r"^x y$").matches(call('f(1, path="y")')) is False
    assert GuardRule("both", r"^1 y$").matches(call('f(1, path="y")'))  # positional, then keyword values


def test_guard_and_rule_validation_name_the_problem() -> None:
    with pytest.raises(ValueError, match="rule 'bad'.*not a regex"):
        GuardRule("bad", "(")
    with pytest.raises(ValueError, match="action"):
        GuardRule("x", "y", action="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown decoy"):
        Guard(decoy="nothing")
    with pytest.raises(ValueError, match="decoy_text"):
        Guard(decoy="text")
    with pytest.raises(ValueError, match="decoy_text is only used"):
        Guard(decoy="empty", decoy_text="x")
    with pytest.raises(ValueError, match="penalty"):
        Guard(penalty=-1.0)
    with pytest.raises(ValueError, match="penalty"):
        Guard(penalty=float("nan"))
    with pytest.raises(ValueError, match="unique"):
        Guard([GuardRule("a", "x"), GuardRule("a", "y")])


# ---------------------------------------------------------------- the judge stage


class CountingJudge:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.queries: list[JudgeQuery] = []

    def __call__(self, query: JudgeQuery) -> Any:
        self.queries.append(query)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_judge_is_asked_only_about_suspect_calls() -> None:
    judge = CountingJudge(JudgeVerdict(True, "reading a test to learn the API is fine"))
    guard = Guard(judge=judge)
    assert not guard.check(call("lookup(1)")).flagged
    assert guard.check(call('read("tests/expected.txt")')).stage == "rules"  # deny rules need no judge
    assert judge.queries == []
    verdict = guard.check(call('read("tests/test_io.py")'), context="task\n")
    assert (verdict.denied, verdict.judged, verdict.stage, verdict.rule) == (
        False,
        True,
        "judge",
        "test_files",
    )
    assert verdict.reason == "reading a test to learn the API is fine"
    assert verdict.judge_seconds >= 0.0 and "judge_seconds" in verdict.info()
    [query] = judge.queries
    assert (query.tool, query.arguments, query.rules, query.context) == (
        "read",
        {},
        ("test_files",),
        "task\n",
    )
    assert query.call_text == 'read("tests/test_io.py")'


@pytest.mark.parametrize(
    ("answer", "denied", "reason"),
    [
        (True, False, "allowed by judge"),
        (False, True, "denied by judge"),
        ((False, "peeks at tests"), True, "peeks at tests"),
        (JudgeVerdict(False, "nope"), True, "nope"),
        (RuntimeError("endpoint down"), True, "judge failed: RuntimeError: endpoint down"),
        ("allow", True, "judge failed: TypeError"),  # not a verdict: fail closed
    ],
)
def test_judge_answers_and_failures(answer: Any, denied: bool, reason: str) -> None:
    verdict = Guard(judge=CountingJudge(answer)).check(call('read("../x")'))
    assert verdict.denied is denied
    assert verdict.reason.startswith(reason)


@pytest.mark.parametrize(
    ("reply", "allow", "reason"),
    [
        ("ALLOW: ordinary work", True, "ordinary work"),
        ("deny: reads the expected output", False, "reads the expected output"),
        ("Verdict - DENY", False, "deny"),
        ("I am not sure", False, "unreadable judge reply"),
    ],
)
def test_parse_judge_reply(reply: str, allow: bool, reason: str) -> None:
    verdict = parse_judge_reply(reply)
    assert verdict.allow is allow
    assert verdict.reason.startswith(reason)


def test_model_judge_prompts_with_the_call_and_context() -> None:
    class Client:
        messages: list[dict[str, str]] = []

        def complete(self, messages: list[dict[str, str]]) -> str:
            Client.messages = messages
            return "DENY: hidden tests"

    query = JudgeQuery("read", {"path": "tests/t.py"}, 'read("tests/t.py")', ("test_files",), "find x\n")
    assert ModelJudge(Client())(query) == JudgeVerdict(False, "hidden tests")
    assert Client.messages == judge_messages(query)
    assert Client.messages[0]["role"] == "system"
    assert 'read("tests/t.py")' in Client.messages[1]["content"]
    assert "find x" in Client.messages[1]["content"] and "test_files" in Client.messages[1]["content"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_guard_never_raises_and_decides_consistently(argument: str) -> None:
    """Any argument text: the verdict is deterministic, and a call is denied iff a rule matched
    (no judge, suspect calls denied)."""
    guard = Guard()
    tool_call = ToolCall(name="read", arguments={"path": argument}, text=f"read({argument!r})")
    first, second = guard.check(tool_call), guard.check(tool_call)
    assert first == second
    assert first.denied == any(rule.matches(tool_call) for rule in DEFAULT_RULES) == first.flagged


# ---------------------------------------------------------------- inside ToolEnv


class VaultEnv(ToolEnv):
    """Answer the code; an honest ``probe`` reveals it in 2 calls, the leaked answer file in 1."""

    decoy_texts = {"not_found": "missing"}

    def start(self, row: dict[str, Any]) -> str:
        self.code = int(row["code"])
        self.reads = 0
        self.answered: int | None = None
        return "open the vault\n"

    def tools(self) -> dict[str, Any]:
        return {"read": self.read, "answer": self.answer}

    def read(self, path: str) -> str:
        """Read a file.

        Args:
            path: The file.
        """
        self.reads += 1
        if path == "answers/code.txt":
            return str(self.code)
        raise BadArguments("missing")

    def answer(self, code: int) -> str:
        """Open the vault.

        Args:
            code: The code.
        """
        self.answered = code
        return "done"

    def finished(self) -> bool:
        return self.answered is not None

    def outcome_reward(self) -> float:
        return float(self.answered == self.code)


def cheat(env: ToolEnv) -> tuple[list[Any], float]:
    """The cheating-only policy: read the leaked answer, answer what it said (or a guess)."""
    env.reset({"code": 4321}, seed=0)
    first = env.step('read("answers/code.txt")\n')
    seen = first.observation.removeprefix("= ").strip()
    last = env.step(f"answer({seen if seen.isdigit() else 0})\n")
    return [first, last], first.reward + last.reward


def test_unguarded_cheating_pays() -> None:
    steps, total = cheat(VaultEnv())
    assert total == 1.0 and "guard" not in steps[0].info


def test_a_policy_that_only_cheats_earns_nothing_under_the_guard() -> None:
    env = VaultEnv()
    env.guard = Guard()
    steps, total = cheat(env)
    assert total == 0.0
    assert env.reads == 0  # the denied call never ran
    assert steps[0].observation == "= missing\n"  # the environment's own wording: indistinguishable
    assert steps[0].done is False  # the episode went on
    assert steps[0].info["guard"] == {
        "denied": True,
        "stage": "rules",
        "rule": "hidden_answer",
        "reason": "rule hidden_answer",
    }
    assert steps[1].info["guard"] == {"denied": False}


def test_decoy_choices_and_penalty_on_the_denied_turn() -> None:
    env = VaultEnv()
    env.guard = Guard(decoy="text", decoy_text="permission denied", penalty=0.5)
    steps, total = cheat(env)
    assert steps[0].observation == "= permission denied\n"
    assert steps[0].reward == -0.5 and total == -0.5
    env.guard = Guard(decoy="empty")
    assert cheat(env)[0][0].observation == "= \n"
    env.guard = Guard(decoy="error")
    assert cheat(env)[0][0].observation == "= error: permission denied\n"


def test_audit_mode_runs_every_call_and_still_reports() -> None:
    env = VaultEnv()
    env.guard = Guard(enforce=False, penalty=1.0)
    steps, total = cheat(env)
    assert total == 1.0 and env.reads == 1  # nothing changed in the episode
    assert steps[0].info["guard"]["denied"] is True and steps[0].info["guard"]["enforced"] is False


def test_judge_sees_the_recent_episode() -> None:
    judge = CountingJudge(True)
    env = VaultEnv()
    env.guard = Guard([GuardRule("paths", "/", "suspect")], judge=judge)
    env.reset({"code": 1}, seed=0)
    env.step('read("a.txt")\n')
    env.step('read("dir/b.txt")\n')
    [query] = judge.queries
    assert query.context == 'open the vault\nread("a.txt")\n= missing\nread("dir/b.txt")\n'


def test_an_http_judge_decides_suspect_calls(chat_server: Any) -> None:
    """The judge stage against an OpenAI-compatible endpoint (a local server, no network)."""
    from posttrain.rewards.judge import HTTPChatClient

    judge = ModelJudge(HTTPChatClient(chat_server.base_url, "judge-model", timeout_s=5.0))
    env = VaultEnv()
    env.guard = Guard([GuardRule("answers", "answers/", "suspect")], judge=judge)
    chat_server.content = "DENY: reads the leaked answer"
    steps, total = cheat(env)
    assert total == 0.0 and env.reads == 0
    assert steps[0].info["guard"] == {
        "denied": True,
        "stage": "judge",
        "rule": "answers",
        "reason": "reads the leaked answer",
        "judge_seconds": steps[0].info["guard"]["judge_seconds"],
    }
    [request] = chat_server.requests  # only the suspect call reached the judge
    assert 'read("answers/code.txt")' in request["body"]["messages"][1]["content"]
    assert request["body"]["model"] == "judge-model"
    chat_server.content = "ALLOW: fine"
    assert cheat(env)[1] == 1.0 and env.reads == 1
    chat_server.status = 500  # a failing endpoint fails closed
    steps, total = cheat(env)
    assert total == 0.0 and steps[0].info["guard"]["reason"].startswith("judge failed: JudgeError")


def test_a_local_hf_judge_is_loaded_lazily_and_fails_closed_on_gibberish(tiny_model_dir: Any) -> None:
    """kind: hf, built from the config: the tiny model is not a judge, so its reply is unreadable
    and the suspect call is denied (a judge that cannot say ALLOW never lets a suspect call through)."""
    from posttrain.train.config import GuardConfig, JudgeConfig

    guard = GuardConfig(
        judge=JudgeConfig(kind="hf", model_path=str(tiny_model_dir), max_new_tokens=4)
    ).build()
    client = guard.judge.client
    assert not client.loaded
    assert not guard.check(call("lookup(3)")).flagged and not client.loaded  # no suspect call, no model
    verdict = guard.check(call('read("tests/test_x.py")'))
    assert client.loaded and verdict.judged and verdict.denied
    assert verdict.reason.startswith("unreadable judge reply")
