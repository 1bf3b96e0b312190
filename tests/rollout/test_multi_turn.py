"""MultiTurnCollector on the real key_chain environment: token layout, compaction, limits, tool errors,
lock-step batching, the HF engine's log-probs and collation into a Batch.

Token counts used below come from the module's tiny tokenizer (digits and newlines are single tokens):
prompt line ``find the end of chain 482\\n`` = 10, ``lookup(482)\\n`` = 7, ``= 915\\n`` = 6,
``= 517 end\\n`` = 7, ``answer(517)\\n`` = 7, summary line = 14 with a one-digit count, 16 for
``so far: 10 lookups, last key 113 end`` (``test_token_counts_used_below``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from posttrain.data.batch import collate_episodes
from posttrain.envs.base import EnvStep
from posttrain.envs.builtin.key_chain import KeyChainEnv, demonstrate, sample_row, transcript_corpus
from posttrain.models.forward import token_logprobs
from posttrain.models.load import load_policy
from posttrain.models.tiny import build_tiny_model
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine, pad_batch
from posttrain.rollout.multi_turn import EnvError, MultiTurnCollector, TurnLimits
from posttrain.rollout.scripted import ScriptedEngine

ROW: dict[str, Any] = {
    "prompt": "find the end of chain 482",
    "answer": "517",
    "chain": [482, 915, 103, 517],
    "horizon": 3,
}
TRANSCRIPT = (
    "find the end of chain 482\nlookup(482)\n= 915\nlookup(915)\n= 103\nlookup(103)\n= 517 end\nanswer(517)\n"
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any]:
    rng = random.Random(0)
    rows = [sample_row(rng, min_horizon=1, max_horizon=12) for _ in range(40)]
    folder = build_tiny_model(
        tmp_path_factory.mktemp("key_chain") / "model",
        transcript_corpus(rows),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return load_policy(folder)


@pytest.fixture(scope="module")
def tokenizer(policy: tuple[nn.Module, Any]) -> Any:
    return policy[1]


def enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def perfect(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, lambda context: demonstrate(context, random.Random(0), 0.0))


def chain_row(horizon: int, seed: int) -> dict[str, Any]:
    return sample_row(random.Random(seed), min_horizon=horizon, max_horizon=horizon)


def transcript(row: Mapping[str, Any]) -> str:
    """The perfect demonstrator's plain-style transcript, written out from the env's docstring."""
    chain, horizon = row["chain"], row["horizon"]
    text = f"{row['prompt']}\n"
    for i in range(horizon):
        end = " end" if i + 1 == horizon else ""
        text += f"lookup({chain[i]})\n= {chain[i + 1]}{end}\n"
    return text + f"answer({chain[-1]})\n"


def action_runs(loss_mask: list[int], tokens: list[int]) -> list[list[int]]:
    """The maximal runs of trainable tokens (one per policy turn)."""
    runs: list[list[int]] = []
    previous = 0
    for token, flag in zip(tokens, loss_mask):
        if flag and not previous:
            runs.append([])
        if flag:
            runs[-1].append(token)
        previous = flag
    return runs


def collector(
    tokenizer: Any,
    engine: Any,
    *,
    make_env: Callable[[], Any] = KeyChainEnv,
    max_new_tokens: int = 8,
    **limits: Any,
) -> MultiTurnCollector:
    return MultiTurnCollector(engine, tokenizer, make_env, TurnLimits(**limits), max_new_tokens)


def collect(
    col: MultiTurnCollector, rows: list[dict[str, Any]], *, max_new_tokens: int = 8, group_size: int = 1
):
    return col.collect(rows, SamplingParams(max_new_tokens=max_new_tokens), group_size=group_size, seed=0)


# ------------------------------------------------------------------ the perfect demonstrator


def test_token_counts_used_below(tokenizer: Any) -> None:
    assert len(enc(tokenizer, "find the end of chain 482\n")) == 10
    assert len(enc(tokenizer, "lookup(482)\n")) == 7
    assert len(enc(tokenizer, "= 915\n")) == 6 and len(enc(tokenizer, "= 517 end\n")) == 7
    assert len(enc(tokenizer, "answer(517)\n")) == 7
    assert len(enc(tokenizer, "so far: 4 lookups, last key 915\n")) == 14
    assert len(enc(tokenizer, "so far: 10 lookups, last key 113 end\n")) == 16
    assert "\n" in tokenizer.get_vocab() and not [t for t in tokenizer.get_vocab() if "\n" in t and t != "\n"]


def test_perfect_demonstrator_trace_layout_mask_and_reward(tokenizer: Any) -> None:
    rollout = collect(collector(tokenizer, perfect(tokenizer), context_budget=200), [ROW])
    (episode,) = rollout.episodes
    (trace,) = episode.traces
    assert tokenizer.decode(trace.tokens) == TRANSCRIPT
    pieces = [("find the end of chain 482\n", 0)]
    pieces += [("lookup(482)\n", 1), ("= 915\n", 0), ("lookup(915)\n", 1), ("= 103\n", 0)]
    pieces += [("lookup(103)\n", 1), ("= 517 end\n", 0), ("answer(517)\n", 1)]
    assert trace.tokens == [t for text, _ in pieces for t in enc(tokenizer, text)]
    assert trace.loss_mask == [flag for text, flag in pieces for _ in enc(tokenizer, text)]
    assert len(trace.tokens) == 10 + 2 * (7 + 6) + (7 + 7) + 7 and trace.num_actions == 4 * 7
    assert trace.rollout_logprobs == [0.0] * len(trace.tokens)
    assert trace.token_rewards == [0.0] * (len(trace.tokens) - 1) + [1.0] and trace.loss_mask[-1] == 1
    assert trace.ended and trace.segment_index == 0 and episode.total_reward == 1.0
    assert rollout.metrics["accuracy"] == 1.0 and rollout.metrics["turns"] == 4
    assert rollout.metrics["truncated_fraction"] == 0.0 and rollout.metrics["tool_error_rate"] == 0.0
    assert rollout.metrics["response_length"] == 28 and rollout.generated_tokens == 28
    sample = rollout.samples[0]
    assert [turn["action"] for turn in sample["turns"]] == [
        "lookup(482)\n",
        "lookup(915)\n",
        "lookup(103)\n",
        "answer(517)\n",
    ]
    assert sample["success"] and sample["ended"] and sample["reward"] == 1.0 and sample["segments"] == 1


def test_perfect_demonstrator_solves_every_row_with_horizon_plus_one_turns(tokenizer: Any) -> None:
    rows = [chain_row(horizon, seed) for seed, horizon in enumerate([1, 2, 5, 7])]
    rollout = collect(collector(tokenizer, perfect(tokenizer), context_budget=250), rows)
    for row, episode, sample in zip(rows, rollout.episodes, rollout.samples, strict=True):
        (trace,) = episode.traces
        assert tokenizer.decode(trace.tokens) == transcript(row)
        assert sample["success"] and len(sample["turns"]) == row["horizon"] + 1
        assert all(lp == 0.0 for lp in trace.rollout_logprobs)
    assert rollout.metrics["accuracy"] == 1.0 and rollout.metrics["reward_mean"] == 1.0
    assert rollout.metrics["turns"] == (2 + 3 + 6 + 8) / 4


# ------------------------------------------------------------------ compaction

# Budget 62, turn room 8, horizon 10 (a lookup turn is 7 + 6 = 13 tokens, 14 for the one reaching
# the end): the first sub-trace holds 10 + 3 * 13 = 49 tokens after three turns; turn 4 reaches 56 and
# 56 + 6 + 8 = 70 > 62, so it compacts (though the observation alone would fit: 62). A new sub-trace
# holds prompt + summary (24) + one kept turn (13) = 37, then one turn + observation (50), and the next
# turn reaches 57: every second turn compacts, the last time after the lookup that reaches the end
# (its summary says "end"; 26 + 14 = 40 tokens of context).
COMPACTED_AFTER = [4, 6, 8, 10]


def summary_at(row: Mapping[str, Any], turn: int) -> str:
    """What key_chain's summary reads after ``turn`` perfect lookups."""
    end = " end" if turn == row["horizon"] else ""
    return f"so far: {turn} lookups, last key {row['chain'][turn]}{end}"


