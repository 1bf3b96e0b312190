"""Asynchronous rollouts: the lag bound, L = 0 is the synchronous run, lag-1 training with the
rollout correction, evaluations in between, and the warning for uncorrected stale rollouts."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("ray")

from posttrain.rollout.collector import Rollout
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.scale.asynchronous import AsyncCollector, make_asynchronous
from posttrain.scale.ray import VersionRecord
from posttrain.train.step import reuses_sampler_logprobs, sampling_params

pytestmark = pytest.mark.slow

CORRECTED = "algo.rollout_correction={mode: truncate, threshold: 2.0}"


def lags(history: list[dict]) -> list[float]:
    return [h["async/policy_lag"] for h in history]


def test_lag_one_prefetches_every_step_after_the_first(setup, kit, engine) -> None:
    state = kit.state("optim.steps=5", CORRECTED, engine=engine)
    collector = make_asynchronous(state, setup[1].train, max_policy_lag=1)
    assert not reuses_sampler_logprobs(state)  # stale samples: the trainer recomputes old log-probs
    history = kit.run_steps(state, 4)
    assert lags(history) == [0, 1, 1, 1]
    assert [h["async/prefetched"] for h in history] == [0, 1, 1, 1]
    assert all(h["async/wait_s"] >= 0 for h in history)
    # step 5's rollout was launched before step 4's sync, so it samples from the weights before it
    [ahead] = collector.pending
    assert ahead.record.versions == [engine.version - 1] and ahead.record.submitted.is_set()
    kit.run_steps(state, 1)
    assert not collector.pending  # nothing is prepared past the last step
    collector.close()


def test_lag_two_runs_two_steps_ahead_and_never_over(setup, kit, engine) -> None:
    state = kit.state("optim.steps=6", CORRECTED, engine=engine)
    make_asynchronous(state, setup[1].train, max_policy_lag=2)
    history = kit.run_steps(state, 5)
    assert lags(history) == [0, 1, 2, 2, 2]
    state.collector.close()


def test_a_rollout_staler_than_the_bound_is_sampled_again(setup, kit, engine) -> None:
    state = kit.state("optim.steps=4", CORRECTED, engine=engine)
    make_asynchronous(state, setup[1].train, max_policy_lag=1)
    first = kit.run_steps(state, 2)
    engine.sync_weights(state.policy)  # one more update than the pipeline planned for (e.g. a restore)
    late = kit.run_steps(state, 2)
    assert lags(first + late) == [0, 1, 0, 1]
    assert [h["async/prefetched"] for h in first + late] == [0, 1, 0, 1]
    state.collector.close()


def test_lag_zero_is_exactly_the_synchronous_run(setup, kit, engine) -> None:
    plain = kit.state("optim.steps=3", engine=engine)
    history_plain = kit.run_steps(plain, 3)
    weights_plain = {k: v.detach().clone() for k, v in plain.policy.named_parameters()}
    wrapped = kit.state("optim.steps=3", engine=engine)
    make_asynchronous(wrapped, setup[1].train, max_policy_lag=0)
    assert reuses_sampler_logprobs(wrapped)  # as synchronous as before
    history_wrapped = kit.run_steps(wrapped, 3)
    assert [h["samples"] for h in history_wrapped] == [h["samples"] for h in history_plain]
    assert lags(history_wrapped) == [0, 0, 0]
    for name, p in wrapped.policy.named_parameters():
        torch.testing.assert_close(p.detach(), weights_plain[name], atol=0, rtol=0, msg=name)
    wrapped.collector.close()


def test_lag_one_training_with_the_correction_is_finite(setup, kit, engine) -> None:
    state = kit.state("optim.steps=3", CORRECTED, engine=engine)
    make_asynchronous(state, setup[1].train, max_policy_lag=1)
    history = kit.run_steps(state, 3)
    for metrics in history:
        assert all(math.isfinite(v) for k, v in metrics.items() if k != "samples"), metrics
        assert "correction/rollout_is_mean" in metrics  # the truncated importance weights are on
    # from the second step on the samples are one update old: the trainer and sampler disagree
    assert history[0]["mismatch/logprob_abs_max"] < 1e-4
    assert history[1]["mismatch/logprob_abs_max"] > 1e-4
    state.collector.close()


def test_an_evaluation_between_steps_leaves_the_prepared_rollout(setup, kit, engine) -> None:
    state = kit.state("optim.steps=3", CORRECTED, engine=engine)
    collector = make_asynchronous(state, setup[1].train, max_policy_lag=1)
    kit.run_steps(state, 1)
    params = sampling_params(state.config, max_new_tokens=state.max_new_tokens, temperature=0.0)
    evaluation = collector.collect(setup[1].test[:2], params, group_size=1, seed=0)
    assert evaluation.metrics["async/prefetched"] == 0 and evaluation.metrics["async/policy_lag"] == 0
    assert len(evaluation.episodes) == 2 and len(collector.pending) == 1
    [after] = kit.run_steps(state, 1)
    assert after["async/prefetched"] == 1 and after["async/policy_lag"] == 1
    collector.close()


def test_uncorrected_stale_rollouts_are_warned_about(setup, kit, engine, capsys) -> None:
    make_asynchronous(kit.state(engine=engine), setup[1].train, max_policy_lag=1).close()
    assert "algo.rollout_correction" in capsys.readouterr().err
    make_asynchronous(kit.state(CORRECTED, engine=engine), setup[1].train, max_policy_lag=1).close()
    make_asynchronous(kit.state(engine=engine), setup[1].train, max_policy_lag=0).close()
    assert "algo.rollout_correction" not in capsys.readouterr().err


def test_asynchronous_rollouts_need_the_ray_engine(setup, kit) -> None:
    state = kit.state()
    assert isinstance(state.engine, HFRolloutEngine)
    with pytest.raises(TypeError, match="need the Ray rollout engine"):
        make_asynchronous(state, setup[1].train, max_policy_lag=1)
    with pytest.raises(ValueError, match="max_policy_lag must be >= 0"):
        AsyncCollector(state.collector, None, lambda ahead: None, max_policy_lag=-1)  # type: ignore[arg-type]


class SlowEngine:
    """A versioned engine whose generate takes ``seconds`` without using a core (a remote worker)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.version = 0
        self.logprobs_match_policy = True
        self.local = threading.local()

    @contextmanager
    def recording(self, record: VersionRecord) -> Iterator[VersionRecord]:
        self.local.record = record
        try:
            yield record
        finally:
            self.local.record = None

    def generate(self, prompt_ids, params, *, seed=None):
        record = getattr(self.local, "record", None)
        if record is not None:
            record.versions.append(self.version)
            record.submitted.set()
        time.sleep(self.seconds)
        return []


