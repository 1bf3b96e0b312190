"""Asynchronous rollouts with bounded staleness: step k+1's samples are drawn while step k trains.

``AsyncCollector`` wraps a collector whose engine runs elsewhere (``scale/ray.py``'s workers). At the
collect of step k it launches, in background threads of the trainer, the collections of steps
k+1 .. k+L (their rows and seeds come from ``upcoming``), then returns step k's, launched earlier.
The workers generate while the trainer computes log-probs and updates; the reward functions (and an
environment's steps) run in the background thread when the generation comes back, so they overlap
training too, on the trainer's process.

Policy versions (PipelineRL, Piche et al. 2025; AReaL, Fu et al. 2025): the engine's ``version``
counts weight syncs, one per step. A rollout sampled with version v and trained on at version V has

    lag = V - v        (0: on-policy; L = ``max_policy_lag``: at most L updates old)

A launched collection records v when it submits its first generate (the trainer waits for that
submission, so which weights it gets is deterministic: calls to a Ray actor run in submission order).
A rollout older than L when its step comes is dropped and sampled again with the current weights.
L = 0 launches nothing ahead: every collect is the synchronous one.

Stale samples are off-policy. In async mode the engine stops claiming ``logprobs_match_policy``, so
the trainer recomputes old log-probs with the current weights (the proximal policy of decoupled PPO,
Hilton et al. 2022), and ``algo.rollout_correction`` reweights each token by the truncated
pi_old / pi_sampler (Yao et al. 2025); ``make_asynchronous`` warns when it is off.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from posttrain.rollout.collector import Collector, Rollout
from posttrain.rollout.engine import SamplingParams
from posttrain.scale.ray import RayRolloutEngine, VersionRecord

# upcoming(ahead) -> (rows, seed) of the step `ahead` steps after the one now collecting (0 = this
# one), or None past the last step
Upcoming = Callable[[int], "tuple[Sequence[dict[str, Any]], int] | None"]


def rows_key(rows: Sequence[dict[str, Any]], params: SamplingParams, group_size: int, seed: int) -> tuple:
    """What identifies one collection: its rows' contents, sampling settings, group size and seed."""
    return repr(list(rows)), repr(params), group_size, seed


@dataclass
class Pending:
    """A collection launched ahead of its step."""

    key: tuple
    future: Future[Rollout]
    record: VersionRecord


class AsyncCollector:
    """A ``Collector`` whose next L collections are generated while the trainer trains.

    ``collect`` is the same call as the wrapped collector's; what it returns carries, besides the
    collector's metrics, ``async/policy_lag`` (trainer version - sampling version), ``async/wait_s``
    (seconds the trainer waited for the rollout) and ``async/prefetched`` (1 when it was launched
    ahead). A collect that is not a training step's (an evaluation: its rows and seed are not
    ``upcoming(0)``'s) runs directly on the current weights and leaves the launched ones alone. The
    wrapped collector must allow concurrent ``collect`` calls (the single-turn and multi-turn ones
    keep no state between calls).
    """

    def __init__(
        self, inner: Collector, engine: RayRolloutEngine, upcoming: Upcoming, *, max_policy_lag: int
    ) -> None:
        if max_policy_lag < 0:
            raise ValueError(f"max_policy_lag must be >= 0, got {max_policy_lag}")
        self.inner = inner
        self.engine = engine
        self.upcoming = upcoming
        self.max_policy_lag = max_policy_lag
        if max_policy_lag > 0:  # the sampler's log-probs may come from older weights
            engine.logprobs_match_policy = False
        self.pending: deque[Pending] = deque()
        # L in flight plus the one whose result is being fetched
        self._threads = ThreadPoolExecutor(
            max_workers=max_policy_lag + 1, thread_name_prefix="posttrain-rollout"
        )

    @property
    def max_episode_actions(self) -> int:
        return self.inner.max_episode_actions

    @property
    def max_row_actions(self) -> int:
        return self.inner.max_row_actions

    def collect(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, *, group_size: int, seed: int
    ) -> Rollout:
        started = time.perf_counter()
        key = rows_key(rows, params, group_size, seed)
        now = self.upcoming(0)
        if now is None or rows_key(now[0], params, group_size, now[1]) != key:
            return self._tagged(self._direct(rows, params, group_size, seed), 0, started, prefetched=False)
        while self.pending and self.pending[0].key != key:  # launched for other steps: drop them
            self.pending.popleft().future.cancel()
        mine = self.pending.popleft() if self.pending else None
        if mine is not None and self._lag(mine) > self.max_policy_lag:
            mine.future.cancel()  # too stale by now: sample again with the current weights
            mine = None
        rollout = self._direct(rows, params, group_size, seed) if mine is None else None
        self._launch_ahead(params, group_size)  # queued behind this step's generation on the workers
        if mine is None:
            assert rollout is not None
            return self._tagged(rollout, 0, started, prefetched=False)
        lag = self._lag(mine)
        return self._tagged(mine.future.result(), lag, started, prefetched=True)

    def close(self) -> None:
        """Drop the collections launched ahead and stop the threads."""
        while self.pending:
            self.pending.popleft().future.cancel()
        self._threads.shutdown(wait=True)

    # ------------------------------------------------------------------------------ parts

    def _direct(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, group_size: int, seed: int
    ) -> Rollout:
        return self.inner.collect(rows, params, group_size=group_size, seed=seed)

    def _lag(self, pending: Pending) -> int:
        """Updates between the oldest weights the rollout sampled with and the trainer's now."""
        return self.engine.version - min(pending.record.versions, default=self.engine.version)

    def _launch_ahead(self, params: SamplingParams, group_size: int) -> None:
        """Launch the collections of the next ``max_policy_lag`` steps not launched yet, in order."""
        for ahead in range(len(self.pending) + 1, self.max_policy_lag + 1):
            step = self.upcoming(ahead)
            if step is None:  # past the last step: nothing to prepare
                return
            rows, seed = step
            record = VersionRecord()
            future = self._threads.submit(self._collect_recorded, record, rows, params, group_size, seed)
            # wait for its first generate to be submitted, so it samples from today's weights (not
            # from those of a sync the trainer would race it to)
            while not record.submitted.wait(0.005) and not future.done():
                pass
            self.pending.append(Pending(rows_key(rows, params, group_size, seed), future, record))

    def _collect_recorded(
        self,
        record: VersionRecord,
        rows: Sequence[dict[str, Any]],
        params: SamplingParams,
        group_size: int,
        seed: int,
    ) -> Rollout:
        with self.engine.recording(record):
            return self.inner.collect(rows, params, group_size=group_size, seed=seed)

    def _tagged(self, rollout: Rollout, lag: int, started: float, *, prefetched: bool) -> Rollout:
        metrics = dict(rollout.metrics)
        metrics["async/policy_lag"] = float(lag)
        metrics["async/wait_s"] = time.perf_counter() - started
        metrics["async/prefetched"] = float(prefetched)
        return Rollout(rollout.episodes, metrics, rollout.samples, rollout.generated_tokens)


