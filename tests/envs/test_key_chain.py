"""The key_chain task: rows, the environment, its summary, and the sloppy demonstrator."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.envs.base import EnvStep, TextEnv
from posttrain.envs.builtin import (
    DEFAULT_OPTIONS,
    ENVS,
    KeyChainEnv,
    demonstrate,
    play_demonstrator,
    sample_row,
    transcript_corpus,
)

ROW: dict[str, Any] = {
    "prompt": "find the end of chain 482",
    "answer": "517",
    "chain": [482, 915, 103, 517],
    "horizon": 3,
}

TRANSCRIPT = """find the end of chain 482
lookup(482)
= 915
lookup(915)
= 103
lookup(103)
= 517 end
answer(517)
"""


def run_demonstrator(
    row: dict[str, Any], rng: random.Random, flawed_fraction: float, compact_every: int = 0, keep: int = 0
) -> tuple[float, list[str]]:
    """Play ``demonstrate`` against the env, compacting the context to prompt + summary + last ``keep``
    turns after every ``compact_every`` turns; return the total reward and the actions taken."""
    env = KeyChainEnv()
    prompt = env.reset(row, seed=11)
    context, turns, actions, total = prompt, [], [], 0.0
    for _ in range(2 * row["horizon"] + 2):
        action = demonstrate(context, rng, flawed_fraction)
        step = env.step(action)
        actions.append(action)
        turns.append(action + step.observation)
        total += step.reward
        if step.done:
            return total, actions
        if compact_every and len(turns) % compact_every == 0:
            context = prompt + env.summary() + "\n" + ("".join(turns[-keep:]) if keep else "")
        else:
            context += turns[-1]
    raise AssertionError(f"episode did not end: {actions}")


# ---------------------------------------------------------------- rows


def test_sample_row_shape() -> None:
    row = sample_row(random.Random(0), **DEFAULT_OPTIONS)
    assert row["horizon"] == 4 and len(row["chain"]) == 5
    assert row["prompt"] == f"find the end of chain {row['chain'][0]}"
    assert row["answer"] == str(row["chain"][-1])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), lo=st.integers(1, 200), span=st.integers(0, 200))
def test_sample_row_properties(seed: int, lo: int, span: int) -> None:
    hi = min(200, lo + span)
    row = sample_row(random.Random(seed), min_horizon=lo, max_horizon=hi)
    assert lo <= row["horizon"] <= hi
    assert len(row["chain"]) == row["horizon"] + 1 == len(set(row["chain"]))
    assert all(100 <= k <= 999 for k in row["chain"])
    assert row == sample_row(random.Random(seed), min_horizon=lo, max_horizon=hi)


@pytest.mark.parametrize(("lo", "hi"), [(0, 3), (5, 4), (1, 201), (-1, -1)])
def test_sample_row_rejects_bad_horizons(lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="1 <= min_horizon <= max_horizon <= 200"):
        sample_row(random.Random(0), min_horizon=lo, max_horizon=hi)


@pytest.mark.parametrize(
    "bad",
    [
        {**ROW, "horizon": 2},
        {**ROW, "chain": [482, 915, 482, 517]},
        {**ROW, "answer": "103"},
        {**ROW, "chain": [482], "horizon": 0},
    ],
)
def test_env_rejects_inconsistent_rows(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="key_chain row"):
        KeyChainEnv().reset(bad, seed=0)


# ---------------------------------------------------------------- the environment


def test_perfect_transcript_and_summaries() -> None:
    env = KeyChainEnv()
    assert isinstance(env, TextEnv)
    assert ENVS["key_chain"] is KeyChainEnv
    text = env.reset(ROW, seed=0)
    assert env.summary() == "so far: 0 lookups, last key 482"
    summaries = []
    for action in ["lookup(482)\n", "lookup(915)\n", "lookup(103)\n"]:
        step = env.step(action)
        assert step.reward == 0.0 and not step.done and step.info["error"] is None
        text += action + step.observation
        summaries.append(env.summary())
    final = env.step("answer(517)\n")
    assert final == EnvStep(
        "", 1.0, True, {"tool": "answer", "error": None, "reached": 3, "horizon": 3, "success": True}
    )
    assert text + "answer(517)\n" == TRANSCRIPT
    assert summaries == [
        "so far: 1 lookups, last key 915",
        "so far: 2 lookups, last key 103",
        "so far: 3 lookups, last key 517 end",
    ]


def test_mistakes_are_observations_and_the_episode_goes_on() -> None:
    env = KeyChainEnv()
    env.reset(ROW, seed=0)
    observations = {
        "lookup(999)\n": ("= no such key\n", "bad_arguments"),
        "lookup(517)\n": ("= no such key\n", "bad_arguments"),
        "lookup('482')\n": ("= no such key\n", "bad_arguments"),
        "lookup(True)\n": ("= no such key\n", "bad_arguments"),
        "lookpu(482)\n": ("= error: unknown tool 'lookpu'; tools: answer, lookup\n", "unknown_tool"),
        "lookup(482, 1)\n": (
            "= error: bad arguments for lookup: too many positional arguments\n",
            "bad_arguments",
        ),
        "lookup(482\n": ("= error: malformed call: invalid syntax\n", "malformed"),
        "the end is near\n": ("= error: no tool call\n", "no_call"),
    }
    for action, (observation, kind) in observations.items():
        step = env.step(action)
        assert (step.observation, step.info["error"], step.done, step.reward) == (
            observation,
            kind,
            False,
            0.0,
        )
    assert env.summary() == "so far: 4 lookups, last key 482"
    assert env.step("lookup(key=482)\n").observation == "= 915\n"


def test_wrong_or_early_answer_scores_zero() -> None:
    env = KeyChainEnv()
    env.reset(ROW, seed=0)
    env.step("lookup(482)\n")
    assert env.step("answer(915)\n") == EnvStep(
        "", 0.0, True, {"tool": "answer", "error": None, "reached": 1, "horizon": 3, "success": False}
    )
    env.reset(ROW, seed=0)
    assert env.step("answer('517')\n").reward == 1.0  # the key as a string counts too


def test_step_reward_pays_once_per_new_advance() -> None:
    env = KeyChainEnv(step_reward=0.5)
    env.reset(ROW, seed=0)
    actions = [
        "lookup(482)\n",
        "lookup(482)\n",
        "lookup(915)\n",
        "lookup(999)\n",
        "lookup(915)\n",
        "lookup(103)\n",
    ]
    assert [env.step(a).reward for a in actions] == [0.5, 0.0, 0.5, 0.0, 0.0, 0.5]
    assert env.step("answer(517)\n").reward == 1.0


def test_jumping_ahead_counts_as_one_advance() -> None:
    env = KeyChainEnv(step_reward=0.5)
    env.reset(ROW, seed=0)
    assert env.step("lookup(915)\n").reward == 0.5  # a guessed key: reveals k2
    assert env.summary() == "so far: 1 lookups, last key 103"
    assert env.step("lookup(482)\n").reward == 0.0  # k1 is behind the furthest key reached


def test_hermes_style() -> None:
    env = KeyChainEnv(call_style="hermes")
    env.reset(ROW, seed=0)
    step = env.step('<tool_call>{"name": "lookup", "arguments": {"key": 482}}</tool_call>')
    assert step.observation == "915"  # a chat template renders it as a tool message
    assert [s["function"]["name"] for s in env.tool_schemas()] == ["lookup", "answer"]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), env_seeds=st.tuples(st.integers(), st.integers()))
def test_deterministic_given_the_row(seed: int, env_seeds: tuple[int, int]) -> None:
    rng = random.Random(seed)
    row = sample_row(rng, min_horizon=1, max_horizon=8)
    keys = row["chain"] + [rng.randint(100, 999) for _ in range(4)]
    actions = [f"{rng.choice(['lookup', 'answer', 'lookpu'])}({rng.choice(keys)})\n" for _ in range(12)]

    def play(env_seed: int) -> list[tuple[EnvStep, str]]:
        env = KeyChainEnv(step_reward=0.1)
        out = [(EnvStep(env.reset(row, seed=env_seed)), env.summary())]
        for action in actions:
            out.append((env.step(action), env.summary()))
            if out[-1][0].done:
                break
        return out

    assert play(env_seeds[0]) == play(env_seeds[1])


# ---------------------------------------------------------------- the demonstrator


@pytest.mark.parametrize(("compact_every", "keep"), [(0, 0), (1, 0), (1, 1), (2, 2), (3, 0), (3, 1), (3, 2)])
def test_flawless_demonstrator_solves_every_horizon(compact_every: int, keep: int) -> None:
    rng = random.Random(compact_every * 10 + keep)
    for horizon in range(1, 41):
        row = sample_row(rng, min_horizon=horizon, max_horizon=horizon)
        total, actions = run_demonstrator(row, rng, 0.0, compact_every, keep)
        assert total == 1.0
        assert actions == [f"lookup({k})\n" for k in row["chain"][:-1]] + [f"answer({row['answer']})\n"]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), compact=st.sampled_from([(0, 0), (1, 0), (2, 1), (3, 2)]))
def test_fully_flawed_demonstrator_fails_exactly_on_9xx_keys(seed: int, compact: tuple[int, int]) -> None:
    rng = random.Random(seed)
    row = sample_row(rng, min_horizon=1, max_horizon=12)
    total, actions = run_demonstrator(row, rng, 1.0, *compact)
    early = [k for k in row["chain"][:-1] if str(k).startswith("9")]
    assert total == (0.0 if early else 1.0)
    if early:
        stop = row["chain"].index(early[0])
        assert actions == [f"lookup({k})\n" for k in row["chain"][:stop]] + [f"answer({early[0]})\n"]


def test_demonstrator_reads_errors_summaries_and_ends() -> None:
    rng = random.Random(0)
    after_error = (
        "find the end of chain 482\nlookup(482)\n= 915\nlookpu(915)\n= error: unknown tool 'lookpu'\n"
    )
    assert demonstrate(after_error, rng, 0.0) == "lookup(915)\n"
    assert demonstrate(after_error + "lookup(915)\n= no such key\n", rng, 0.0) == "lookup(915)\n"
    assert (
        demonstrate("find the end of chain 482\nso far: 5 lookups, last key 103\n", rng, 0.0)
        == "lookup(103)\n"
    )
    assert (
        demonstrate("find the end of chain 482\nso far: 3 lookups, last key 517 end\n", rng, 0.0)
        == "answer(517)\n"
    )
    assert demonstrate("find the end of chain 482\nlookup(482)\n= 915 end\n", rng, 0.0) == "answer(915)\n"
    assert demonstrate("find the end of chain 482\nlookup(482)\n= 915\n", rng, 1.0) == "answer(915)\n"
    assert demonstrate("find the end of chain 982\n", rng, 1.0) == "answer(982)\n"


def test_demonstrator_flaw_rate_and_bad_inputs() -> None:
    rng = random.Random(5)
    answers = sum(
        demonstrate("find the end of chain 482\nlookup(482)\n= 915\n", rng, 0.3) == "answer(915)\n"
        for _ in range(2000)
    )
    assert 500 < answers < 700  # 600 expected
    with pytest.raises(ValueError, match="flawed_fraction"):
        demonstrate(TRANSCRIPT, rng, 1.5)
    with pytest.raises(ValueError, match="no key_chain task"):
        demonstrate("hello\n", rng, 0.0)


def test_play_demonstrator_and_corpus() -> None:
    texts, total = play_demonstrator(ROW, random.Random(0), 0.0)
    assert (texts, total) == ([TRANSCRIPT], 1.0)
    texts, total = play_demonstrator(ROW, random.Random(0), 0.0, compact_every=2, keep_turns=1)
    assert total == 1.0
    assert texts == [
        "find the end of chain 482\nlookup(482)\n= 915\nlookup(915)\n= 103\n",
        "find the end of chain 482\nso far: 2 lookups, last key 103\nlookup(915)\n= 103\nlookup(103)\n= 517 end\nanswer(517)\n",
    ]
    corpus = "".join(transcript_corpus([ROW, sample_row(random.Random(1), min_horizon=1, max_horizon=1)]))
    assert TRANSCRIPT in corpus
    for word in ("so far:", "lookups, last key", "end\n", "= no such key\n"):
        assert word in corpus