def turn_text(row: Mapping[str, Any], turn: int) -> tuple[str, str]:
    """Action and observation of perfect turn ``turn`` (1-based, a lookup)."""
    chain = row["chain"]
    end = " end" if turn == row["horizon"] else ""
    return f"lookup({chain[turn - 1]})\n", f"= {chain[turn]}{end}\n"


def test_compaction_cuts_a_long_episode_into_budgeted_sub_traces(tokenizer: Any) -> None:
    row = chain_row(10, seed=3)
    col = collector(tokenizer, perfect(tokenizer), context_budget=62, keep_turns=1)
    rollout = collect(col, [row])
    traces = rollout.episodes[0].traces
    sample = rollout.samples[0]
    assert sample["compacted_after_turns"] == COMPACTED_AFTER
    assert sample["segments"] == len(traces) == len(COMPACTED_AFTER) + 1
    assert rollout.metrics["segments"] == 5 and rollout.metrics["compacted_fraction"] == 1.0
    assert [t.segment_index for t in traces] == [0, 1, 2, 3, 4]
    assert [t.ended for t in traces] == [False, False, False, False, True]
    assert all(len(t.tokens) <= 62 for t in traces)
    assert tokenizer.decode(traces[0].tokens) == transcript(row)[: len(tokenizer.decode(traces[0].tokens))]
    for trace, turn in zip(traces[1:], COMPACTED_AFTER, strict=True):
        head = enc(tokenizer, f"{row['prompt']}\n{summary_at(row, turn)}\n")
        kept = [t for text in turn_text(row, turn) for t in enc(tokenizer, text)]
        context = head + kept
        assert trace.tokens[: len(context)] == context
        assert trace.loss_mask[: len(context)] == [0] * len(context)
        assert trace.loss_mask[len(context)] == 1
    # every action is trained on exactly once, in order, though kept turns reappear as context
    actions = [tokenizer.decode(run) for t in traces for run in action_runs(t.loss_mask, t.tokens)]
    assert actions == [turn_text(row, i)[0] for i in range(1, 11)] + [f"answer({row['answer']})\n"]
    assert sample["success"] and rollout.metrics["accuracy"] == 1.0
    assert sum(t.reward_sum for t in traces) == 1.0 and traces[-1].token_rewards[-1] == 1.0


