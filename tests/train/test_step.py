"""One RL step on a tiny warm-started Llama: rollout, shaping, advantages, the update, metrics."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import shutil

import pytest
import torch

from posttrain.algorithms.aggregate import token_weights
from posttrain.algorithms.kl import FixedKLController
from posttrain.data.batch import Batch, collate_episodes
from posttrain.data.trace import Episode, single_turn_trace
from posttrain.models.forward import token_logprobs
from posttrain.rewards.functions import RewardTerm
from posttrain.rollout.collector import encode_prompt
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import ConfigError, load_config
from posttrain.train.setup import build_state, build_task, embedded_model_path, seed_everything
from posttrain.train.step import (
    TrainState,
    compute_advantages,
    fill_old_ref_values,
    logprob_temperature,
    rl_step,
    sampling_params,
    shape_rewards,
    update,
)

SMALL = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=80",
    "warmstart.lr=0.003",
    "warmstart.batch_size=16",
    "data.num_train=32",
    "data.num_test=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "logging.tensorboard=false",
    "logging.progress=false",
]


def char_score(prompt: str, completion: str, **row) -> float:
    """A deterministic reward with spread inside a group (the tiny model rarely solves the task)."""
    return float(sum(map(ord, completion)) % 7) / 6.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(output dir, task, model path): a tiny Llama warm-started for a few steps, so that some
    completions end with EOS and rows have different lengths."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("step_runs")
    cfg = load_config(None, [*SMALL, f"run.output_dir={out}"])
    task = build_task(cfg)
    return out, task, embedded_model_path(cfg, task)


def make_config(setup, *extra: str):
    return load_config(None, [*SMALL, f"run.output_dir={setup[0]}", *extra])


def make_state(setup, *extra: str, reward=char_score) -> TrainState:
    _, task, path = setup
    cfg = make_config(setup, *extra)
    seed_everything(cfg.run.seed)  # the critic's fresh value head draws from the global RNG
    state = build_state(cfg, task, path)
    if reward is not None:
        terms = [RewardTerm(reward.__name__, reward, 1.0)]
        state.collector = SingleTurnCollector(state.engine, state.tokenizer, terms, state.max_new_tokens)
    return state


class _RecordingEngine:
    """Passes calls through to the engine and keeps the last completions, for inspection."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.completions = []

    def generate(self, prompt_ids, params, *, seed=None):
        self.completions = self.engine.generate(prompt_ids, params, seed=seed)
        return self.completions


def rollout(state: TrainState, rows: list[dict], seed: int):
    """What ``rl_step`` collects: (episodes, the engine's completions, metrics)."""
    recorder, engine = _RecordingEngine(state.engine), state.collector.engine
    state.collector.engine = recorder
    try:
        params = sampling_params(state.config, max_new_tokens=state.max_new_tokens)
        result = state.collector.collect(rows, params, group_size=state.config.rollout.group_size, seed=seed)
    finally:
        state.collector.engine = engine
    state.last_samples = result.samples
    return result.episodes, recorder.completions, result.metrics


def prompts_for(setup, state: TrainState) -> list[dict]:
    return setup[1].train[: state.config.rollout.prompts_per_step]


def use_sgd(state: TrainState, lr: float = 1.0) -> None:
    """Plain SGD so parameter updates are proportional to the gradient (AdamW's first step is
    nearly sign(grad): it would hide a wrongly scaled gradient)."""
    params = [p for p in state.policy.parameters() if p.requires_grad]
    state.actor.optimizer = torch.optim.SGD(params, lr=lr)
    state.actor.scheduler = None


def prepared_batch(state: TrainState, rows: list[dict], seed: int = 123) -> Batch:
    """rollout -> shaping -> collate -> old/ref/values -> advantages, as ``rl_step`` does."""
    episodes, _, _ = rollout(state, rows, seed)
    episodes, _ = shape_rewards(state, episodes)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    fill_old_ref_values(state, batch, logprob_temperature(state.config))
    compute_advantages(state, batch)
    return batch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def deltas(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach() - before[name] for name, p in module.named_parameters()}


# ------------------------------------------------------------------ small pure helpers


def test_logprob_temperature_is_the_sampling_one_and_one_for_greedy(setup) -> None:
    assert logprob_temperature(make_config(setup, "rollout.temperature=0")) == 1.0
    assert logprob_temperature(make_config(setup, "rollout.temperature=0.7")) == 0.7
    assert logprob_temperature(make_config(setup)) == 1.0


def test_sampling_params_follow_the_rollout_config(setup) -> None:
    cfg = make_config(setup, "rollout.temperature=0.5", "rollout.top_p=0.9", "rollout.top_k=7")
    assert sampling_params(cfg, max_new_tokens=11) == SamplingParams(
        max_new_tokens=11, temperature=0.5, top_p=0.9, top_k=7
    )
    cfg = make_config(setup, "rollout.stop=['!', '?']")
    assert sampling_params(cfg, max_new_tokens=3, temperature=0.0) == SamplingParams(
        max_new_tokens=3, temperature=0.0, stop=("!", "?")
    )