class EngineCollector:
    max_episode_actions = max_row_actions = 4

    def __init__(self, engine: SlowEngine) -> None:
        self.engine = engine

    def collect(self, rows, params, *, group_size, seed):
        started = time.perf_counter()
        self.engine.generate([[1]], params, seed=seed)
        return Rollout([], {"time/generate": time.perf_counter() - started})


def test_the_next_rollout_is_generated_while_the_trainer_trains() -> None:
    """Generation 0.5 s, training 0.6 s: the trainer waits for the first rollout only, and
    launching the next one returns as soon as it is submitted."""
    engine = SlowEngine(0.5)
    steps = [([{"prompt": str(k)}], k) for k in range(4)]
    position = {"step": 0}

    def upcoming(ahead: int):
        step = position["step"] + ahead
        return steps[step] if step < len(steps) else None

    collector = AsyncCollector(EngineCollector(engine), engine, upcoming, max_policy_lag=1)
    params = SamplingParams()
    waits = []
    for step, (rows, seed) in enumerate(steps):
        position["step"] = step
        started = time.perf_counter()
        rollout = collector.collect(rows, params, group_size=1, seed=seed)
        waits.append(time.perf_counter() - started)
        assert rollout.metrics["async/policy_lag"] == (step > 0)
        time.sleep(0.6)  # training
        engine.version += 1
    assert 0.5 <= waits[0] < 0.9  # the first rollout, then the launch of the second (not its end)
    assert max(waits[1:]) < 0.3, waits
    collector.close()