@pytest.mark.parametrize(
    ("keep_turns", "compacted_after", "kept"),
    [
        # no kept turns: contexts of 24, 24 and 26 tokens, so turns 4, 7 and 10 compact
        (0, [4, 7, 10], [0, 0, 0]),
        # three kept turns would need 24 + 3 * 13 + 8 = 71 > 60: two fit (50), so every turn from 4 on
        # compacts; after turn 10, 26 + 13 + 14 + 8 = 61 > 60 leaves room for one
        (3, [4, 5, 6, 7, 8, 9, 10], [2, 2, 2, 2, 2, 2, 1]),
    ],
)
def test_compaction_keeps_the_last_turns_that_fit(
    tokenizer: Any, keep_turns: int, compacted_after: list[int], kept: list[int]
) -> None:
    row = chain_row(10, seed=3)
    col = collector(tokenizer, perfect(tokenizer), context_budget=60, keep_turns=keep_turns)
    rollout = collect(col, [row])
    traces = rollout.episodes[0].traces
    assert rollout.samples[0]["compacted_after_turns"] == compacted_after
    for trace, turn, count in zip(traces[1:], compacted_after, kept, strict=True):
        context = enc(tokenizer, f"{row['prompt']}\n{summary_at(row, turn)}\n")
        for previous in range(turn - count + 1, turn + 1):
            context += [t for text in turn_text(row, previous) for t in enc(tokenizer, text)]
        assert trace.tokens[: len(context)] == context and sum(trace.loss_mask[: len(context)]) == 0
        assert trace.loss_mask[len(context)] == 1 and len(trace.tokens) <= 60
    assert rollout.samples[0]["success"]