def test_encode_prompt_without_chat_template_is_the_plain_text(setup) -> None:
    tokenizer = make_state(setup).tokenizer
    assert not tokenizer.chat_template
    ids = encode_prompt(tokenizer, "12-3=")
    assert ids == tokenizer("12-3=", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids  # no special tokens added
    assert all(isinstance(i, int) for i in ids)


def test_encode_prompt_uses_the_chat_template_when_there_is_one(setup) -> None:
    tokenizer = copy.deepcopy(make_state(setup).tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    ids = encode_prompt(tokenizer, "12-3=")
    expected = tokenizer("<s>user:12-3=</s><s>assistant:", add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)


# ----------------------------------------------------------------------------- rollout


def test_rollout_gives_one_scored_episode_per_sample(setup) -> None:
    state = make_state(setup)
    rows = prompts_for(setup, state)
    episodes, completions, metrics = rollout(state, rows, seed=5)
    group = state.config.rollout.group_size
    assert len(episodes) == len(completions) == len(rows) * group
    assert [e.group_id for e in episodes] == [i // group for i in range(len(episodes))]
    assert [e.episode_id for e in episodes] == list(range(len(episodes)))
    rewards = [char_score("", c.text) for c in completions]
    for index, (episode, completion) in enumerate(zip(episodes, completions)):
        [trace] = episode.traces
        prompt = encode_prompt(state.tokenizer, rows[index // group]["prompt"])
        assert trace.tokens == prompt + completion.completion_ids
        assert trace.loss_mask == [0] * len(prompt) + [1] * len(completion.completion_ids)
        assert trace.rollout_logprobs[len(prompt) :] == completion.logprobs
        assert trace.ended == (completion.finish_reason == "stop")
        assert episode.reward == rewards[index]
    assert metrics["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert metrics["reward/char_score"] == pytest.approx(metrics["reward_mean"])
    assert metrics["accuracy"] == pytest.approx(sum(r >= 1.0 for r in rewards) / len(rewards))
    lengths = [len(c.completion_ids) for c in completions]
    assert metrics["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    truncated = [c.finish_reason == "length" for c in completions]
    assert metrics["truncated_fraction"] == pytest.approx(sum(truncated) / len(truncated))
    assert len(set(lengths)) > 1  # the warm-start taught it to stop (sometimes)
    samples = state.last_samples
    assert [s["completion"] for s in samples] == [c.text for c in completions]
    assert [s["row"]["answer"] for s in samples] == [rows[i // group]["answer"] for i in range(len(samples))]


def test_rollout_is_deterministic_in_the_seed(setup) -> None:
    state = make_state(setup)
    rows = prompts_for(setup, state)
    first = [c.completion_ids for c in rollout(state, rows, seed=11)[1]]
    again = [c.completion_ids for c in rollout(state, rows, seed=11)[1]]
    other = [c.completion_ids for c in rollout(state, rows, seed=12)[1]]
    assert first == again
    assert first != other


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_recomputed_old_logprobs_match_the_behaviour_logprobs(setup, temperature: float) -> None:
    state = make_state(
        setup,
        f"rollout.temperature={temperature}",
        "rollout.reuse_logprobs=false",
        "optim.micro_batch_size=3",
    )
    episodes, _, _ = rollout(state, prompts_for(setup, state), seed=3)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    fill_old_ref_values(state, batch, logprob_temperature(state.config))
    mask = batch.loss_mask > 0
    # the engine's log-probs come from the same forward at the same temperature (1 for greedy)
    torch.testing.assert_close(batch.old_logprobs[mask], batch.rollout_logprobs[mask], atol=1e-5, rtol=1e-5)
    assert (batch.old_logprobs[~batch.attention_mask.bool()] == 0).all()
    # the reference is a separate copy of the same starting weights
    torch.testing.assert_close(batch.ref_logprobs[mask], batch.old_logprobs[mask], atol=1e-5, rtol=1e-5)
    assert batch.values is None


def test_old_logprobs_reuse_the_engine_logprobs_by_default(setup) -> None:
    state = make_state(setup, "rollout.temperature=0.7")
    assert state.config.rollout.reuse_logprobs
    episodes, _, _ = rollout(state, prompts_for(setup, state), seed=3)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    fill_old_ref_values(state, batch, logprob_temperature(state.config))
    torch.testing.assert_close(batch.old_logprobs, batch.rollout_logprobs * batch.loss_mask, atol=0, rtol=0)
    # and they agree with what the policy gives now, at the sampling temperature
    fresh, _ = token_logprobs(state.policy, batch.input_ids, batch.attention_mask, temperature=0.7)
    mask = batch.loss_mask > 0
    torch.testing.assert_close(batch.old_logprobs[mask], fresh[mask].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.ref_logprobs[mask], fresh[mask].detach(), atol=1e-5, rtol=1e-5)


def test_critic_values_are_zero_off_the_loss_mask(setup) -> None:
    state = make_state(setup, "algorithm=ppo", "optim.micro_batch_size=3")
    episodes, _, _ = rollout(state, prompts_for(setup, state), seed=3)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    fill_old_ref_values(state, batch, 1.0)
    assert batch.values is not None and batch.values.shape == batch.loss_mask.shape
    assert (batch.values[batch.loss_mask == 0] == 0).all()
    assert (batch.values[batch.loss_mask > 0] != 0).any()


# ----------------------------------------------------------------------- shape_rewards


def _episodes(rewards: list[float], lengths: list[int], group_size: int) -> list[Episode]:
    episodes = []
    for index, (reward, length) in enumerate(zip(rewards, lengths)):
        trace = single_turn_trace(
            [5, 6],
            list(range(10, 10 + length)),
            [-1.0] * length,
            episode_id=index,
            group_id=index // group_size,
        )
        episodes.append(Episode(traces=[trace], reward=reward))
    return episodes


def test_dynamic_sampling_drops_zero_variance_groups(setup) -> None:
    state = make_state(setup, "algorithm=dapo")
    state.collector.max_episode_actions = 100  # no overlong penalty at these lengths
    # groups: {1, 1} all equal, {0, 1} mixed, {0, 0} all equal, {0.5, 0} mixed
    episodes = _episodes([1, 1, 0, 1, 0, 0, 0.5, 0], [3] * 8, group_size=2)
    kept, metrics = shape_rewards(state, episodes)
    assert [e.episode_id for e in kept] == [2, 3, 6, 7]
    assert metrics["zero_variance_groups"] == pytest.approx(0.5)
    assert metrics["overlong_penalty"] == 0.0


def test_dynamic_sampling_keeps_everything_when_every_group_is_flat(setup) -> None:
    state = make_state(setup, "algorithm=dapo")
    state.collector.max_episode_actions = 100
    kept, metrics = shape_rewards(state, _episodes([1, 1, 0, 0], [3] * 4, group_size=2))
    assert len(kept) == 4
    assert metrics["zero_variance_groups"] == 1.0


def test_without_dynamic_sampling_flat_groups_are_kept_but_counted(setup) -> None:
    state = make_state(setup, "algorithm=grpo")
    kept, metrics = shape_rewards(state, _episodes([1, 1, 0, 1], [3] * 4, group_size=2))
    assert len(kept) == 4
    assert metrics["zero_variance_groups"] == pytest.approx(0.5)
    assert "overlong_penalty" not in metrics
    assert [e.reward for e in kept] == [1, 1, 0, 1]


def test_overlong_shaping_hand_values(setup) -> None:
    state = make_state(setup, "algorithm=dapo", "optim.overlong_buffer=4", "algo.dynamic_sampling=false")
    state.collector.max_episode_actions = 8  # no penalty up to 8 - 4 = 4 tokens, then a ramp to -1 at 8
    episodes = _episodes([1.0, 1.0, 1.0, 1.0], [2, 4, 6, 8], group_size=4)
    kept, metrics = shape_rewards(state, episodes)
    assert [e.reward for e in kept] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert metrics["overlong_penalty"] == pytest.approx((0 + 0 - 0.5 - 1.0) / 4)
    # the shaped rewards differ inside the group, so the group is not zero-variance any more
    assert metrics["zero_variance_groups"] == 0.0


# ------------------------------------------------------------------ compute_advantages


def _hand_batch() -> Batch:
    """Two rows of one group; trainable tokens at columns 1-2 (row 0) and 1-3 (row 1)."""
    loss_mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    return Batch(
        input_ids=torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]),
        attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        loss_mask=loss_mask,
        rollout_logprobs=torch.zeros(2, 4),
        token_rewards=torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        group_ids=torch.tensor([0, 0]),
        episode_ids=torch.tensor([0, 1]),
        segment_index=torch.tensor([0, 0]),
        ended=torch.tensor([True, True]),
        old_logprobs=torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -1.0, -1.0, -1.0]]),
        ref_logprobs=torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, -1.0, -3.0]]),
    )


def test_kl_in_the_reward_is_subtracted_per_token_before_the_advantage(setup) -> None:
    state = make_state(setup, "algorithm=rloo")  # k1 estimator, KL placed in the reward
    state.kl_controller = FixedKLController(0.5)
    batch = _hand_batch()
    metrics = compute_advantages(state, batch)
    # k1 = old - ref on trainable tokens: row 0 [0.5, -1], row 1 [-0.5, 0, 2]
    expected_rewards = torch.tensor([[0.0, -0.25, 1.5, 0.0], [0.0, 0.25, 0.0, -1.0]])
    torch.testing.assert_close(batch.token_rewards, expected_rewards)
    # episode scores 1.25 and -0.75; leave-one-out: A = 2 / 1 * (s - 0.25) = +2 and -2
    expected_adv = torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, -2.0, -2.0, -2.0]])
    torch.testing.assert_close(batch.advantages, expected_adv)
    assert metrics["kl"] == pytest.approx((0.5 - 1.0 - 0.5 + 0.0 + 2.0) / 5)
    assert metrics["advantage_mean"] == pytest.approx((2 + 2 - 2 - 2 - 2) / 5)
    assert metrics["advantage_abs"] == pytest.approx(2.0)


