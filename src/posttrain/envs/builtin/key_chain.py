"""``key_chain``: a long-horizon tool-use task small enough for a ~1M-parameter model to learn.

A row hides a chain of distinct 3-digit keys ``k0 -> k1 -> ... -> kH``. The policy starts from ``k0``
and follows the chain with ``lookup``; when the successor is the last key the observation carries
``end``, and ``answer`` with that key solves the task (outcome reward 1.0, else 0.0). A perfect policy
makes ``H`` lookups and one answer. The plain-style transcript (one call per turn):

    find the end of chain 482
    lookup(482)
    = 915
    lookup(915)
    = 103
    lookup(103)
    = 517 end
    answer(517)

Looking up a key that is not in the chain, or the last key, or a non-integer shows ``= no such key``;
any other mistake shows an ``= error: ...`` line (see ``posttrain.envs.tools``); neither ends the
episode. ``summary()`` reads ``so far: <n> lookups, last key <k>`` (``<n>`` counts every lookup call
that ran, ``<k>`` is the furthest key reached along the chain, followed by `` end`` once it is the last
key), e.g. ``so far: 7 lookups, last key 915``; after compaction the policy sees the prompt line, the
summary line and the most recent turns.

``demonstrate`` is a scripted *sloppy demonstrator* for a supervised warm-start: it follows the chain
correctly except that, with probability ``flawed_fraction``, it answers a non-final key that starts
with ``9`` instead of looking it up, which leaves RL a systematic error to fix.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.envs.base import SUMMARY_REQUEST
from posttrain.envs.tools import BadArguments, ToolEnv

__all__ = [
    "DEFAULT_OPTIONS",
    "KEYS",
    "KeyChainEnv",
    "check_horizons",
    "demonstrate",
    "play_demonstrator",
    "sample_row",
    "transcript_corpus",
]

KEYS = range(100, 1000)
MAX_HORIZON = 200
DEFAULT_OPTIONS: dict[str, Any] = {"min_horizon": 4, "max_horizon": 4}
NO_SUCH_KEY = "no such key"

_PROMPT = re.compile(r"find the end of chain (\d+)$")
# the environment's summary, or one the policy writes when asked (compaction: policy)
_SUMMARY = re.compile(r"(?:so far: \d+ lookups, )?last key (\d+)( end)?$")
_FOUND = re.compile(r"= (\d+)( end)?$")


class KeyChainEnv(ToolEnv):
    """The key-chain environment; deterministic given the row.

    ``step_reward`` is paid on each lookup that reaches a key further along the chain than any before
    (0 keeps only the sparse end reward).
    """

    def __init__(self, call_style: str = "plain", step_reward: float = 0.0) -> None:
        super().__init__(call_style)
        self.step_reward = float(step_reward)
        self.chain: list[int] = []
        self.successor: dict[int, int] = {}
        self.position: dict[int, int] = {}
        self.reached = 0
        self.lookups = 0
        self.answered: Any = None

    def start(self, row: Mapping[str, Any]) -> str:
        """Check the row and start at ``k0``; the first observation is the prompt line."""
        chain = [int(k) for k in row["chain"]]
        horizon = int(row["horizon"])
        if horizon < 1 or len(chain) != horizon + 1 or len(set(chain)) != len(chain):
            raise ValueError(f"key_chain row needs horizon >= 1 and {horizon + 1} distinct keys: {row!r}")
        if str(row["answer"]) != str(chain[-1]):
            raise ValueError(
                f"key_chain row answer {row['answer']!r} is not the chain's last key {chain[-1]}"
            )
        self.chain = chain
        self.successor = dict(zip(chain[:-1], chain[1:]))
        self.position = {k: i for i, k in enumerate(chain)}
        self.reached = 0
        self.lookups = 0
        self.answered = None
        return f"{row['prompt']}\n"

    def tools(self) -> dict[str, Callable[..., Any]]:
        """``lookup`` and ``answer``."""
        return {"lookup": self.lookup, "answer": self.answer}

    def lookup(self, key: int) -> str:
        """Follow the chain one link from a key.

        Args:
            key: A key of the chain, e.g. the starting key or the last one looked up.

        Returns:
            The next key, followed by " end" when it is the last key of the chain.
        """
        self.lookups += 1
        if isinstance(key, bool) or not isinstance(key, int) or key not in self.successor:
            raise BadArguments(NO_SUCH_KEY)
        nxt = self.successor[key]
        position = self.position[nxt]
        if position > self.reached:
            self.reached = position
            self.credit(self.step_reward)
        return f"{nxt} end" if position == len(self.chain) - 1 else str(nxt)

    def answer(self, key: int) -> str:
        """Give the last key of the chain; this ends the episode.

        Args:
            key: The key that the lookups reported with "end".
        """
        self.answered = key
        return "done"

    def finished(self) -> bool:
        """The episode ends with the first ``answer`` call."""
        return self.answered is not None

    def outcome_reward(self) -> float:
        """1.0 if the answer is the chain's last key, else 0.0."""
        return 1.0 if str(self.answered) == str(self.chain[-1]) else 0.0

    def step_info(self) -> dict[str, Any]:
        """Progress along the chain, for metrics."""
        solved = self.finished() and self.outcome_reward() == 1.0
        return {"reached": self.reached, "horizon": len(self.chain) - 1, "success": solved}

    @staticmethod
    def demonstrate(context: str, rng: random.Random, flawed_fraction: float) -> str:
        """The scripted sloppy demonstrator (``key_chain.demonstrate``), used by the warm-start."""
        return demonstrate(context, rng, flawed_fraction)

    def summary(self) -> str:
        """``so far: <n> lookups, last key <k>[ end]`` (see the module docstring)."""
        end = " end" if self.reached == len(self.chain) - 1 else ""
        return f"so far: {self.lookups} lookups, last key {self.chain[self.reached]}{end}"


