"""Multi-turn collection against a text environment, with context compaction into sub-traces.

Every live episode advances together: each turn is one batched ``engine.generate`` call over all
unfinished episodes. A turn is the policy's text up to a stop string (the environment's, e.g. a
newline or ``</tool_call>``, plus ``rollout.stop``); its tokens are trainable actions (loss_mask 1)
and the environment's answer is appended as context (loss_mask 0: never trained on, skipped by GAE,
not counted by any aggregation). A turn's reward sits on the turn's last action token.

Compaction: a sub-trace may hold at most ``context_budget`` tokens. When the next observation plus
one more turn would not fit, the sub-trace is closed (``ended=False``) and a new one starts from the
task prompt, the environment's ``summary()`` and the last ``keep_turns`` turns verbatim (all
context). GAE then chains the sub-traces of the episode (``episode_ids`` + ``segment_index``) and
group estimators broadcast the episode's outcome to all of them. ``compaction="none"`` instead
truncates the episode when its context is full. ``compaction="policy"`` lets the policy write the
summary: when the context is nearly full the collector appends ``SUMMARY_REQUEST`` (context) and
the episode's next completion is its summary, trainable actions of the closing sub-trace (sampled
and trained in the context they were written in, so they get credit through GAE's bootstrap from
the next sub-trace, whose head holds the summary as context).

Limits: ``max_turns`` turns, ``max_episode_tokens`` policy-written tokens per episode (both end
the episode as truncated), ``max_tool_output_tokens`` per observation (cut, with a marker).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from posttrain.data.trace import Episode, Trace
from posttrain.envs.base import SUMMARY_REQUEST, EnvFactory, EnvStep, TextEnv
from posttrain.rollout.collector import Rollout, encode_prompt, fraction, mean, std
from posttrain.rollout.engine import Completion, RolloutEngine, SamplingParams

TRUNCATION_MARKER = " [...]\n"


# the chat template renders an action after this stand-in task; only what follows the action is used
_CHAT_TASK = [{"role": "user", "content": "task"}]


class EnvError(RuntimeError):
    """The environment itself failed (a bug in the environment, not a model mistake)."""


@dataclass(frozen=True)
class TurnLimits:
    """The collector's budgets; see the module docstring."""

    max_turns: int = 64
    max_episode_tokens: int = 1024
    max_tool_output_tokens: int = 32
    context_budget: int = 160
    compaction: Literal["rule", "policy", "none"] = "rule"
    keep_turns: int = 1


@dataclass
class _Turn:
    action_ids: list[int]
    observation_ids: list[int]