def test_kl_in_the_loss_leaves_the_reward_alone_but_is_reported(setup) -> None:
    state = make_state(setup, "algorithm=grpo")  # k3 in the loss
    batch = _hand_batch()
    rewards = batch.token_rewards.clone()
    metrics = compute_advantages(state, batch)
    torch.testing.assert_close(batch.token_rewards, rewards)
    d = torch.tensor([0.5, -1.0, -0.5, 0.0, 2.0])
    assert metrics["kl"] == pytest.approx(float((torch.exp(-d) - 1 + d).mean()), rel=1e-5)
    # GRPO: scores 1 and 0, mean 0.5, unbiased std sqrt(0.5): A = +-0.5 / sqrt(0.5)
    a = 0.5 / 0.5**0.5
    expected = torch.tensor([[0.0, a, a, 0.0], [0.0, -a, -a, -a]])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.returns, batch.advantages)


def test_without_a_reference_there_is_no_kl(setup) -> None:
    state = make_state(setup, "algorithm=rloo", "algo.kl_coef=0")
    assert state.kl_controller is None
    batch = _hand_batch()
    batch.ref_logprobs = None
    metrics = compute_advantages(state, batch)
    assert "kl" not in metrics
    # scores 1 and 0: leave-one-out A = 2 * (s - 0.5) = +1 and -1
    torch.testing.assert_close(
        batch.advantages, torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, -1.0, -1.0, -1.0]])
    )