def test_compaction_none_truncates_when_the_context_is_full(tokenizer: Any) -> None:
    row = chain_row(10, seed=3)
    rollout = collect(collector(tokenizer, perfect(tokenizer), context_budget=60, compaction="none"), [row])
    (trace,) = rollout.episodes[0].traces
    assert not trace.ended and len(rollout.samples[0]["turns"]) == 4
    assert len(trace.tokens) == 10 + 3 * 13 + 7  # the fourth observation is never appended
    assert trace.reward_sum == 0.0 and rollout.samples[0]["compacted_after_turns"] == []
    assert rollout.metrics["accuracy"] == 0.0 and rollout.metrics["truncated_fraction"] == 1.0


# ------------------------------------------------------------------ limits


def test_max_turns_truncates_the_episode(tokenizer: Any) -> None:
    rollout = collect(collector(tokenizer, perfect(tokenizer), max_turns=2), [ROW])
    (trace,) = rollout.episodes[0].traces
    assert tokenizer.decode(trace.tokens) == "find the end of chain 482\nlookup(482)\n= 915\nlookup(915)\n"
    assert not trace.ended and not rollout.samples[0]["success"] and not rollout.samples[0]["ended"]
    assert rollout.metrics["truncated_fraction"] == 1.0 and rollout.metrics["turns"] == 2


def test_max_episode_tokens_cuts_the_last_action_and_truncates(tokenizer: Any) -> None:
    col = collector(tokenizer, perfect(tokenizer), max_episode_tokens=10)
    assert col.max_episode_actions == 10 and col.max_row_actions == 160
    rollout = collect(col, [ROW])
    (trace,) = rollout.episodes[0].traces
    # 7 tokens of lookup(482)\n, then only 3 of lookup(915)\n: "lookup", "(", "9"
    assert tokenizer.decode(trace.tokens) == "find the end of chain 482\nlookup(482)\n= 915\nlookup(9"
    assert trace.num_actions == 10 and rollout.generated_tokens == 10 and not trace.ended
    assert rollout.samples[0]["turns"][1]["action"] == "lookup(9"
    assert rollout.samples[0]["turns"][1]["error"] == "malformed"


class LongOutputEnv:
    """A two-turn TextEnv whose first observation is 43 tokens long."""

    def reset(self, row: Mapping[str, Any], *, seed: int) -> str:
        self.turns = 0
        return f"{row['prompt']}\n"

    def step(self, action: str) -> EnvStep:
        self.turns += 1
        done = self.turns == 2
        observation = "" if done else "= " + "7" * 40 + "\n"
        return EnvStep(observation, reward=float(done), done=done, info={"success": done})

    def summary(self) -> str:
        return ""


def test_long_tool_output_is_cut_with_the_marker(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, lambda context: "lookup(482)\n")
    col = collector(tokenizer, engine, make_env=LongOutputEnv, max_tool_output_tokens=12, context_budget=100)
    assert col.env_stop == ()  # a plain TextEnv has no stop strings of its own
    rollout = collect(col, [ROW])
    (trace,) = rollout.episodes[0].traces
    # 12 tokens: "=", " ", "7", "7", "7" and the 7-token marker " [...]\n"
    observation = enc(tokenizer, "= 777") + enc(tokenizer, " [...]\n")
    assert len(observation) == 12
    action = enc(tokenizer, "lookup(482)\n")
    assert trace.tokens == enc(tokenizer, "find the end of chain 482\n") + action + observation + action
    assert tokenizer.decode(trace.tokens).endswith("\n= 777 [...]\nlookup(482)\n")
    assert trace.ended and rollout.metrics["accuracy"] == 1.0


def test_prompt_that_cannot_fit_one_turn_names_context_budget(tokenizer: Any) -> None:
    col = collector(tokenizer, perfect(tokenizer), context_budget=17)  # 10 + 8 > 17
    with pytest.raises(ValueError, match=r"env\.context_budget \(17\).*10 tokens"):
        collect(col, [ROW])
    assert collect(collector(tokenizer, perfect(tokenizer), context_budget=18, max_turns=1), [ROW]).episodes


