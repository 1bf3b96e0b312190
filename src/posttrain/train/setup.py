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
from posttrain.data.datasets import (
    DataError,
    demonstration_rows,
    hold_out,
    load_rows,
    split_rows,
    task_from_rows,
)
from posttrain.data.tasks import Task, get_task, task_corpus
from posttrain.distill.teachers import Teachers, make_router
from posttrain.envs.registry import env_factory
from posttrain.models.critic import ValueModel
from posttrain.models.load import LoraSettings, ReferencePolicy, load_policy
from posttrain.models.tiny import TOKENIZER_VERSION, build_tiny_model
from posttrain.rewards.functions import RewardSpec, resolve_reward_specs
from posttrain.rollout.collector import Collector
from posttrain.rollout.engine import RolloutEngine, SamplingParams
from posttrain.rollout.factory import build_engine
from posttrain.rollout.multi_turn import MultiTurnCollector, TurnLimits
from posttrain.rollout.scripted import ScriptedEngine
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import TrainConfig
from posttrain.train.config_distill import teacher_folder
from posttrain.train.roles import Actor, Critic
from posttrain.train.step import TrainState
from posttrain.train.warmstart import Demonstration, DemonstrationSource, warm_start
from posttrain.train.watch import warn_once


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_task(cfg: TrainConfig) -> Task:
    """The built-in task, or the user's dataset with the configured reward functions; the
    warm-start's rows split off the training rows where configured (``warmstart.rows``). Prints the
    split's sizes."""
    data = cfg.data
    if data.path is None:
        task, note = _builtin_task(cfg), ""
        origin = f"{task.name}: {len(task.train) + len(task.test)} rows"
    else:
        task, count, note = _dataset_task(cfg)
        origin = f"{data.path}: {count} rows"
    if data.max_new_tokens is not None:
        task.max_new_tokens = data.max_new_tokens
    print(_sizes_line(cfg, task, origin) + note, flush=True)
    return task


def _builtin_task(cfg: TrainConfig) -> Task:
    data = cfg.data
    assert data.task is not None
    sizes = {"num_train": data.num_train, "num_test": data.num_test}
    task = get_task(
        data.task,
        seed=cfg.run.seed,
        **{key: value for key, value in sizes.items() if value is not None},  # None: the task's default
        **data.task_options,
    )
    if data.reward_fns:
        task.reward_fns = _reward_specs(cfg)
    task.demonstrations, task.train, _ = _warmstart_and_rl_rows(cfg, task.train, f"task {task.name!r}")
    return task


def _dataset_task(cfg: TrainConfig) -> tuple[Task, int, str]:
    """The task of ``data.path``, the number of rows in that file, and a note on its demonstrations."""
    data = cfg.data
    assert data.path is not None
    specs = _reward_specs(cfg)
    if not specs and cfg.env.name is None:
        raise ValueError(
            "data.reward_fns: a dataset given by data.path needs at least one reward function "
            "(or an environment, env.name, that scores its episodes)"
        )
    rows = load_rows(data.path, prompt_field=data.prompt_field, config_key="data.path")
    if data.test_path is not None:
        train, test = (
            rows,
            load_rows(
                data.test_path,
                prompt_field=data.prompt_field,
                limit=data.num_test,
                config_key="data.test_path",
            ),
        )
    else:
        count = data.num_test or max(1, round(data.test_fraction * len(rows)))
        train, test = hold_out(rows, count, cfg.run.seed, label=f"data.path {data.path!r}")
    train = train[: data.num_train]  # None: every row
    demonstrations, rl_rows, note = _warmstart_and_rl_rows(cfg, train, f"data.path {data.path!r}")
    task = task_from_rows(
        rl_rows,
        test,
        specs,
        Path(data.path).stem,
        data.max_new_tokens or 64,
        env=cfg.env.name,
        demonstrations=demonstrations,
    )
    return task, len(rows), note


def _reward_specs(cfg: TrainConfig) -> list[RewardSpec]:
    return [RewardSpec(r.fn, r.weight) for r in cfg.data.reward_fns]


def _warm_start_runs(cfg: TrainConfig) -> bool:
    """True when the run starts from the embedded model warm-started on demonstrations."""
    return cfg.model.path is None and cfg.warmstart.steps > 0