def check_horizons(min_horizon: Any, max_horizon: Any) -> None:
    """Raise ValueError unless ``1 <= min_horizon <= max_horizon <= MAX_HORIZON`` (integers)."""
    integers = isinstance(min_horizon, int) and isinstance(max_horizon, int)
    if not (integers and 1 <= min_horizon <= max_horizon <= MAX_HORIZON):
        raise ValueError(
            f"key_chain needs integers 1 <= min_horizon <= max_horizon <= {MAX_HORIZON}; "
            f"got min_horizon={min_horizon!r}, max_horizon={max_horizon!r}"
        )


def sample_row(rng: random.Random, *, min_horizon: int, max_horizon: int) -> dict[str, Any]:
    """A random task row: ``prompt``, ``answer``, ``chain`` (``k0..kH``) and ``horizon`` ``H``, with
    ``H`` uniform in ``[min_horizon, max_horizon]``."""
    check_horizons(min_horizon, max_horizon)
    horizon = rng.randint(min_horizon, max_horizon)
    chain = rng.sample(KEYS, horizon + 1)
    return {
        "prompt": f"find the end of chain {chain[0]}",
        "answer": str(chain[-1]),
        "chain": chain,
        "horizon": horizon,
    }


def _latest_key(context: str) -> tuple[str, bool]:
    """The most recent valid key in a plain-style ``context`` (from the prompt, a summary or a
    lookup result) and whether it was marked ``end``; error observations are skipped."""
    latest: tuple[str, bool] | None = None
    for line in context.splitlines():
        line = line.strip()
        match = _PROMPT.match(line) or _SUMMARY.match(line) or _FOUND.match(line)
        if match:
            latest = (match.group(1), match.re is not _PROMPT and match.group(2) is not None)
    if latest is None:
        raise ValueError(f"no key_chain task in context: {context[:80]!r}")
    return latest


def demonstrate(context: str, rng: random.Random, flawed_fraction: float) -> str:
    """The sloppy demonstrator's next action for the plain-style ``context`` the policy sees (prompt,
    maybe a summary line, then turns): ``answer(k)`` after an ``end``, else ``lookup(k)`` of the latest
    key (so it retries after an error) -- except that a key starting with ``9`` is answered instead
    of looked up with probability ``flawed_fraction``."""
    if not 0.0 <= flawed_fraction <= 1.0:
        raise ValueError(f"flawed_fraction must be in [0, 1], got {flawed_fraction}")
    key, end = _latest_key(context)
    if context.rstrip("\n").endswith(SUMMARY_REQUEST):  # asked for its own summary (policy compaction)
        return f"last key {key}{' end' if end else ''}\n"
    if end or (key.startswith("9") and rng.random() < flawed_fraction):
        return f"answer({key})\n"
    return f"lookup({key})\n"


def play_demonstrator(
    row: Mapping[str, Any],
    rng: random.Random,
    flawed_fraction: float,
    *,
    compact_every: int = 0,
    keep_turns: int = 1,
) -> tuple[list[str], float]:
    """Run ``demonstrate`` on ``row`` to the end and return the plain-style texts (one per sub-trace)
    with the summed reward. With ``compact_every > 0`` the context is compacted after every that many
    turns to prompt line + summary line + the last ``keep_turns`` turns, as the collector does."""
    if compact_every < 0 or keep_turns < 0:
        raise ValueError(f"compact_every and keep_turns must be >= 0, got {compact_every}, {keep_turns}")
    env = KeyChainEnv()
    prompt = env.reset(row, seed=0)
    texts: list[str] = []
    context, turns, total, done = prompt, [], 0.0, False
    while not done:
        action = demonstrate(context, rng, flawed_fraction)
        result = env.step(action)
        turns.append(action + result.observation)
        context += turns[-1]
        total += result.reward
        done = result.done
        if compact_every and not done and len(turns) % compact_every == 0:
            texts.append(context)
            recent = turns[max(0, len(turns) - keep_turns) :] if keep_turns else []
            context = prompt + env.summary() + "\n" + "".join(recent)
    texts.append(context)
    return texts, total


def transcript_corpus(rows: list[Mapping[str, Any]]) -> list[str]:
    """Example texts for training a tiny tokenizer: each row's full transcript, a compacted sub-trace
    (prompt, summary, last turn and what follows) and an error turn, so every word the task uses appears."""
    rng = random.Random(0)
    texts: list[str] = []
    for row in rows:
        texts += play_demonstrator(row, rng, 0.0)[0]
        texts += play_demonstrator(row, rng, 0.0, compact_every=1, keep_turns=1)[0][1:2]
        texts.append(f"{row['prompt']}\nlookup({row['answer']})\n= {NO_SUCH_KEY}\n")
    return texts
