"""Ray rollout workers as the engine role: same samples as the in-process engine, weight sync after
real updates, LoRA adapters, a dead worker, and the trainer itself in a Ray task."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("ray")

from posttrain.data.batch import collate_episodes
from posttrain.models.forward import token_logprobs
from posttrain.rollout.collector import encode_prompt
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.scale.ray import (
    RolloutWorkerError,
    chunk_bounds,
    chunk_seed,
    ray_engine,
    run_training_on_ray,
    state_to_send,
)
from posttrain.train.step import fill_old_ref_values, logprob_temperature, rl_step, sampling_params

pytestmark = pytest.mark.slow


def prompt_ids(setup: Any, state: Any, count: int = 6) -> list[list[int]]:
    return [encode_prompt(state.tokenizer, row["prompt"]) for row in setup[1].train[:count]]


def as_tuples(completions: list[Any]) -> list[tuple[list[int], str]]:
    return [(c.completion_ids, c.finish_reason) for c in completions]


def test_chunks_are_contiguous_balanced_and_seeded_apart() -> None:
    assert chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2)]  # no empty chunk for a worker
    assert chunk_seed(5, 0) == 5 and chunk_seed(None, 3) is None
    seeds = {chunk_seed(seed, index) for seed in range(4) for index in range(1, 4)}
    assert len(seeds) == 12 and not seeds & set(range(100))  # distinct, and none a neighbour step's seed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_worker_samples_what_the_in_process_engine_does(setup, kit, engine, temperature: float) -> None:
    state = kit.state(engine=engine)
    local = HFRolloutEngine(state.policy, state.tokenizer)
    prompts = prompt_ids(setup, state) * 2
    params = SamplingParams(max_new_tokens=state.max_new_tokens, temperature=temperature)
    remote = engine.generate(prompts, params, seed=7)
    here = local.generate(prompts, params, seed=7)
    assert as_tuples(remote) == as_tuples(here)
    assert [c.text for c in remote] == [c.text for c in here]
    for a, b in zip(remote, here):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert engine.generate(prompts, params, seed=7)[0].prompt_ids == prompts[0]


def test_two_workers_split_the_prompts_in_order(ray_session, setup, kit) -> None:
    state = kit.state()
    two = ray_engine(state.policy, state.tokenizer, setup[2], num_workers=2, cpus_per_worker=kit.worker_cpus)
    try:
        prompts = prompt_ids(setup, state, 5)
        greedy = SamplingParams(max_new_tokens=state.max_new_tokens, temperature=0.0)
        local = HFRolloutEngine(state.policy, state.tokenizer)
        assert as_tuples(two.generate(prompts, greedy)) == as_tuples(local.generate(prompts, greedy))
        params = SamplingParams(max_new_tokens=state.max_new_tokens)
        sampled = two.generate(prompts, params, seed=3)
        assert [c.prompt_ids for c in sampled] == prompts
        # worker 0 samples the first chunk (3 prompts) with the call's seed, as the in-process engine would
        assert as_tuples(sampled[:3]) == as_tuples(local.generate(prompts[:3], params, seed=3))
        assert as_tuples(two.generate(prompts, params, seed=3)) == as_tuples(sampled)
    finally:
        two.close()


def test_worker_logprobs_are_the_trainers_after_a_real_update(setup, kit, engine) -> None:
    """The claim behind ``logprobs_match_policy``: old log-probs recomputed by the trainer equal the
    worker's behaviour log-probs, also after an update and its sync."""
    state = kit.state("rollout.reuse_logprobs=false", "optim.lr=0.01", engine=engine)
    prompts = prompt_ids(setup, state)
    greedy = SamplingParams(max_new_tokens=state.max_new_tokens, temperature=0.0)
    before = engine.generate(prompts, greedy)
    version = engine.version
    rl_step(state, setup[1].train[:2])
    assert engine.version == version + 1
    engine.wait_synced()
    assert engine.loaded_versions() == [engine.version]
    after = engine.generate(prompts, greedy)
    changed = max(
        max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) for a, b in zip(before, after)
    )
    assert changed > 1e-4 or as_tuples(before) != as_tuples(after)  # sampled from the new weights
    # a rollout through the step's collector: the trainer's recomputed old log-probs match the worker's
    params = sampling_params(state.config, max_new_tokens=state.max_new_tokens)
    rollout = state.collector.collect(setup[1].train[2:4], params, group_size=4, seed=9)
    batch = collate_episodes(rollout.episodes, state.tokenizer.pad_token_id)
    fill_old_ref_values(state, batch, logprob_temperature(state.config))
    mask = batch.loss_mask > 0
    torch.testing.assert_close(batch.old_logprobs[mask], batch.rollout_logprobs[mask], atol=1e-5, rtol=0)
    fresh, _ = token_logprobs(state.policy, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(fresh[mask].detach(), batch.rollout_logprobs[mask], atol=1e-5, rtol=0)


def test_two_rl_steps_give_the_in_process_engines_weights(setup, kit, engine) -> None:
    here = kit.state()
    remote = kit.state(engine=engine)
    assert remote.engine.logprobs_match_policy  # the worker's log-probs serve as old ones, as here
    history_here = kit.run_steps(here, 2)
    history_remote = kit.run_steps(remote, 2)
    assert [h["samples"] for h in history_remote] == [h["samples"] for h in history_here]
    for (name, a), b in zip(here.policy.named_parameters(), remote.policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert any(h["reward_std"] > 0 for h in history_here)  # the steps did move the weights


def test_lora_workers_receive_only_the_adapters(ray_session, setup, kit) -> None:
    state = kit.state("model.lora={r: 4, alpha: 8}", "optim.lr=0.01", "rollout.reuse_logprobs=false")
    sent = state_to_send(state.policy, full=False)
    assert sent and all("lora_" in name for name in sent)
    lora = ray_engine(state.policy, state.tokenizer, setup[2], num_workers=1, cpus_per_worker=kit.worker_cpus)
    try:
        state.engine = state.collector.engine = lora
        rl_step(state, setup[1].train[:2])
        params = sampling_params(state.config, max_new_tokens=state.max_new_tokens)
        rollout = state.collector.collect(setup[1].train[2:4], params, group_size=4, seed=4)
        batch = collate_episodes(rollout.episodes, state.tokenizer.pad_token_id)
        fill_old_ref_values(state, batch, logprob_temperature(state.config))
        mask = batch.loss_mask > 0
        torch.testing.assert_close(batch.old_logprobs[mask], batch.rollout_logprobs[mask], atol=1e-5, rtol=0)
        # and the adapters moved: the reference (adapters off) no longer agrees with the sampler
        assert (batch.ref_logprobs[mask] - batch.rollout_logprobs[mask]).abs().max() > 1e-4
    finally:
        lora.close()


def test_a_worker_built_from_the_config_then_killed(ray_session, setup, kit) -> None:
    """Without a model folder the worker builds the network from the policy's config and gets every
    weight at the first sync; once killed, the engine names the dead worker."""
    import ray

    state = kit.state()
    doomed = ray_engine(state.policy, state.tokenizer, None, num_workers=1, cpus_per_worker=kit.worker_cpus)
    prompts = prompt_ids(setup, state, 4)
    greedy = SamplingParams(max_new_tokens=state.max_new_tokens, temperature=0.0)
    local = HFRolloutEngine(state.policy, state.tokenizer)
    assert as_tuples(doomed.generate(prompts, greedy)) == as_tuples(local.generate(prompts, greedy))
    ray.kill(doomed.workers[0])
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(RolloutWorkerError, match=r"rollout worker 0 of 1 \(Ray actor [0-9a-f]+\) died while"):
        doomed.generate(prompt_ids(setup, state, 2), params, seed=0)
    with pytest.raises(RolloutWorkerError, match="rollout worker 0 of 1"):
        doomed.sync_weights(state.policy)
        doomed.wait_synced()


def test_too_many_workers_for_the_local_session_fail_at_once(ray_session, setup, kit) -> None:
    state = kit.state()
    with pytest.raises(ValueError, match="do not fit the local Ray session's 2 CPUs"):
        ray_engine(state.policy, state.tokenizer, setup[2], num_workers=3)


def test_workers_that_would_wait_for_the_trainers_cpu_fail_at_once(ray_session, setup, kit) -> None:
    import ray

    state = kit.state()

    def start_two(policy: Any, tokenizer: Any, path: Any) -> str:  # a trainer task holding 1 of 2 CPUs
        try:
            ray_engine(policy, tokenizer, path, num_workers=2)
        except ValueError as error:
            return str(error)
        return "started"

    task = ray.remote(num_cpus=1)(start_two)
    message = ray.get(task.remote(state.policy, state.tokenizer, setup[2]))
    assert "do not fit the local Ray session's 2 CPUs, 1 of them held by the trainer" in message


def test_the_trainer_runs_in_a_ray_task(ray_session, setup, kit) -> None:
    cfg = kit.config("optim.steps=1", "run.name=on-ray")
    result = run_training_on_ray(cfg)
    assert result.run_dir.name == "on-ray" and (result.run_dir / "metrics.jsonl").is_file()
    assert [h["step"] for h in result.history if "reward_mean" in h] == [1]