# ------------------------------------------------------------------------------ update


def test_on_policy_update_equals_the_plain_policy_gradient(setup) -> None:
    """At ratio 1 the clipped surrogate's gradient is that of -sum_t w_t A_t log pi_t, with the
    aggregation weights of the whole batch; the k3 KL term has zero gradient at pi = pi_ref."""
    state = make_state(setup, "algorithm=grpo", "optim.micro_batch_size=3", "optim.max_grad_norm=1e6")
    use_sgd(state)
    batch = prepared_batch(state, prompts_for(setup, state))
    lengths = batch.loss_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: the weights matter
    assert batch.advantages.abs().sum() > 0

    expected_model = copy.deepcopy(state.policy)
    logprobs, _ = token_logprobs(expected_model, batch.input_ids, batch.attention_mask)
    weights = token_weights(batch.loss_mask, "seq-mean-token-mean")
    (-(batch.advantages * logprobs * weights).sum()).backward()
    expected = {name: -p.grad for name, p in expected_model.named_parameters() if p.grad is not None}

    before = snapshot(state.policy)
    metrics = update(state, batch, step_seed=0)
    moved = deltas(state.policy, before)
    assert max(d.abs().max().item() for d in expected.values()) > 1e-3
    for name, delta in moved.items():
        torch.testing.assert_close(delta, expected.get(name, torch.zeros_like(delta)), atol=1e-6, rtol=1e-4)
    grad_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in expected.values()])
    )
    assert metrics["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clipfrac"] == 0.0


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "ppo"])
def test_gradient_accumulation_equals_one_big_micro_batch(setup, algorithm: str) -> None:
    moved, metrics = [], []
    for micro in (2, 8):
        state = make_state(
            setup, f"algorithm={algorithm}", f"optim.micro_batch_size={micro}", "optim.max_grad_norm=1e6"
        )
        use_sgd(state, lr=0.5)
        before, critic_before = snapshot(state.policy), snapshot(state.critic.module) if state.critic else {}
        metrics.append(rl_step(state, prompts_for(setup, state)))
        moved.append(deltas(state.policy, before))
        if state.critic is not None:
            moved[-1].update(
                {f"critic.{k}": v for k, v in deltas(state.critic.module, critic_before).items()}
            )
    assert max(d.abs().max().item() for d in moved[0].values()) > 1e-3
    for name in moved[0]:
        torch.testing.assert_close(moved[0][name], moved[1][name], atol=1e-6, rtol=1e-4)
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_shared_prompts_give_the_update_of_full_rows_with_fewer_tokens(setup, algorithm: str) -> None:
    moved, metrics, tokens = [], [], []
    for share in (True, False):
        state = make_state(
            setup, f"algorithm={algorithm}", f"optim.share_prompts={share}", "optim.max_grad_norm=1e6"
        )
        use_sgd(state, lr=0.5)
        before, critic_before = snapshot(state.policy), snapshot(state.critic.module) if state.critic else {}
        seen: list[int] = []
        hook = state.policy.get_input_embeddings().register_forward_hook(
            lambda _m, inputs, _o, seen=seen: seen.append(inputs[0].numel())
        )
        metrics.append(rl_step(state, prompts_for(setup, state)))
        hook.remove()
        tokens.append(sum(seen))
        moved.append(deltas(state.policy, before))
        if state.critic is not None:
            moved[-1].update(
                {f"critic.{k}": v for k, v in deltas(state.critic.module, critic_before).items()}
            )
    assert tokens[0] < tokens[1]  # the prompts ran once per group (generation included in both)
    for name in moved[0]:
        torch.testing.assert_close(moved[0][name], moved[1][name], atol=1e-6, rtol=1e-4)
    for key in ("policy_loss", "grad_norm", "kl", "value_loss"):
        if key in metrics[1]:
            assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_model_with_dropout_still_updates_on_policy_first(setup, tmp_path, algorithm: str) -> None:
    out, task, path = setup
    dropout_model = tmp_path / "dropout_model"
    shutil.copytree(path, dropout_model)
    config = json.loads((dropout_model / "config.json").read_text())
    config["attention_dropout"] = 0.5  # in train mode every forward would draw a different mask
    (dropout_model / "config.json").write_text(json.dumps(config))
    cfg = make_config(setup, f"algorithm={algorithm}", "optim.lr=0.02")
    seed_everything(cfg.run.seed)
    state = build_state(cfg, task, dropout_model)
    assert state.policy.config.attention_dropout == 0.5
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert not state.policy.training


