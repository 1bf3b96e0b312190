"""Plain builders for a run's parts: task, models, engine, optimizers. Each does one thing."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from posttrain.algorithms.kl import AdaptiveKLController, FixedKLController
from posttrain.data.datasets import load_rows, task_from_rows
from posttrain.data.tasks import Task, get_task, task_corpus
from posttrain.envs.registry import env_factory
from posttrain.models.critic import ValueModel
from posttrain.models.load import LoraSettings, ReferencePolicy, load_policy
from posttrain.models.tiny import TOKENIZER_VERSION, build_tiny_model
from posttrain.rewards.functions import RewardSpec, resolve_reward_specs
from posttrain.rollout.collector import Collector
from posttrain.rollout.engine import RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.multi_turn import MultiTurnCollector, TurnLimits
from posttrain.rollout.scripted import ScriptedEngine
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import TrainConfig
from posttrain.train.step import TrainState
from posttrain.train.warmstart import Demonstration, DemonstrationSource, warm_start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_task(cfg: TrainConfig) -> Task:
    """The built-in task, or the user's dataset with the configured reward functions."""
    data = cfg.data
    specs = [RewardSpec(r.fn, r.weight) for r in data.reward_fns]
    if data.path is None:
        assert data.task is not None
        task = get_task(
            data.task,
            seed=cfg.run.seed,
            num_train=data.num_train,
            num_test=data.num_test,
            **data.task_options,
        )
        if specs:
            task.reward_fns = specs
    else:
        if not specs and cfg.env.name is None:
            raise ValueError(
                "data.reward_fns: a dataset given by data.path needs at least one reward function "
                "(or an environment, env.name, that scores its episodes)"
            )
        train_rows = load_rows(data.path, prompt_field=data.prompt_field, limit=data.num_train)
        test_rows = (
            load_rows(data.test_path, prompt_field=data.prompt_field, limit=data.num_test)
            if data.test_path
            else train_rows[: data.num_test]
        )
        task = task_from_rows(
            train_rows, test_rows, specs, Path(data.path).stem, data.max_new_tokens or 64, env=cfg.env.name
        )
    if data.max_new_tokens is not None:
        task.max_new_tokens = data.max_new_tokens
    return task


def build_collector(
    cfg: TrainConfig, task: Task, engine: RolloutEngine, tokenizer: Any, *, guarded: bool = True
) -> Collector:
    """The multi-turn collector when the run has an environment, else the single-turn one;
    ``guarded=False`` leaves out ``env.guard`` (for the warm-start's scripted demonstrations)."""
    name = cfg.env_name()
    if name is None:
        return SingleTurnCollector(
            engine, tokenizer, resolve_reward_specs(task.reward_fns), task.max_new_tokens
        )
    env = cfg.env
    limits = TurnLimits(
        max_turns=env.max_turns,
        max_episode_tokens=env.max_episode_tokens,
        max_tool_output_tokens=env.max_tool_output_tokens,
        context_budget=env.context_budget,
        compaction=env.compaction,
        keep_turns=env.keep_turns,
    )
    guard = env.guard.build() if env.guard is not None and guarded else None
    make_env = env_factory(name, env.options, guard)
    return MultiTurnCollector(engine, tokenizer, make_env, limits, task.max_new_tokens)


def embedded_model_path(cfg: TrainConfig, task: Task) -> Path:
    """Build (once, cached) the tiny Llama and warm-start it on the task's solutions.

    The caches are keyed by the contents that shape them, so an edited dataset is never served a
    stale model: the tokenizer by the task's texts, the warm-start also by its demonstrations, its
    settings and the seed.
    """
    corpus = task_corpus(task)
    name = cfg.env_name()
    demonstrations: Any = [
        [row.get(k) for k in ("prompt", "solution", "flawed_solution")] for row in task.train
    ]
    shape: dict[str, Any] = {"warmstart": cfg.warmstart.model_dump()}
    if name is not None:  # agent demonstrations depend on the whole task and the episode limits
        # the guard acts on RL rollouts only, so guarded and unguarded runs share one warm-start
        demonstrations, shape["env"] = task.train, cfg.env.model_dump(exclude={"guard"}) | {"name": name}
    base_key = _short_hash({"corpus": corpus, "tokenizer": TOKENIZER_VERSION})
    warm_key = _short_hash(
        {
            "corpus": corpus,
            "tokenizer": TOKENIZER_VERSION,
            "rows": demonstrations,
            "seed": cfg.run.seed,
            **shape,
        }
    )
    cache = Path(cfg.run.output_dir) / ".cache"
    size = f"h{cfg.model.tiny_hidden_size}-l{cfg.model.tiny_layers}"
    base = build_tiny_model(
        cache / f"tiny-{task.name}-{base_key}-{size}-s{cfg.run.seed}",
        corpus,
        hidden_size=cfg.model.tiny_hidden_size,
        num_layers=cfg.model.tiny_layers,
        seed=cfg.run.seed,
    )
    source = scripted_demonstrations(cfg, task) if name is not None else None
    if cfg.warmstart.steps == 0 or (source is None and not all("solution" in row for row in task.train)):
        return base  # nothing to imitate: a dataset without solutions starts RL from the fresh model
    return warm_start(
        base,
        cache / f"warm-{size}-{warm_key}",
        task,
        cfg.warmstart,
        seed=cfg.run.seed,
        progress=cfg.logging.progress,
        source=source,
    )