# ------------------------------------------------------------------ model mistakes and env bugs


class CrashToolKeyChain(KeyChainEnv):
    """key_chain plus a tool that always raises."""

    def tools(self) -> dict[str, Callable[..., Any]]:
        return super().tools() | {"crash": self.crash}

    def crash(self, key: int) -> str:
        """Divide by zero.

        Args:
            key: Ignored.
        """
        return str(key // 0)


def garbage_then_demonstrator() -> Callable[[str], str]:
    """A policy for one episode: four bad calls, then the perfect demonstrator."""
    garbage = ["hello there\n", "lookup(482\n", "fetch(482)\n", "crash(1)\n"]
    return lambda context: garbage.pop(0) if garbage else demonstrate(context, random.Random(0), 0.0)


def test_malformed_unknown_and_raising_calls_become_observations(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, garbage_then_demonstrator())
    col = collector(
        tokenizer,
        engine,
        make_env=CrashToolKeyChain,
        max_new_tokens=12,
        context_budget=1000,
        max_tool_output_tokens=200,
    )
    rollout = collect(col, [ROW], max_new_tokens=12)
    turns = rollout.samples[0]["turns"]
    assert [t["error"] for t in turns] == ["no_call", "malformed", "unknown_tool", "tool_raised"] + [None] * 4
    assert [t["observation"] for t in turns[:4]] == [
        "= error: no tool call\n",
        "= error: malformed call: invalid syntax\n",
        "= error: unknown tool 'fetch'; tools: answer, crash, lookup\n",
        "= error: crash failed: ZeroDivisionError: integer division or modulo by zero\n",
    ]
    (trace,) = rollout.episodes[0].traces
    assert tokenizer.decode(trace.tokens) == (
        "find the end of chain 482\n" + "".join(t["action"] + t["observation"] for t in turns)
    )
    assert len(action_runs(trace.loss_mask, trace.tokens)) == 8
    assert rollout.samples[0]["success"] and rollout.metrics["tool_error_rate"] == 4 / 8


class StepRaisesEnv(KeyChainEnv):
    def step(self, action: str) -> EnvStep:
        raise KeyError("broken env")


class ResetRaisesEnv(KeyChainEnv):
    def start(self, row: Mapping[str, Any]) -> str:
        raise RuntimeError("cannot start")


def test_an_environment_that_raises_gives_env_error_naming_its_class(tokenizer: Any) -> None:
    with pytest.raises(EnvError, match=r"StepRaisesEnv\.step failed with KeyError.*'lookup\(482\)\\n'"):
        collect(collector(tokenizer, perfect(tokenizer), make_env=StepRaisesEnv), [ROW])
    with pytest.raises(EnvError, match=r"ResetRaisesEnv\.reset failed with RuntimeError: cannot start"):
        collect(collector(tokenizer, perfect(tokenizer), make_env=ResetRaisesEnv), [ROW])


# ------------------------------------------------------------------ lock-step batching


class CountingEngine:
    """Records the decoded first line (the task) of every context of every ``generate`` call."""

    def __init__(self, inner: ScriptedEngine, tokenizer: Any) -> None:
        self.inner = inner
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None):
        self.calls.append([self.tokenizer.decode(ids).splitlines()[0] for ids in prompt_ids])
        return self.inner.generate(prompt_ids, params, seed=seed)

    def sync_weights(self, model: nn.Module) -> None:
        pass