def step_rows(state: Any, train_rows: list[dict[str, Any]]) -> Upcoming:
    """``upcoming`` for ``train.loop``'s stream of rows: rows and seed of the step ``ahead`` steps
    after the one ``rl_step`` is collecting, as the loop will draw them.

    At a training collect the loop has already advanced ``state.data_position`` past the current
    step's rows, and ``rl_step`` seeds step s with ``train.step.step_seed``.
    """
    from posttrain.train.loop import rows_for_step
    from posttrain.train.step import step_seed

    cfg = state.config
    count = cfg.rollout.prompts_per_step

    def upcoming(ahead: int) -> tuple[list[dict[str, Any]], int] | None:
        step = state.step + ahead
        start = state.data_position + (ahead - 1) * count
        if step >= cfg.optim.steps or start < 0:
            return None
        return rows_for_step(train_rows, start, count, cfg.run.seed), step_seed(cfg, step)

    return upcoming


def make_asynchronous(state: Any, train_rows: list[dict[str, Any]], *, max_policy_lag: int) -> AsyncCollector:
    """Wrap ``state.collector`` (whose engine must be ``state.engine``, a ``RayRolloutEngine``) so the
    next ``max_policy_lag`` steps' rollouts are generated while a step trains; returns the wrapper,
    now ``state.collector``. Warns when stale rollouts would go uncorrected."""
    from posttrain.train.watch import warn_once

    engine = state.engine
    if not isinstance(engine, RayRolloutEngine):
        raise TypeError(
            f"asynchronous rollouts need the Ray rollout engine (scale.ray), got {type(engine).__name__}: "
            "the in-process engine samples on the trainer's own cores and weights"
        )
    if getattr(state.collector, "engine", None) is not state.engine:
        raise ValueError("state.collector must sample with state.engine")
    if max_policy_lag > 0 and state.config.algo.rollout_correction is None:
        warn_once(
            "async_uncorrected",
            f"max_policy_lag={max_policy_lag}: rollouts up to {max_policy_lag} update(s) old are trained on "
            "without algo.rollout_correction, so their gradient is biased; set algo.rollout_correction="
            "{mode: truncate} (truncated importance weights pi_old / pi_sampler)",
        )
    state.collector = AsyncCollector(
        state.collector, engine, step_rows(state, train_rows), max_policy_lag=max_policy_lag
    )
    return state.collector