def test_lora_dropout_is_refused_at_load(setup) -> None:
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout.*dropout off"):
        make_config(setup, "model.lora={r: 4, dropout: 0.1}")


def test_first_mini_batch_is_on_policy_and_later_epochs_are_not(setup) -> None:
    state = make_state(setup, "optim.lr=0.02")
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clipfrac"] == metrics["clipfrac_low"] == metrics["clipfrac_high"] == 0.0

    state = make_state(setup, "optim.lr=0.02", "optim.epochs=3")
    metrics = rl_step(state, prompts_for(setup, state))
    # epochs 2 and 3 see the updated policy: the averaged ratio extremes leave 1
    assert metrics["ratio_max"] > 1.0 + 1e-4
    assert metrics["ratio_min"] < 1.0 - 1e-4


def _count_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    """Register a pre-step hook recording the gradient norm at every optimizer step."""
    norms: list[float] = []

    def record(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )

    optimizer.register_step_pre_hook(record)
    return norms


def test_epochs_times_mini_batches_optimizer_steps(setup) -> None:
    state = make_state(setup, "optim.epochs=2", "optim.num_mini_batches=2", "optim.max_grad_norm=1e6")
    norms = _count_steps(state.actor.optimizer)
    metrics = rl_step(state, prompts_for(setup, state))
    assert len(norms) == 4
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_num_mini_batches_is_the_number_of_optimizer_steps_per_epoch(setup) -> None:
    state = make_state(
        setup, "rollout.prompts_per_step=3", "rollout.group_size=2", "optim.num_mini_batches=4"
    )
    norms = _count_steps(state.actor.optimizer)
    rl_step(state, prompts_for(setup, state))
    assert len(norms) == 4


def test_grad_norm_metric_is_the_mean_over_optimizer_steps(setup) -> None:
    state = make_state(
        setup,
        "rollout.prompts_per_step=3",
        "rollout.group_size=2",
        "optim.num_mini_batches=4",
        "optim.max_grad_norm=1e6",
    )
    norms = _count_steps(state.actor.optimizer)
    metrics = rl_step(state, prompts_for(setup, state))
    assert sum(norms) > 0
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_logged_value_loss_does_not_depend_on_the_micro_batch_size(setup) -> None:
    losses = []
    for micro in (2, 8):
        state = make_state(setup, "algorithm=ppo", f"optim.micro_batch_size={micro}")
        losses.append(rl_step(state, prompts_for(setup, state))["value_loss"])
    assert losses[0] > 0
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_dynamic_sampling_shrinking_below_num_mini_batches_still_trains(setup) -> None:
    counter = itertools.count()
    first_prompt = setup[1].train[0]["prompt"]

    def one_group_varies(prompt: str, completion: str, **row) -> float:
        return float(next(counter)) if prompt == first_prompt else 0.0

    state = make_state(
        setup,
        "algorithm=dapo",
        "algo.overlong_shaping=false",
        "rollout.group_size=2",
        "optim.num_mini_batches=4",
        reward=one_group_varies,
    )
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["zero_variance_groups"] == pytest.approx(0.5)


def test_critic_warmup_trains_only_the_critic(setup) -> None:
    state = make_state(setup, "algorithm=ppo", "optim.critic_warmup_steps=1", "optim.lr=0.01")
    policy_before, critic_before = snapshot(state.policy), snapshot(state.critic.module)
    metrics = rl_step(state, prompts_for(setup, state))
    assert all((d == 0).all() for d in deltas(state.policy, policy_before).values())
    assert any((d != 0).any() for d in deltas(state.critic.module, critic_before).values())
    assert metrics["grad_norm"] == 0.0 and "policy_loss" not in metrics
    assert metrics["value_loss"] > 0
    # the next step is past the warm-up: the policy moves too
    policy_before = snapshot(state.policy)
    rl_step(state, setup[1].train[2:4])
    assert any((d != 0).any() for d in deltas(state.policy, policy_before).values())


# ------------------------------------------------------------------------------ rl_step

COMMON_KEYS = {
    "reward_mean",
    "reward_std",
    "accuracy",
    "response_length",
    "truncated_fraction",
    "reward/char_score",
    "zero_variance_groups",
    "entropy",
    "advantage_mean",
    "advantage_abs",
    "policy_loss",
    "clipfrac",
    "ratio_mean",
    "ratio_max",
    "ratio_min",
    "grad_norm",
    "time/generate",
    "time/rewards",
    "time/logprobs",
    "time/advantages",
    "time/train",
    "time/forward_backward",
    "time/optimizer",
    "time/sync",
    "time/step",
    "tokens_per_s",
    "lr",
}