def test_live_episodes_advance_together_one_generate_call_per_turn(tokenizer: Any) -> None:
    rows = [chain_row(horizon, seed) for seed, horizon in enumerate([1, 3, 2])]  # 2, 4 and 3 turns
    engine = CountingEngine(perfect(tokenizer), tokenizer)
    rollout = collect(collector(tokenizer, engine, context_budget=200), rows, group_size=2)
    prompts = [row["prompt"] for row in rows]
    assert engine.calls == [
        [prompts[0], prompts[0], prompts[1], prompts[1], prompts[2], prompts[2]],
        [prompts[0], prompts[0], prompts[1], prompts[1], prompts[2], prompts[2]],
        [prompts[1], prompts[1], prompts[2], prompts[2]],
        [prompts[1], prompts[1]],
    ]
    assert [e.episode_id for e in rollout.episodes] == [0, 1, 2, 3, 4, 5]
    assert [e.group_id for e in rollout.episodes] == [0, 0, 1, 1, 2, 2]
    assert [s["prompt"] for s in rollout.samples] == [f"{p}\n" for p in prompts for _ in range(2)]
    assert [len(s["turns"]) for s in rollout.samples] == [2, 2, 4, 4, 3, 3]


# ------------------------------------------------------------------ the real HF engine


def test_hf_engine_turns_end_at_stop_strings_and_logprobs_match_the_policy(
    policy: tuple[nn.Module, Any],
) -> None:
    model, tokenizer = policy
    rows = [chain_row(horizon, seed) for seed, horizon in enumerate([2, 3, 4])]
    col = collector(
        tokenizer, HFRolloutEngine(model, tokenizer), max_new_tokens=10, max_turns=5, context_budget=80
    )
    assert col.env_stop == ("\n",)
    rollout = col.collect(rows, SamplingParams(max_new_tokens=10), group_size=2, seed=0)
    traces = [t for e in rollout.episodes for t in e.traces]
    assert len(rollout.episodes) == 6 and all(len(t.tokens) <= 80 for t in traces)
    runs = [run for t in traces for run in action_runs(t.loss_mask, t.tokens)]
    assert len(runs) == sum(len(s["turns"]) for s in rollout.samples)
    for run in runs:
        text = tokenizer.decode(run, skip_special_tokens=True)
        if "\n" in text:  # the turn ends at its first newline
            assert text.count("\n") == 1 and text.endswith("\n")
        else:  # or it ran out of tokens, or the policy ended it with EOS
            assert len(run) == 10 or run[-1] == tokenizer.eos_token_id
    assert any("\n" in tokenizer.decode(run) for run in runs)
    input_ids, attention_mask = pad_batch([t.tokens for t in traces], tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        expected, _ = token_logprobs(model.eval(), input_ids, attention_mask)
    for row, trace in enumerate(traces):
        mask = torch.tensor(trace.loss_mask, dtype=torch.bool)
        logprobs = torch.tensor(trace.rollout_logprobs)
        torch.testing.assert_close(
            logprobs[mask], expected[row, : len(trace.tokens)][mask], atol=1e-5, rtol=0
        )
        assert torch.all(logprobs[~mask] == 0) and torch.all(logprobs[mask] < 0)


# ------------------------------------------------------------------ collation


def test_collate_gives_one_row_per_sub_trace_in_episode_order(tokenizer: Any) -> None:
    rows = [chain_row(10, seed=3), chain_row(2, seed=4)]
    rollout = collect(collector(tokenizer, perfect(tokenizer), context_budget=60), rows)
    batch = collate_episodes(rollout.episodes, tokenizer.pad_token_id)
    traces = [t for e in rollout.episodes for t in e.traces]
    assert len(batch) == 5 + 1 == len(traces)
    assert batch.episode_ids.tolist() == [0, 0, 0, 0, 0, 1]
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 0, 1]
    assert batch.segment_index.tolist() == [0, 1, 2, 3, 4, 0]
    assert batch.ended.tolist() == [False, False, False, False, True, True]
    for row, trace in enumerate(traces):
        n = len(trace.tokens)
        assert batch.input_ids[row, :n].tolist() == trace.tokens
        assert batch.attention_mask[row].sum() == n
        assert batch.loss_mask[row, :n].tolist() == trace.loss_mask
    assert batch.token_rewards.sum(dim=1).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------ chat templates (hermes calls)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def hermes_policy(context: str) -> str:
    """Follow the chain from the tool messages of a chat transcript, in the hermes call style."""
    import json
    import re

    found = re.findall(r"tool:(\d+)( end)?", context)
    key, end = (found[-1][0], bool(found[-1][1])) if found else (re.search(r"chain (\d+)", context)[1], False)
    name, argument = ("answer", {"key": int(key)}) if end else ("lookup", {"key": int(key)})
    return f"<tool_call>{json.dumps({'name': name, 'arguments': argument})}</tool_call>"