@dataclass
class _LiveEpisode:
    """One episode being collected: its closed sub-traces and the open one."""

    env: TextEnv
    episode_id: int
    group_id: int
    task_text: str
    tokens: list[int]
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    turns: list[_Turn] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    compacted_at: list[int] = field(default_factory=list)
    actions_written: int = 0
    finished: bool = False
    done: bool = False
    success: bool = False
    summarizing: bool = False  # the next completion is the policy's own summary (compaction: policy)

    def __post_init__(self) -> None:
        self.start_trace(self.tokens)

    def start_trace(self, context: Sequence[int]) -> None:
        """Open a sub-trace whose first tokens are ``context`` (not trainable)."""
        self.tokens = list(context)
        self.loss_mask = [0] * len(self.tokens)
        self.logprobs = [0.0] * len(self.tokens)
        self.rewards = [0.0] * len(self.tokens)

    def append(self, ids: Sequence[int], *, trainable: bool, logprobs: Sequence[float] | None = None) -> None:
        self.tokens.extend(ids)
        self.loss_mask.extend([int(trainable)] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.rewards.extend([0.0] * len(ids))

    @property
    def reward(self) -> float:
        """All rewards received so far (the turns' rewards, on the closed sub-traces)."""
        return sum(trace.reward_sum for trace in self.traces)

    def close_trace(self, *, ended: bool) -> None:
        self.traces.append(
            Trace(
                tokens=self.tokens,
                loss_mask=self.loss_mask,
                rollout_logprobs=self.logprobs,
                episode_id=self.episode_id,
                group_id=self.group_id,
                segment_index=len(self.traces),
                ended=ended,
                token_rewards=self.rewards,
            )
        )


class MultiTurnCollector:
    """Rows -> environment episodes, ``group_size`` per row, as compacted sub-traces.

    ``make_env`` builds one fresh environment per episode. ``accuracy`` is the share of episodes the
    environment reports as a success (``info["success"]`` of the final step; else a final-step
    reward >= 1).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        make_env: EnvFactory,
        limits: TurnLimits,
        max_new_tokens: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.make_env = make_env
        self.limits = limits
        probe = make_env()
        self.env_stop = tuple(getattr(probe, "stop_strings", ()))
        self.guarded = getattr(probe, "guard", None) is not None
        # a chat model sees its tools listed by its template and observations as tool messages
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        schemas = getattr(probe, "tool_schemas", None)
        self.tools = schemas() if self.chat and callable(schemas) else None
        self.chat_head = (
            tokenizer.apply_chat_template(
                _CHAT_TASK, tools=self.tools, add_generation_prompt=True, tokenize=False
            )
            if self.chat
            else ""
        )
        self.marker_ids = self._encode(TRUNCATION_MARKER)
        self.request_ids = self._encode(SUMMARY_REQUEST + "\n")
        self.max_row_actions = limits.context_budget
        self.max_episode_actions = min(limits.max_episode_tokens, limits.max_turns * max_new_tokens)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _context_ids(self, text: str) -> list[int]:
        """A sub-trace's opening context: the task (or task + summary) as the first user turn."""
        return encode_prompt(self.tokenizer, text, tools=self.tools)

    def _observation_ids(self, action: str, observation: str) -> list[int]:
        """Tokens that follow an action: the observation as plain text, or, for a chat model, what its
        template puts between the assistant's action and the next assistant turn (end of turn, a
        tool message holding the observation, the generation prompt)."""
        if not self.chat:
            return self._encode(observation)
        full = self.tokenizer.apply_chat_template(
            [*_CHAT_TASK, {"role": "assistant", "content": action}, {"role": "tool", "content": observation}],
            tools=self.tools,
            add_generation_prompt=True,
            tokenize=False,
        )
        # a template that does not render the action verbatim after its generation prompt: plain text
        if not full.startswith(self.chat_head + action):
            return self._encode(observation)
        return self._encode(str(full[len(self.chat_head) + len(action) :]))

    def collect(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, *, group_size: int, seed: int
    ) -> Rollout:
        params = replace(params, stop=tuple(dict.fromkeys(params.stop + self.env_stop)))
        live = [
            self._start(
                row,
                episode_id=index * group_size + g,
                group_id=index,
                seed=seed,
                turn_room=params.max_new_tokens,
            )
            for index, row in enumerate(rows)
            for g in range(group_size)
        ]
        generated = 0
        turn = 0
        generate_seconds = 0.0
        while active := [episode for episode in live if not episode.finished]:
            started = time.perf_counter()
            completions = self.engine.generate(
                [episode.tokens for episode in active], params, seed=(seed * 1_000_003 + turn) % 2**63
            )
            generate_seconds += time.perf_counter() - started
            for episode, completion in zip(active, completions, strict=True):
                take = self._take_summary if episode.summarizing else self._take_turn
                generated += take(episode, completion, params.max_new_tokens)
            turn += 1
        for episode in live:
            episode.close_trace(ended=episode.done)
        return Rollout(
            episodes=[Episode(traces=episode.traces) for episode in live],
            metrics={**self._metrics(live), "time/generate": generate_seconds},
            samples=[self._sample(episode) for episode in live],
            generated_tokens=generated,
        )

    def _start(
        self, row: dict[str, Any], *, episode_id: int, group_id: int, seed: int, turn_room: int
    ) -> _LiveEpisode:
        env = self.make_env()
        try:
            task_text = env.reset(row, seed=seed * 7919 + episode_id)
        except Exception as error:
            raise EnvError(
                f"{type(env).__name__}.reset failed with {type(error).__name__}: {error} "
                f"(row {str(row.get('prompt', row))[:80]!r})"
            ) from error
        tokens = self._context_ids(task_text)
        if len(tokens) + turn_room > self.limits.context_budget:
            raise ValueError(
                f"env.context_budget ({self.limits.context_budget}) cannot hold the task prompt "
                f"({len(tokens)} tokens) plus one turn ({turn_room} tokens): raise env.context_budget "
                "or lower data.max_new_tokens"
            )
        return _LiveEpisode(
            env=env, episode_id=episode_id, group_id=group_id, task_text=task_text, tokens=tokens
        )

    def _take_turn(self, episode: _LiveEpisode, completion: Completion, turn_room: int) -> int:
        """Append one action, step the environment, then append its observation (compacting first
        when the observation and one more turn would not fit). Returns the tokens written."""
        limits = self.limits
        action_ids, text = self._append_actions(episode, completion)
        step = self._step(episode, text)
        if action_ids:
            episode.rewards[-1] += step.reward
        observation_ids = self._observation_ids(text, step.observation)
        if len(observation_ids) > limits.max_tool_output_tokens:
            keep = max(limits.max_tool_output_tokens - len(self.marker_ids), 0)
            observation_ids = observation_ids[:keep] + self.marker_ids
        episode.turns.append(_Turn(list(action_ids), observation_ids))
        episode.log.append(
            {"action": text, "observation": step.observation, "reward": step.reward, **step.info}
        )
        out_of_budget = (
            len(episode.turns) >= limits.max_turns or episode.actions_written >= limits.max_episode_tokens
        )
        if step.done or out_of_budget:
            episode.finished, episode.done = True, step.done
            episode.success = bool(step.info.get("success", step.done and step.reward >= 1.0))
        elif (
            len(episode.tokens) + len(observation_ids) + turn_room + self._reserve(turn_room)
            <= limits.context_budget
        ):
            episode.append(observation_ids, trainable=False)
        elif limits.compaction == "policy":
            self._request_summary(episode, observation_ids, turn_room)
        else:
            self._compact(episode, turn_room, episode.env.summary())
        return len(action_ids)

    def _append_actions(self, episode: _LiveEpisode, completion: Completion) -> tuple[list[int], str]:
        """Append the sampled tokens as trainable actions, cut to the episode's remaining token
        budget; returns them and their text."""
        room = self.limits.max_episode_tokens - episode.actions_written
        ids = completion.completion_ids[:room]
        episode.append(ids, trainable=True, logprobs=completion.logprobs[:room])
        episode.actions_written += len(ids)
        if len(ids) == len(completion.completion_ids):
            return ids, completion.text
        return ids, str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _reserve(self, turn_room: int) -> int:
        """Room kept free for a summary request and the policy's summary (compaction: policy)."""
        return len(self.request_ids) + turn_room if self.limits.compaction == "policy" else 0

    def _request_summary(self, episode: _LiveEpisode, observation_ids: list[int], turn_room: int) -> None:
        """Append the observation (when it fits beside the summary) and the summary request; the
        episode's next completion is then its summary, a trainable action of this sub-trace."""
        budget = self.limits.context_budget
        if len(episode.tokens) + len(observation_ids) + len(self.request_ids) + turn_room <= budget:
            episode.append(observation_ids, trainable=False)
        episode.append(self.request_ids, trainable=False)
        episode.summarizing = True

    def _take_summary(self, episode: _LiveEpisode, completion: Completion, turn_room: int) -> int:
        """Append the policy's summary as actions, then compact with it. Returns the tokens written."""
        ids, text = self._append_actions(episode, completion)
        episode.summarizing = False
        episode.log.append({"summary": text})
        if episode.actions_written >= self.limits.max_episode_tokens:
            episode.finished = True
        else:
            self._compact(episode, turn_room, text.strip())
        return len(ids)

    def _step(self, episode: _LiveEpisode, action: str) -> EnvStep:
        try:
            return episode.env.step(action)
        except Exception as error:
            raise EnvError(
                f"{type(episode.env).__name__}.step failed with {type(error).__name__}: {error} on action "
                f"{action[:80]!r}; an environment must turn bad actions into observations, not raise"
            ) from error

    def _compact(self, episode: _LiveEpisode, turn_room: int, summary: str) -> None:
        """Close the open sub-trace; open the next from task + ``summary`` + the last turns that fit.

        With ``compaction="none"``, or when not even the task and summary leave room for a turn, the
        episode ends here as truncated instead.
        """
        budget = self.limits.context_budget
        head = self._context_ids(episode.task_text + summary + "\n")
        if self.limits.compaction == "none" or len(head) + turn_room > budget:
            episode.finished = True
            return
        kept = episode.turns[-self.limits.keep_turns :] if self.limits.keep_turns else []
        while (
            kept
            and len(head) + sum(len(t.action_ids) + len(t.observation_ids) for t in kept) + turn_room > budget
        ):
            kept = kept[1:]
        episode.close_trace(ended=False)
        episode.start_trace(head)
        for turn in kept:
            episode.append(turn.action_ids + turn.observation_ids, trainable=False)
        episode.compacted_at.append(len(episode.turns))

    def _metrics(self, episodes: list[_LiveEpisode]) -> dict[str, float]:
        rewards = [e.reward for e in episodes]
        turns = [len(e.turns) for e in episodes]
        errors = [entry.get("error") is not None for e in episodes for entry in e.log]
        guard = _guard_metrics([[entry["guard"] for entry in e.log if "guard" in entry] for e in episodes])
        return (guard if self.guarded else {}) | {
            "reward_mean": mean(rewards),
            "reward_std": std(rewards),
            "accuracy": fraction([e.success for e in episodes]),
            "response_length": mean([e.actions_written for e in episodes]),
            "truncated_fraction": fraction([not e.done for e in episodes]),
            "turns": mean(turns),
            "segments": mean([len(e.traces) for e in episodes]),
            "compacted_fraction": fraction([bool(e.compacted_at) for e in episodes]),
            "tool_error_rate": fraction(errors),
        }

    def _sample(self, episode: _LiveEpisode) -> dict[str, Any]:
        # each turn's log carries the environment's info, so an intercepted call shows its guard verdict
        return {
            "prompt": episode.task_text,
            "turns": episode.log,
            "compacted_after_turns": episode.compacted_at,
            "segments": len(episode.traces),
            "reward": episode.reward,
            "success": episode.success,
            "ended": episode.done,
        }


def _guard_metrics(verdicts_by_episode: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Per-step guard counts from the calls' ``info["guard"]`` (one list per episode): calls
    checked, flagged by rules, sent to the judge, denied (or, auditing, that would have been), the
    interception rate (denied / checked calls), the share of episodes with a denied call, and the
    judge's mean latency in seconds."""
    verdicts = [v for episode in verdicts_by_episode for v in episode]
    judged = [v["judge_seconds"] for v in verdicts if "judge_seconds" in v]
    denied = sum(bool(v.get("denied")) for v in verdicts)
    return {
        "guard_checked": float(len(verdicts)),
        "guard_flagged": float(sum("stage" in v for v in verdicts)),
        "guard_judged": float(len(judged)),
        "guard_denied": float(denied),
        "guard_interception_rate": denied / len(verdicts) if verdicts else 0.0,
        "guard_intercepted_episodes": fraction(
            [any(v.get("denied") for v in episode) for episode in verdicts_by_episode]
        ),
        "guard_judge_seconds": mean(judged),
    }