@pytest.mark.parametrize(
    ("algorithm", "present", "absent"),
    [
        ("grpo", {"kl", "kl_coef"}, {"value_loss", "explained_variance", "overlong_penalty"}),
        ("ppo", {"kl", "kl_coef", "value_loss", "vf_clipfrac", "explained_variance"}, {"overlong_penalty"}),
        ("dapo", {"overlong_penalty"}, {"kl", "kl_coef", "value_loss", "explained_variance"}),
    ],
)
def test_rl_step_reports_the_documented_metrics(setup, algorithm: str, present: set, absent: set) -> None:
    state = make_state(setup, f"algorithm={algorithm}", "optim.lr=0.003", "optim.lr_schedule=constant")
    before = snapshot(state.policy)
    metrics = rl_step(state, prompts_for(setup, state))
    assert COMMON_KEYS | present <= set(metrics)
    assert not absent & set(metrics)
    assert all(isinstance(v, float) and v == v for v in metrics.values())  # floats, no NaN
    phases = ("time/generate", "time/rewards", "time/logprobs", "time/advantages", "time/train", "time/sync")
    assert all(metrics[k] >= 0 for k in phases)
    # the phases tile the step; forward/backward and the optimizer are inside train
    assert sum(metrics[k] for k in phases) == pytest.approx(metrics["time/step"], abs=1e-3)
    assert metrics["time/forward_backward"] + metrics["time/optimizer"] <= metrics["time/train"]
    assert metrics["tokens_per_s"] > 0
    assert metrics["lr"] == 0.003
    assert state.step == 1
    assert any((d != 0).any() for d in deltas(state.policy, before).values())
    if "kl" in metrics:
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
        assert metrics["kl_coef"] == state.config.preset().kl_coef


def test_adaptive_kl_coefficient_moves_after_a_step(setup) -> None:
    state = make_state(setup, "algorithm=grpo", "optim.adaptive_kl_target=0.1")
    metrics = rl_step(state, prompts_for(setup, state))
    # KL is 0 on the first step (pi = pi_ref): error clipped to -0.2; n = 8 samples, horizon 10000
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_coef"] == pytest.approx(0.04 * (1 - 0.2 * 8 / 10_000))
    assert state.kl_controller.coef == metrics["kl_coef"]


def test_rl_step_is_reproducible_and_advances_the_sampling_seed(setup) -> None:
    def two_steps():
        state = make_state(setup)
        rows = prompts_for(setup, state)
        rl_step(state, rows)
        first = [s["completion"] for s in state.last_samples]
        rl_step(state, rows)
        second = [s["completion"] for s in state.last_samples]
        return first, second, snapshot(state.policy)

    first_a, second_a, params_a = two_steps()
    first_b, second_b, params_b = two_steps()
    assert (first_a, second_a) == (first_b, second_b)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=0, rtol=0)
    assert first_a != second_a  # step 2 samples with another seed (and updated weights)


def test_rl_step_steps_the_schedulers(setup) -> None:
    state = make_state(setup, "optim.lr=0.01", "optim.warmup_steps=2", "optim.lr_schedule=constant")
    rows = prompts_for(setup, state)
    lrs = [rl_step(state, rows)["lr"] for _ in range(3)]
    # the metric is read after the scheduler step: warm-up reaches the full rate after 2 steps
    assert lrs == pytest.approx([0.005, 0.01, 0.01])


def test_critic_warmup_does_not_use_up_the_policy_learning_rate_warmup(setup) -> None:
    state = make_state(
        setup,
        "algorithm=ppo",
        "optim.critic_warmup_steps=1",
        "optim.warmup_steps=2",
        "optim.lr=0.01",
        "optim.lr_schedule=constant",
    )
    rows = prompts_for(setup, state)
    lrs = [rl_step(state, rows)["lr"] for _ in range(3)]
    # step 1 trains the critic only; the policy's warm-up (0, 0.005, 0.01) starts at step 2
    assert lrs == pytest.approx([0.0, 0.005, 0.01])


def test_kl_importance_ratio_weights_the_kl_gradient_by_pi_over_pi_old(setup) -> None:
    """With the advantages zeroed only the k3 KL term moves the policy; samples that pi_old drew
    with half the probability pi gives them (ratio e^0.5) scale its gradient by e^0.5."""

    def kl_only_update(*extra: str) -> dict[str, torch.Tensor]:
        state = make_state(setup, "algorithm=grpo", "algo.kl_coef=1.0", "optim.max_grad_norm=1e6", *extra)
        use_sgd(state, lr=0.1)
        batch = prepared_batch(state, prompts_for(setup, state))
        batch.advantages = torch.zeros_like(batch.advantages)
        batch.ref_logprobs = (batch.old_logprobs - 1.0) * batch.loss_mask  # KL > 0 with a gradient
        batch.old_logprobs = (batch.old_logprobs - 0.5) * batch.loss_mask
        before = snapshot(state.policy)
        update(state, batch, step_seed=0)
        return deltas(state.policy, before)

    plain, weighted = kl_only_update(), kl_only_update("algo.kl_importance_ratio=true")
    for name in plain:
        torch.testing.assert_close(weighted[name], plain[name] * math.exp(0.5), atol=1e-6, rtol=1e-4)
    assert any(d.abs().max() > 0 for d in plain.values())