def scripted_demonstrations(cfg: TrainConfig, task: Task) -> DemonstrationSource | None:
    """Warm-start demonstrations for an agent task: episodes of the environment's own scripted
    demonstrator (``env.demonstrate(context, rng, flawed_fraction) -> action``), collected by the
    same collector as RL, so they carry the same observations and compaction; one per sub-trace.
    None when the environment has no demonstrator."""
    name = cfg.env_name()
    assert name is not None
    demonstrate = getattr(env_factory(name, cfg.env.options)(), "demonstrate", None)
    if demonstrate is None:
        return None
    params = SamplingParams(max_new_tokens=task.max_new_tokens, stop=tuple(cfg.rollout.stop))

    def source(tokenizer: Any, rows: list[dict[str, Any]], rng: random.Random) -> list[Demonstration]:
        engine = ScriptedEngine(
            tokenizer, lambda context: demonstrate(context, rng, cfg.warmstart.flawed_fraction)
        )
        collector = build_collector(cfg, task, engine, tokenizer, guarded=False)
        rollout = collector.collect(rows, params, group_size=1, seed=0)
        return [(trace.tokens, trace.loss_mask) for episode in rollout.episodes for trace in episode.traces]

    return source


_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' scheduler: linear warm-up from 0 over ``warmup_steps``, then ``schedule``
    ("constant", or "linear" / "cosine" decay reaching 0 after ``total_steps``)."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}")
    return get_scheduler(
        _SCHEDULES[schedule], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def _short_hash(contents: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(contents, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_state(
    cfg: TrainConfig,
    task: Task,
    model_path: Path,
    *,
    policy_path: Path | None = None,
    critic_path: Path | None = None,
) -> TrainState:
    """``model_path`` is the run's starting model (and the KL reference); ``policy_path`` and
    ``critic_path`` point at checkpointed weights when resuming."""
    preset = cfg.preset()
    lora = LoraSettings(**cfg.model.lora.model_dump()) if cfg.model.lora else None
    if lora is not None:
        lora.target_modules = tuple(lora.target_modules)
    policy, tokenizer = load_policy(policy_path or model_path, lora=lora)
    needs_reference = preset.kl_placement != "none" and preset.kl_coef > 0
    reference = ReferencePolicy.create(model_path, policy) if needs_reference else None
    critic_source = critic_path or cfg.model.critic_path or model_path
    critic = ValueModel.from_pretrained(critic_source) if preset.uses_critic else None
    optim = cfg.optim
    policy_optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay
    )
    # the policy waits out the critic warm-up, so its schedule spans the remaining steps
    policy_steps = optim.steps - (optim.critic_warmup_steps if critic is not None else 0)
    policy_scheduler = lr_scheduler(
        policy_optimizer, optim.lr_schedule, optim.warmup_steps, max(policy_steps, 1)
    )
    critic_optimizer = critic_scheduler = None
    if critic is not None:
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=optim.critic_lr)
        critic_scheduler = lr_scheduler(critic_optimizer, optim.lr_schedule, optim.warmup_steps, optim.steps)
    kl_controller: FixedKLController | AdaptiveKLController | None = None
    if needs_reference:
        kl_controller = (
            AdaptiveKLController(preset.kl_coef, optim.adaptive_kl_target, horizon=10_000)
            if optim.adaptive_kl_target
            else FixedKLController(preset.kl_coef)
        )
    engine = HFRolloutEngine(policy, tokenizer)
    return TrainState(
        config=cfg,
        preset=preset,
        policy=policy,
        tokenizer=tokenizer,
        engine=engine,
        collector=build_collector(cfg, task, engine, tokenizer),
        max_new_tokens=task.max_new_tokens,
        policy_optimizer=policy_optimizer,
        policy_scheduler=policy_scheduler,
        reference=reference,
        critic=critic,
        critic_optimizer=critic_optimizer,
        critic_scheduler=critic_scheduler,
        kl_controller=kl_controller,
    )