def _warmstart_and_rl_rows(
    cfg: TrainConfig, rows: list[dict[str, Any]], label: str
) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]], str]:
    """(the warm-start's rows, RL's rows, a note) from the training ``rows``; None = ``rows`` themselves.

    The warm-start imitates the rows with a demonstration (``data.solution_field``; an
    environment's demonstrator writes one for every row), or the ``data.demonstrations_path`` file.
    With ``warmstart.rows: split`` it takes a seeded share of them and RL trains on the other rows.
    The note says how many rows have a demonstration when only some do."""
    data = cfg.data
    if data.demonstrations_path is not None:
        loaded = load_rows(
            data.demonstrations_path,
            prompt_field=data.prompt_field,
            required_fields=[data.solution_field],
            config_key="data.demonstrations_path",
        )
        return demonstration_rows(loaded, data.solution_field, label="data.demonstrations_path")[1], rows, ""
    if cfg.env_name() is not None:
        indices, pool = list(range(len(rows))), list(rows)
    else:
        indices, pool = demonstration_rows(rows, data.solution_field, label=label)
    note = ""
    if pool and len(pool) < len(rows) and _warm_start_runs(cfg):
        note = (
            f"; only {len(pool)} of {len(rows)} training rows have a demonstration "
            f"(data.solution_field {data.solution_field!r}): the warm-start's rows are among those"
        )
    if not (cfg.warmstart_split() and _warm_start_runs(cfg) and pool):
        # a built-in task's rows are its demonstrations as they are (the demo's numbers stay put)
        return (None if data.path is None else pool), rows, note
    picked, _ = split_rows(pool, cfg.warmstart.split_fraction, cfg.run.seed)
    taken = {indices[i] for i in picked}
    rl_rows = [row for i, row in enumerate(rows) if i not in taken]
    if not rl_rows:
        raise DataError(
            f"{label}: {len(rows)} training rows, all taken by the warm-start's split "
            f"(warmstart.split_fraction {cfg.warmstart.split_fraction}), none left for RL; add rows, "
            "or set warmstart.rows=all to warm-start on the rows RL trains on"
        )
    return [pool[i] for i in picked], rl_rows, note


def _sizes_line(cfg: TrainConfig, task: Task, origin: str) -> str:
    """``data: rows.jsonl: 2000 rows -> 900 warm-start, 900 RL, 200 test (held out)``, with a note
    when only some training rows carry a demonstration."""
    data = cfg.data
    test_source = ""
    if data.path is not None:
        test_source = " (data.test_path)" if data.test_path else " (held out)"
    rl, test = len(task.train), f"{len(task.test)} test{test_source}"
    demos = task.warmstart_rows()
    if not (_warm_start_runs(cfg) and demos):
        return f"data: {origin} -> {rl} RL, {test}"
    if data.demonstrations_path is not None:
        return f"data: {origin} -> {rl} RL, {test}; warm-start: {len(demos)} rows of data.demonstrations_path"
    if cfg.warmstart_split():
        return f"data: {origin} -> {len(demos)} warm-start, {rl} RL, {test}"
    return f"data: {origin} -> {rl} RL (the warm-start imitates {len(demos)} of them), {test}"