def test_dr_grpo_update_uses_the_constant_length_normaliser(setup) -> None:
    """Dr.GRPO's constant normaliser is the run's max_new_tokens, whatever the row lengths."""
    state = make_state(setup, "algorithm=dr_grpo", "optim.micro_batch_size=3", "optim.max_grad_norm=1e6")
    use_sgd(state)
    batch = prepared_batch(state, prompts_for(setup, state))
    expected_model = copy.deepcopy(state.policy)
    logprobs, _ = token_logprobs(expected_model, batch.input_ids, batch.attention_mask)
    rows_with_actions = int((batch.loss_mask.sum(dim=1) > 0).sum())
    assert state.collector.max_row_actions == state.max_new_tokens  # single-turn: one completion per row
    weights = batch.loss_mask / (rows_with_actions * state.max_new_tokens)
    (-(batch.advantages * logprobs * weights).sum()).backward()
    before = snapshot(state.policy)
    update(state, batch, step_seed=0)
    for name, delta in deltas(state.policy, before).items():
        grad = dict(expected_model.named_parameters())[name].grad
        torch.testing.assert_close(
            delta, -grad if grad is not None else torch.zeros_like(delta), atol=1e-6, rtol=1e-4
        )


# ------------------------------------------------------------------ non-finite losses and weights


def _poison_gradients(state: TrainState) -> torch.utils.hooks.RemovableHandle:
    """Every backward through the first trainable weight leaves a NaN in its gradient."""
    weight = next(p for p in state.policy.parameters() if p.requires_grad)
    return weight.register_hook(lambda grad: grad * math.nan)


def test_a_nan_gradient_skips_the_update_and_moves_no_weight(setup) -> None:
    from posttrain.train.step import NonFiniteError

    state = make_state(setup, "optim.max_nonfinite_steps=2")
    before = snapshot(state.policy)
    handle = _poison_gradients(state)
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["skipped_updates"] == 1.0 and metrics["updates"] == 0.0
    assert all(not d.any() for d in deltas(state.policy, before).values())
    assert state.nonfinite_steps == 1
    with pytest.raises(NonFiniteError, match=r"2 RL steps in a row.*optim.max_nonfinite_steps=2"):
        rl_step(state, prompts_for(setup, state))
    handle.remove()
    metrics = rl_step(state, prompts_for(setup, state))  # a clean step resets the count
    assert metrics["skipped_updates"] == 0.0 and metrics["updates"] == 1.0 and state.nonfinite_steps == 0
    assert any(d.any() for d in deltas(state.policy, before).values())


def test_non_finite_weights_stop_the_run(setup) -> None:
    from posttrain.train.step import NonFiniteError

    state = make_state(setup)
    with torch.no_grad():  # e.g. an earlier overflow: the run must stop, not train on and save it
        next(state.policy.parameters()).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteError, match="weights are NaN/inf at RL step 1.*optim.lr"):
        rl_step(state, prompts_for(setup, state))