def test_a_chat_model_sees_observations_as_tool_messages_of_its_template(tokenizer: Any) -> None:
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    limits = TurnLimits(context_budget=4096, max_tool_output_tokens=64)
    collector = MultiTurnCollector(
        ScriptedEngine(chat, hermes_policy), chat, lambda: KeyChainEnv(call_style="hermes"), limits, 120
    )
    assert collector.env_stop == ("</tool_call>",)
    rollout = collector.collect([ROW], SamplingParams(max_new_tokens=120), group_size=1, seed=0)
    [episode] = rollout.episodes
    [trace] = episode.traces
    assert rollout.metrics["accuracy"] == 1.0
    first_call = hermes_policy("find the end of chain 482")
    expected = (
        "<s>user:find the end of chain 482\n</s><s>assistant:"
        + first_call
        + "</s><s>tool:915</s><s>assistant:"
    )
    prefix = enc(chat, expected)
    assert trace.tokens[: len(prefix)] == prefix
    action = enc(chat, first_call)
    start = len(enc(chat, "<s>user:find the end of chain 482\n</s><s>assistant:"))
    # the action is trained on; the template's end-of-turn, tool message and next prompt are not
    assert trace.loss_mask[: len(prefix)] == [0] * start + [1] * len(action) + [0] * (
        len(prefix) - start - len(action)
    )


def test_policy_compaction_trains_the_summary_the_policy_writes(tokenizer: Any) -> None:
    """compaction="policy": the request is context, the summary is trainable in the closing
    sub-trace, and the next sub-trace opens with the task and that summary as context."""
    row = chain_row(9, seed=3)
    limits = TurnLimits(context_budget=72, compaction="policy", keep_turns=1)
    collector = MultiTurnCollector(perfect(tokenizer), tokenizer, KeyChainEnv, limits, 12)
    rollout = collector.collect([row], SamplingParams(max_new_tokens=12), group_size=1, seed=0)
    [episode] = rollout.episodes
    assert len(episode.traces) > 1 and rollout.metrics["accuracy"] == 1.0
    summaries = [entry["summary"] for entry in rollout.samples[0]["turns"] if "summary" in entry]
    assert len(summaries) == len(episode.traces) - 1
    request = enc(tokenizer, "summarize:\n")
    for closing, opening, summary in zip(episode.traces, episode.traces[1:], summaries, strict=False):
        written = enc(tokenizer, summary)
        assert summary.startswith("last key ")
        # the closing sub-trace ends with the request (context) and the summary (actions)
        assert closing.tokens[-len(written) - len(request) :] == request + written
        assert closing.loss_mask[-len(written) - len(request) :] == [0] * len(request) + [1] * len(written)
        assert len(closing.tokens) <= 72
        head = enc(tokenizer, f"{row['prompt']}\n{summary.strip()}\n")
        assert opening.tokens[: len(head)] == head and not any(opening.loss_mask[: len(head)])


def test_default_budget_compacts_chains_of_eleven_lookups_or_more(tokenizer: Any) -> None:
    """The threshold the README documents: at env.context_budget's default (160) a perfect policy
    fits 10 lookups in one context; 11 and more are compacted."""
    collector = MultiTurnCollector(perfect(tokenizer), tokenizer, KeyChainEnv, TurnLimits(), 12)
    for horizon, segments in ((10, 1), (11, 2), (30, 4)):
        rows = [chain_row(horizon, seed) for seed in range(3)]
        rollout = collector.collect(rows, SamplingParams(max_new_tokens=12), group_size=1, seed=0)
        assert [len(e.traces) for e in rollout.episodes] == [segments] * 3, horizon
        assert rollout.metrics["accuracy"] == 1.0