def build_collector(
    cfg: TrainConfig, task: Task, engine: RolloutEngine, tokenizer: Any, *, guarded: bool = True
) -> Collector:
    """The multi-turn collector when the run has an environment, else the single-turn one;
    ``guarded=False`` leaves out ``env.guard`` (for the warm-start's scripted demonstrations)."""
    name = cfg.env_name()
    if name is None:
        return SingleTurnCollector(
            engine,
            tokenizer,
            resolve_reward_specs(task.reward_fns),
            task.max_new_tokens,
            reward_timeout_s=cfg.data.reward_timeout_s,
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
    """Build (once, cached) the tiny Llama and warm-start it on the task's demonstrations
    (``task.warmstart_rows()``); without any, warn that the model starts from random weights.

    The caches are keyed by the contents that shape them, so an edited dataset is never served a
    stale model: the tokenizer by the task's texts and its kind (``model.tiny_tokenizer``), the
    warm-start also by its demonstrations, its settings and the seed.
    """
    corpus = task_corpus(task)
    name = cfg.env_name()
    rows = task.warmstart_rows()
    demonstrations: Any = [[row.get(k) for k in ("prompt", "solution", "flawed_solution")] for row in rows]
    # which rows the warm-start takes acts through `rows`, hashed below (and caches stay valid)
    shape: dict[str, Any] = {"warmstart": cfg.warmstart.model_dump(exclude={"rows", "split_fraction"})}
    if name is not None:  # agent demonstrations depend on the whole task and the episode limits
        # the guard acts on RL rollouts only, so guarded and unguarded runs share one warm-start
        demonstrations, shape["env"] = rows, cfg.env.model_dump(exclude={"guard"}) | {"name": name}
    tokenizer: dict[str, Any] = {"tokenizer": TOKENIZER_VERSION}
    if cfg.model.tiny_tokenizer != "bpe":  # the default's cache keys predate the option
        tokenizer["kind"] = cfg.model.tiny_tokenizer
    base_key = _short_hash({"corpus": corpus, **tokenizer})
    warm_key = _short_hash(
        {
            "corpus": corpus,
            **tokenizer,
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
        tokenizer_kind=cfg.model.tiny_tokenizer,
    )
    source = scripted_demonstrations(cfg, task) if name is not None else None
    if cfg.warmstart.steps == 0:
        warn_once(
            "random_weights",
            "warmstart.steps is 0 and model.path is not set: RL starts from the embedded tiny model's random "
            "weights, whose samples almost never earn a reward; give model.path or set warmstart.steps "
            "(e.g. 1500) with demonstrations in the rows",
        )
        return base
    if source is None and not any(row.get("solution") is not None for row in rows):
        warn_once(
            "no_demonstrations",
            f"data.solution_field {cfg.data.solution_field!r} is in none of the rows: the embedded tiny model "
            "starts from random weights and cannot learn; add demonstrations (data.solution_field / "
            "data.demonstrations_path) or give model.path",
        )
        return base
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


def build_teachers(cfg: TrainConfig, task: Task, tokenizer: Any, *, dtype: torch.dtype) -> Teachers | None:
    """The distillation teachers (``distill.teachers``), or None without. Every training row must
    route to a teacher (checked now, not at the row's step), and every teacher must share the
    student's ``tokenizer``."""
    distill = cfg.distill
    if not distill.teachers:
        return None
    route = make_router(
        [teacher.name for teacher in distill.teachers],
        route_field=distill.route_field,
        routes=distill.routes,
        route_fn=distill.route_fn,
    )
    for row in task.train:
        route(row)
    folders = {teacher.name: teacher_folder(teacher.path) for teacher in distill.teachers}
    return Teachers.load(folders, tokenizer, route, dtype=dtype)


def adamw(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter allows it (CPU or CUDA floats): one
    kernel instead of a Python loop over parameters (3.5x faster on a 36M-parameter model here)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
    policy, tokenizer = load_policy(policy_path or model_path, lora=lora, hub=cfg.model.hub)
    needs_reference = preset.kl_placement != "none" and preset.kl_coef > 0
    reference = ReferencePolicy.create(model_path, policy, hub=cfg.model.hub) if needs_reference else None
    critic_source = critic_path or cfg.model.critic_path or model_path
    critic = ValueModel.from_pretrained(critic_source) if preset.uses_critic else None
    if critic is not None:  # any size of critic works, as long as it can embed every token
        critic_vocab = int(critic.backbone.config.get_text_config().vocab_size)
        if critic_vocab < len(tokenizer):
            raise ValueError(
                f"model.critic_path: the critic at {critic_source} has a vocabulary of {critic_vocab} "
                f"tokens but the policy's tokenizer has {len(tokenizer)}; use a critic of the policy's "
                "model family (same tokenizer), smaller or not"
            )
    optim = cfg.optim
    policy_optimizer = adamw(
        [p for p in policy.parameters() if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay
    )
    # the policy waits out the critic warm-up, so its schedule spans the remaining steps
    policy_steps = optim.steps - (optim.critic_warmup_steps if critic is not None else 0)
    policy_scheduler = lr_scheduler(
        policy_optimizer, optim.lr_schedule, optim.warmup_steps, max(policy_steps, 1)
    )
    critic_optimizer: torch.optim.Optimizer | None = None
    critic_scheduler = None
    if critic is not None:
        critic_optimizer = adamw(list(critic.parameters()), lr=optim.critic_lr)
        critic_scheduler = lr_scheduler(critic_optimizer, optim.lr_schedule, optim.warmup_steps, optim.steps)
    kl_controller: FixedKLController | AdaptiveKLController | None = None
    if needs_reference:
        kl_controller = (
            AdaptiveKLController(preset.kl_coef, optim.adaptive_kl_target, horizon=10_000)
            if optim.adaptive_kl_target
            else FixedKLController(preset.kl_coef)
        )
    teachers = build_teachers(cfg, task, tokenizer, dtype=next(policy.parameters()).dtype)
    engine = _engine(cfg, policy, tokenizer, model_path)
    state = TrainState(
        config=cfg,
        preset=preset,
        actor=Actor(policy, policy_optimizer, policy_scheduler),
        tokenizer=tokenizer,
        engine=engine,
        collector=build_collector(cfg, task, engine, tokenizer),
        max_new_tokens=task.max_new_tokens,
        reference=reference,
        critic=Critic(critic, critic_optimizer, critic_scheduler) if critic is not None else None,
        kl_controller=kl_controller,
        teachers=teachers,
    )
    if cfg.scale.max_policy_lag > 0:
        from posttrain.scale.asynchronous import make_asynchronous

        make_asynchronous(state, task.train, max_policy_lag=cfg.scale.max_policy_lag)
    return state


def _engine(cfg: TrainConfig, policy: torch.nn.Module, tokenizer: Any, model_path: Path) -> RolloutEngine:
    """The ``rollout.engine`` engine, in this process or on ``scale.ray`` workers."""
    if not cfg.scale.ray:
        return build_engine(cfg.rollout.engine, policy, tokenizer, model_path=model_path)
    from posttrain.scale.ray import ray_engine  # Ray is optional

    return ray_engine(
        policy,
        tokenizer,
        model_path if Path(model_path).is_dir() else None,
        num_workers=cfg.scale.rollout_workers,
        address=cfg.scale.ray_address,
    )