def test_a_huge_learning_rate_stops_the_run_instead_of_training_on_nan(setup) -> None:
    from posttrain.train.step import NonFiniteError

    state = make_state(setup, "optim.lr=1e30", "optim.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError, match="optim.lr"):
        for _ in range(5):
            rl_step(state, prompts_for(setup, state))


class _ShiftedEngine:
    """The HF engine, reporting each sampled token's log-prob ``shift`` off the trainer's (a sampler
    whose numbers differ from the training forward's, as vLLM's do); records weight syncs."""

    logprobs_match_policy = False

    def __init__(self, engine, shift: float) -> None:
        self.engine, self.shift, self.synced = engine, shift, []

    def generate(self, prompt_ids, params, *, seed=None):
        completions = self.engine.generate(prompt_ids, params, seed=seed)
        return [dataclasses.replace(c, logprobs=[v + self.shift for v in c.logprobs]) for c in completions]

    def sync_weights(self, model) -> None:
        self.synced.append(model)
        self.engine.sync_weights(model)


def shifted_state(setup, shift: float, *extra: str) -> TrainState:
    state = make_state(setup, "algo.kl_coef=0", "optim.max_grad_norm=1e9", *extra)
    use_sgd(state, lr=0.5)
    state.engine = state.collector.engine = _ShiftedEngine(state.engine, shift)
    return state


def test_the_sampler_trainer_mismatch_is_logged_and_the_engine_gets_the_new_weights(setup) -> None:
    state = shifted_state(setup, -math.log(3.0))
    metrics = rl_step(state, prompts_for(setup, state))
    # the trainer recomputed its log-probs (the engine's are not the training forward's)
    assert metrics["mismatch/logprob_abs_mean"] == pytest.approx(math.log(3.0), abs=1e-4)
    assert metrics["mismatch/logprob_abs_max"] == pytest.approx(math.log(3.0), abs=1e-4)
    assert state.engine.synced == [state.policy]  # once, after the update
    rl_step(state, prompts_for(setup, state))
    assert len(state.engine.synced) == 2


def test_an_engine_reusing_the_trainers_logprobs_logs_no_mismatch(setup) -> None:
    state = make_state(setup)
    assert "mismatch/logprob_abs_mean" not in rl_step(state, prompts_for(setup, state))


@pytest.mark.parametrize(("threshold", "weight"), [(2.0, 2.0), (4.0, 3.0)])
def test_truncated_rollout_correction_scales_the_policy_gradient(
    setup, threshold: float, weight: float
) -> None:
    """The sampler's log-probs are log 3 below the trainer's, so pi_trainer / pi_sampler = 3 on
    every token: truncated at ``threshold`` the loss of every token is ``weight`` times the plain
    one, and so is the SGD step (the first update is on-policy: ratio 1, no clipping)."""
    moved = []
    for extra in ([], [f"algo.rollout_correction.threshold={threshold}"]):
        state = shifted_state(setup, -math.log(3.0), *extra)
        before = snapshot(state.policy)
        metrics = rl_step(state, prompts_for(setup, state))
        moved.append(deltas(state.policy, before))
    assert metrics["correction/rollout_is_mean"] == pytest.approx(3.0, rel=1e-3)
    assert metrics["correction/rollout_is_truncated_frac"] == (1.0 if threshold < 3 else 0.0)
    for name, plain in moved[0].items():
        torch.testing.assert_close(moved[1][name], weight * plain, atol=1e-6, rtol=1e-3)
    assert any((d != 0).any() for d in moved[0].values())


def test_masked_rollout_correction_drops_tokens_outside_the_bounds(setup) -> None:
    state = shifted_state(setup, -math.log(3.0), "algo.rollout_correction.mode=mask")
    before = snapshot(state.policy)
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["correction/rollout_is_masked_frac"] == 1.0  # every ratio is 3 > 2
    assert all((d == 0).all() for d in deltas(state.policy, before).values())
    state = shifted_state(setup, -math.log(1.5), "algo.rollout_correction.mode=mask")
    before = snapshot(state.policy)
    assert rl_step(state, prompts_for(setup, state))["correction/rollout_is_masked_frac"] == 0.0
    assert any((d != 0).any() for d in deltas(state.policy, before).values())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["algo.rollout_correction.lower=0.5"], "lower is the mask mode's bound"),
        (["algo.rollout_correction.mode=none"], "corrects nothing"),
        (["algo.rollout_correction.mode=mask", "algo.rollout_correction.lower=3"], "lower <= threshold"),
        (["algo.rollout_correction.treshold=3"], "treshold"),
        (["rollout.engine=vllm"], "rollout.engine: vllm is not installed"),
        (["rollout.engine=sglang"], "rollout.engine"),
        (["scale.max_policy_lag=1"], "max_policy_lag applies to Ray rollout workers"),
        (["scale.rollout_workers=2"], "rollout_workers applies to Ray"),
        (["scale.ray=true", "scale.max_policy_lag=-1"], "max_policy_lag"),
        (["scale.ray=true", "scale.max_policy_lag=1", "data.task=key_chain"], "single-turn only"),
    ],
)
def test_bad_scale_out_settings_fail_at_load(setup, setting: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(setup, *setting)


def test_keep_sampling_mask_trains_on_the_truncated_distribution(setup) -> None:
    """top_k=3: old log-probs are renormalised over the 3 tokens the sampler could draw (>= the
    full ones), the first update sees ratio 1 (the new policy truncated the same way), and every
    sampled token is among the kept ones."""
    state = make_state(setup, "rollout.top_k=3", "rollout.keep_sampling_mask=true", "rollout.temperature=0.9")
    batch = prepared_batch(state, prompts_for(setup, state))
    mask = batch.loss_mask > 0
    assert batch.keep_ids is not None and batch.keep_ids.shape[:2] == batch.input_ids.shape
    assert (batch.keep_ids[mask] >= 0).sum(dim=-1).eq(3).all()
    assert (batch.keep_ids[mask] == batch.input_ids[mask].unsqueeze(-1)).any(dim=-1).all()
    assert (batch.old_logprobs[mask] >= batch.rollout_logprobs[mask] - 1e-5).all()
    assert (batch.old_logprobs[mask] > batch.rollout_logprobs[mask] + 1e-4).any()
    metrics = rl_step(state, prompts_for(setup, state))
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["rollout.keep_sampling_mask=true"], "nothing is truncated"),
        (
            ["rollout.keep_sampling_mask=true", "rollout.top_p=0.9", "rollout.temperature=0"],
            "nothing is truncated",
        ),
        (
            ["rollout.keep_sampling_mask=true", "rollout.top_k=5", "algo.rollout_correction.mode=truncate"],
            "full distribution",
        ),
    ],
)
def test_keep_sampling_mask_needs_a_truncation(setup, setting: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(setup, *setting)
