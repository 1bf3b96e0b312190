"""One RL training step, top to bottom, as in the papers' pseudo-code.

    collect (rollout + rewards) -> (old, reference log-probs; values) -> (teacher log-probs)
            -> (rollout correction weights) -> KL-in-reward
            -> advantages (+ distill.coef x the teachers' reverse-KL advantage)
            -> epochs x mini-batches of clipped-surrogate updates (+ KL loss, entropy, critic)
            -> the rollout engine receives the new weights

The same function runs PPO, GRPO, GSPO and every other preset: the preset only picks names. It
talks to roles (``train/roles.py``: actor, critic, reference, engine, ranks) and to ``Batch``, so
the same step runs in one process or sharded over several (``scale/``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms.aggregate import aggregate, token_weights
from posttrain.algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty
from posttrain.algorithms.masked import masked_max, masked_mean
from posttrain.algorithms.presets import AlgorithmPreset
from posttrain.algorithms.registry import ADVANTAGES, POLICY_LOSSES
from posttrain.algorithms.shaping import dynamic_sampling_keep, overlong_penalty
from posttrain.algorithms.value import clipped_value_loss, explained_variance
from posttrain.data.batch import Batch, collate_episodes, mini_batches
from posttrain.data.trace import Episode
from posttrain.distill.teachers import Teachers
from posttrain.models.load import ReferencePolicy
from posttrain.models.prefix import ActionForward, planned_micro_batches
from posttrain.rollout.collector import Collector
from posttrain.rollout.engine import RolloutEngine, SamplingParams
from posttrain.train.config import TrainConfig
from posttrain.train.off_policy import corrected, correction_weights
from posttrain.train.roles import Actor, Critic, Ranks


@dataclass
class TrainState:
    """Everything a step reads and updates; built once by ``train.setup``.

    The roles: ``actor`` (the policy, its optimizer and schedule), ``critic`` (PPO's value model),
    ``reference`` (frozen pi_ref for the KL), ``engine`` (samples completions; receives the
    actor's weights after every update), ``ranks`` (the processes sharing the step).
    ``collector`` turns a step's rows into scored episodes (single-turn or against an environment)
    with the engine; ``max_new_tokens`` is the budget of one completion (or one turn);
    ``last_samples`` holds the readable samples of the latest rollout for samples.jsonl.
    """

    config: TrainConfig
    preset: AlgorithmPreset
    actor: Actor
    tokenizer: Any
    engine: RolloutEngine
    collector: Collector
    max_new_tokens: int
    reference: ReferencePolicy | None = None
    critic: Critic | None = None
    ranks: Ranks = field(default_factory=Ranks)
    kl_controller: FixedKLController | AdaptiveKLController | None = None
    teachers: Teachers | None = None  # on-policy distillation (distill.teachers)
    step: int = 0
    data_position: int = 0
    last_samples: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_steps: int = 0  # consecutive RL steps whose every update was skipped

    @property
    def policy(self) -> torch.nn.Module:
        """The policy module (the actor's)."""
        return self.actor.module


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf that skipping updates cannot contain; the run stops before any
    checkpoint is written from the damaged state."""


def sampling_params(
    cfg: TrainConfig, *, max_new_tokens: int, temperature: float | None = None
) -> SamplingParams:
    """The rollout settings of ``cfg`` (``temperature`` overrides, e.g. 0 for greedy evaluation)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=cfg.rollout.temperature if temperature is None else temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop=tuple(cfg.rollout.stop),
    )


def logprob_temperature(cfg: TrainConfig) -> float:
    """The temperature the sampler used, so training log-probs match it (greedy counts as 1)."""
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def shape_rewards(state: TrainState, episodes: list[Episode]) -> tuple[list[Episode], dict[str, float]]:
    """DAPO overlong shaping and dynamic sampling, when the preset asks for them.

    An episode's length is its trainable tokens over all sub-traces, against the most the collector
    lets one episode write.
    """
    metrics: dict[str, float] = {}
    if state.preset.overlong_shaping:
        max_length = state.collector.max_episode_actions
        lengths = torch.tensor([float(e.num_actions) for e in episodes])
        penalty = overlong_penalty(
            lengths,
            max_length=max_length,
            buffer_length=min(state.config.optim.overlong_buffer, max_length),
        )
        for episode, p in zip(episodes, penalty.tolist(), strict=True):
            episode.reward += p
        metrics["overlong_penalty"] = float(penalty.mean())
    scores = torch.tensor([e.total_reward for e in episodes])
    group_ids = torch.tensor([e.group_id for e in episodes])
    keep = dynamic_sampling_keep(scores, group_ids)
    metrics["zero_variance_groups"] = 1.0 - float(keep.float().mean())
    if state.preset.dynamic_sampling and bool(keep.any()):
        episodes = [e for e, k in zip(episodes, keep.tolist(), strict=True) if k]
    return episodes, metrics


def reuses_sampler_logprobs(state: TrainState) -> bool:
    """True when the engine's log-probs serve as old_logprobs: they come from the training forward
    on the current weights (the HF engine: ``logprobs_match_policy``), ``rollout.reuse_logprobs``
    is on, and no rollout correction needs the trainer's own to compare."""
    cfg = state.config
    return (
        cfg.rollout.reuse_logprobs
        and getattr(state.engine, "logprobs_match_policy", False)
        and cfg.algo.rollout_correction is None
        and not cfg.rollout.keep_sampling_mask  # the sampler's are of the full distribution
    )


@torch.no_grad()
def fill_old_ref_values(state: TrainState, batch: Batch, temperature: float) -> dict[str, float]:
    """old_logprobs (policy before the update), ref_logprobs (for KL) and values (critic).

    Reusing the engine's log-probs (``reuses_sampler_logprobs``) saves one policy forward pass per
    step. When the trainer computes its own, the sampler/trainer mismatch
    |log pi_sampler - log pi_trainer| over the trainable tokens is returned as metrics.
    """
    reuse = reuses_sampler_logprobs(state)
    optim, rollout = state.config.optim, state.config.rollout
    old = None if reuse else torch.zeros_like(batch.loss_mask)
    ref = torch.zeros_like(batch.loss_mask) if state.reference is not None else None
    values = torch.zeros_like(batch.loss_mask) if state.critic is not None else None
    kept: list[tuple[Tensor, Tensor]] = []  # (rows, keep_ids) under rollout.keep_sampling_mask
    for rows, plan in planned_micro_batches(batch, optim.micro_batch_size, share=optim.share_prompts):
        width = plan.input_ids.shape[1]
        if old is not None and rollout.keep_sampling_mask:
            old[rows, :width], keep_ids = state.actor.truncated_logprobs(
                plan, temperature=temperature, top_k=rollout.top_k, top_p=rollout.top_p
            )
            kept.append((rows, keep_ids))
        elif old is not None:
            old[rows, :width] = state.actor.logprobs(plan, temperature=temperature)[0]
        if ref is not None and state.reference is not None:
            ref[rows, :width] = state.reference.logprobs(plan, temperature=temperature)
        if values is not None and state.critic is not None:
            values[rows, :width] = state.critic.values(plan)
    batch.old_logprobs = (batch.rollout_logprobs if old is None else old) * batch.loss_mask
    batch.keep_ids = _stack_keep_ids(kept, batch) if kept else None
    batch.ref_logprobs = ref
    batch.values = values * batch.loss_mask if values is not None else None
    if old is None:
        return {}
    gap = (batch.old_logprobs - batch.rollout_logprobs).abs() * batch.loss_mask
    return {
        "mismatch/logprob_abs_mean": float(masked_mean(gap, batch.loss_mask)),
        "mismatch/logprob_abs_max": float(masked_max(gap, batch.loss_mask)),
    }


def _stack_keep_ids(kept: list[tuple[Tensor, Tensor]], batch: Batch) -> Tensor:
    """Micro-batches' kept ids in one ``[batch, time, K]`` tensor, -1 padded."""
    width = max(keep_ids.shape[-1] for _, keep_ids in kept)
    out = torch.full((*batch.input_ids.shape, width), -1, dtype=torch.long)
    for rows, keep_ids in kept:
        out[rows, : keep_ids.shape[1], : keep_ids.shape[2]] = keep_ids
    return out


@torch.no_grad()
def fill_teacher_logprobs(
    state: TrainState, batch: Batch, rows: Sequence[dict[str, Any]], temperature: float
) -> dict[str, float]:
    """On-policy distillation: each row's teacher scores the tokens the student sampled.

    A batch row belongs to the prompt ``rows[group_id]``, whose routing picks its teacher; each
    teacher runs over its own rows. Without teachers this phase does nothing.
    """
    if state.teachers is None:
        return {}
    started = time.perf_counter()
    teacher_of_prompt = state.teachers.route_rows(rows)
    names = [teacher_of_prompt[group] for group in batch.group_ids.tolist()]
    optim = state.config.optim
    batch.teacher_logprobs = state.teachers.logprobs(
        batch,
        names,
        micro_batch_size=optim.micro_batch_size,
        share=optim.share_prompts,
        temperature=temperature,
    )
    return state.teachers.metrics(batch, names) | {"time/teachers": time.perf_counter() - started}


def compute_advantages(state: TrainState, batch: Batch) -> dict[str, float]:
    """KL-in-reward (when placed there), the preset's advantage estimator, then the teachers'
    reverse-KL advantage weighted by ``distill.coef`` (distillation added to RL)."""
    preset = state.preset
    metrics: dict[str, float] = {}
    if batch.ref_logprobs is not None and batch.old_logprobs is not None:
        kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, preset.kl_estimator) * batch.loss_mask
        metrics["kl"] = float(masked_mean(kl, batch.loss_mask))
        if preset.kl_placement == "reward" and state.kl_controller is not None:
            batch.token_rewards = batch.token_rewards - state.kl_controller.coef * kl
    batch.advantages, batch.returns = ADVANTAGES.call(
        preset.advantage, batch.as_dict(), preset.advantage_kwargs
    )
    distill = state.config.distill
    if distill.coef and batch.teacher_logprobs is not None:
        signal, _ = ADVANTAGES.call("reverse_kl", batch.as_dict(), {"gamma": distill.discount})
        batch.advantages = batch.advantages + distill.coef * signal
    metrics["advantage_mean"] = float(masked_mean(batch.advantages, batch.loss_mask))
    metrics["advantage_abs"] = float(masked_mean(batch.advantages.abs(), batch.loss_mask))
    return metrics


def policy_trains(state: TrainState) -> bool:
    """False during critic warm-up (PPO's first ``critic_warmup_steps`` steps train the critic only)."""
    return state.critic is None or state.step >= state.config.optim.critic_warmup_steps


# averaged over optimizer steps: a micro-batch's loss is its share of its mini-batch's loss, so the
# losses are summed within a mini-batch; grad_norm is one value per step. Other metrics: per micro-batch.
_PER_OPTIMIZER_STEP = ("policy_loss", "value_loss", "grad_norm")


def update(state: TrainState, batch: Batch, step_seed: int) -> dict[str, float]:
    """Epochs x mini-batches of optimizer steps with gradient accumulation over micro-batches.

    Returns metrics averaged over optimizer steps: losses are the mini-batch losses (whatever the
    micro-batch size), other metrics the mean over micro-batches; ``time/forward_backward`` and
    ``time/optimizer`` are summed seconds.
    """
    cfg, preset = state.config, state.preset
    temperature = logprob_temperature(cfg)
    train_policy = policy_trains(state)
    kl_in_loss = preset.kl_placement == "loss" and batch.ref_logprobs is not None
    generator = torch.Generator().manual_seed(step_seed)
    # dynamic sampling may leave fewer episodes than the configured number of mini-batches
    num_mini_batches = min(cfg.optim.num_mini_batches, int(torch.unique(batch.episode_ids).numel()))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    seconds = {"time/forward_backward": 0.0, "time/optimizer": 0.0}
    num_steps = skipped = 0
    _dropout_off(state)
    for _epoch in range(cfg.optim.epochs):
        for rows in mini_batches(batch.episode_ids, num_mini_batches, generator):
            mini = batch.select(rows)
            mini.loss_weights = token_weights(
                mini.loss_mask,
                preset.aggregation,
                episode_ids=mini.episode_ids,
                constant=float(state.collector.max_row_actions),
            )
            # the critic regresses every token equally, whatever the policy's aggregation
            mini.value_weights = token_weights(mini.loss_mask, "token-mean")
            started = time.perf_counter()
            # each rank trains its share of the rows; the weights above span the whole mini-batch
            for micro_rows in state.ranks.micro_batches(mini.attention_mask, cfg.optim.micro_batch_size):
                micro = mini.select(micro_rows) if micro_rows is not None else mini.select([0]).weightless()
                metrics = _micro_batch_backward(state, micro, temperature, train_policy, kl_in_loss)
                for key, value in metrics.items() if micro_rows is not None else ():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + (key not in _PER_OPTIMIZER_STEP)
            backward_done = time.perf_counter()
            grad_norm = _optimizer_step(state, train_policy)
            seconds["time/forward_backward"] += backward_done - started
            seconds["time/optimizer"] += time.perf_counter() - backward_done
            if math.isfinite(grad_norm):
                # every rank holds the same global norm: its share, so the sum over ranks is the norm
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm / state.ranks.world_size
                num_steps += 1
            else:
                skipped += 1
    sums, counts = state.ranks.sum_metrics(sums, counts)
    metrics = {
        key: value / (max(num_steps, 1) if key in _PER_OPTIMIZER_STEP else max(counts[key], 1))
        for key, value in sums.items()
        if math.isfinite(value)  # a skipped update's NaN loss is reported as skipped, not averaged in
    }
    metrics["skipped_updates"] = float(skipped)
    metrics["updates"] = float(num_steps)
    metrics.update(seconds)
    return metrics


def _micro_batch_backward(
    state: TrainState, micro: Batch, temperature: float, train_policy: bool, kl_in_loss: bool
) -> dict[str, float]:
    cfg, preset = state.config, state.preset
    assert micro.loss_weights is not None and micro.advantages is not None
    metrics: dict[str, float] = {}
    # each distinct prompt runs once, and no LM head over the prompts
    plan = ActionForward.plan(
        micro.input_ids, micro.attention_mask, micro.loss_mask, share=cfg.optim.share_prompts
    )
    if train_policy:
        want_entropy = cfg.optim.entropy_coef > 0
        logprobs, entropy = state.actor.logprobs(
            plan,
            temperature=temperature,
            with_entropy=True,
            entropy_grad=want_entropy,  # otherwise a metric only
            keep_ids=micro.keep_ids,  # the old policy's sampling truncation, kept for the new one
        )
        assert entropy is not None
        per_token, loss_metrics = POLICY_LOSSES.call(
            preset.policy_loss,
            {
                "logprobs": logprobs,
                "old_logprobs": micro.old_logprobs,
                "advantages": micro.advantages,
                "loss_mask": micro.loss_mask,
            },
            preset.loss_kwargs,
        )
        per_token = corrected(state, per_token, logprobs, micro)
        loss = aggregate(per_token, micro.loss_weights)
        metrics.update({k: float(v) for k, v in loss_metrics.items()})
        metrics["policy_loss"] = loss.item()
        metrics["entropy"] = float(masked_mean(entropy.detach(), micro.loss_mask))
        if kl_in_loss and state.kl_controller is not None:
            ratio = torch.exp(logprobs - micro.old_logprobs) if preset.kl_importance_ratio else None
            kl = kl_penalty(logprobs, micro.ref_logprobs, preset.kl_estimator, importance_ratio=ratio)
            kl = kl * micro.loss_mask
            loss = loss + state.kl_controller.coef * aggregate(kl, micro.loss_weights)
        if want_entropy:
            loss = loss - cfg.optim.entropy_coef * aggregate(entropy, micro.loss_weights)
        state.actor.backward(loss)
    if state.critic is not None:
        assert micro.values is not None and micro.returns is not None
        new_values = state.critic.values(plan)
        per_token_v, v_metrics = clipped_value_loss(
            new_values,
            micro.values,
            micro.returns,
            micro.loss_mask,
            cliprange_value=cfg.optim.cliprange_value,
        )
        v_loss = cfg.optim.vf_coef * aggregate(per_token_v, micro.value_weights)
        state.critic.backward(v_loss)
        metrics["value_loss"] = v_loss.item() / cfg.optim.vf_coef if cfg.optim.vf_coef else 0.0
        metrics.update({k: float(v) for k, v in v_metrics.items()})
    return metrics


def _optimizer_step(state: TrainState, train_policy: bool) -> float:
    """Clip and apply the accumulated gradients; returns the policy's gradient norm. When a loss or
    gradient is NaN/inf (policy or critic), no parameter moves: the gradients are dropped and the
    norm returned is not finite, so the caller counts a skipped update."""
    max_norm = state.config.optim.max_grad_norm
    grad_norm = state.actor.clip_grad_norm(max_norm) if train_policy else 0.0
    critic_norm = state.critic.clip_grad_norm(max_norm) if state.critic is not None else 0.0
    finite = math.isfinite(grad_norm) and math.isfinite(critic_norm)
    state.actor.apply_gradients(finite and train_policy)
    if state.critic is not None:
        state.critic.apply_gradients(finite)
    return grad_norm if finite else math.nan


def _dropout_off(state: TrainState) -> None:
    """Dropout off for the actor and the critic (eval mode; gradients still flow): a random mask
    per forward pass would make even the first update off-policy."""
    state.actor.dropout_off()
    if state.critic is not None:
        state.critic.dropout_off()


def _check_weights(state: TrainState) -> None:
    finite = state.actor.weights_are_finite() and (state.critic is None or state.critic.weights_are_finite())
    if not state.ranks.all_finite(finite):
        raise NonFiniteError(
            f"the weights are NaN/inf at RL step {state.step + 1}; nothing is saved from them. "
            f"Lower optim.lr (now {state.config.optim.lr:g}) or optim.max_grad_norm and resume from "
            "the last checkpoint"
        )


def _check_finite(state: TrainState, metrics: dict[str, float]) -> None:
    """Stop when a step made the weights non-finite, or when ``optim.max_nonfinite_steps`` steps in
    a row had every update skipped for NaN/inf losses or gradients (skipping alone cannot help)."""
    _check_weights(state)
    all_skipped = metrics["skipped_updates"] > 0 and metrics["updates"] == 0
    state.nonfinite_steps = state.nonfinite_steps + 1 if all_skipped else 0
    limit = state.config.optim.max_nonfinite_steps
    if state.nonfinite_steps >= limit:
        raise NonFiniteError(
            f"{state.nonfinite_steps} RL steps in a row had NaN/inf losses or gradients, so every update "
            f"was skipped (optim.max_nonfinite_steps={limit}); check the rewards and lower optim.lr "
            f"(now {state.config.optim.lr:g})"
        )


def step_seed(cfg: TrainConfig, step: int) -> int:
    """The sampling seed of RL step ``step`` (0-based) of a run."""
    return cfg.run.seed * 1_000_003 + step


def rl_step(state: TrainState, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One step of RL on ``rows`` (prompts). Returns the step's metrics."""
    cfg = state.config
    seed = step_seed(cfg, state.step)
    t0 = time.perf_counter()
    _dropout_off(state)  # old log-probs, values and the update see the sampler's network
    params = sampling_params(cfg, max_new_tokens=state.max_new_tokens)
    _check_weights(state)
    try:
        rollout = state.collector.collect(rows, params, group_size=cfg.rollout.group_size, seed=seed)
    except RuntimeError as error:  # sampling from NaN/inf probabilities: finite but overflowing weights
        if "inf" not in str(error) or "nan" not in str(error):
            raise
        raise NonFiniteError(
            f"the policy's next-token probabilities are NaN/inf at RL step {state.step + 1} (weights "
            f"overflow); lower optim.lr (now {cfg.optim.lr:g}) and resume from the last checkpoint"
        ) from error
    state.last_samples = rollout.samples
    metrics = dict(rollout.metrics)
    t1 = time.perf_counter()
    episodes, shaping_metrics = shape_rewards(state, rollout.episodes)
    metrics.update(shaping_metrics)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    metrics.update(fill_old_ref_values(state, batch, logprob_temperature(cfg)))
    metrics.update(fill_teacher_logprobs(state, batch, rows, logprob_temperature(cfg)))
    metrics.update(correction_weights(state, batch))
    t2 = time.perf_counter()
    metrics.update(compute_advantages(state, batch))
    t3 = time.perf_counter()
    policy_trained = policy_trains(state)
    metrics.update(update(state, batch, seed))
    t4 = time.perf_counter()
    _check_finite(state, metrics)
    state.engine.sync_weights(state.actor.module)  # the next rollout samples from the new weights
    t5 = time.perf_counter()
    with warnings.catch_warnings():
        # the schedule follows RL steps, also through a step whose every update was skipped
        warnings.filterwarnings(
            "ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning
        )
        if policy_trained:  # the policy's schedule starts when the policy does
            state.actor.advance_schedule()
        if state.critic is not None:
            state.critic.advance_schedule()
    if state.kl_controller is not None and "kl" in metrics:
        state.kl_controller.update(metrics["kl"], n_steps=len(episodes))
        metrics["kl_coef"] = state.kl_controller.coef
    if state.critic is not None and batch.values is not None and batch.returns is not None:
        metrics["explained_variance"] = float(
            explained_variance(batch.values, batch.returns, batch.loss_mask)
        )
    generated = rollout.generated_tokens
    metrics.update(
        {
            # time/generate (inside the engine) came with the rollout; the rest of collecting is
            # scoring: reward functions, environment steps, tokenization
            "time/rewards": max(t1 - t0 - metrics["time/generate"], 0.0),
            "time/logprobs": t2 - t1,  # collate + old / reference / teacher log-probs + values
            "time/advantages": t3 - t2,
            "time/train": t4 - t3,  # time/forward_backward + time/optimizer + metric bookkeeping
            "time/sync": t5 - t4,  # the finiteness check and the engine's weight update
            "time/step": t5 - t0,
            "tokens_per_s": generated / max(t5 - t0, 1e-9),
            "sampled_tokens": float(generated),
            "lr": state.actor.lr,
        }
    )
    state.step += 1
    return metrics
