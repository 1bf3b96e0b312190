"""``train(config)``: the outer loop. Set up, evaluate, run RL steps, checkpoint, report."""

from __future__ import annotations

import contextlib
import io
import random
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from posttrain.data.tasks import Task
from posttrain.models.load import save_policy
from posttrain.report.plots import plot_training_curves
from posttrain.report.tables import interception_trend, render_table, summary_table
from posttrain.train.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    load_extra_tensors,
    load_trainer_state,
    save_checkpoint,
    usable_checkpoint,
)
from posttrain.train.config import ConfigError, TrainConfig, load_config
from posttrain.train.evaluate import evaluate
from posttrain.train.interrupt import StopRequest, TrainingInterrupted, stop_on_signals
from posttrain.train.logging import CONFIG_FILE, RunLogger, TrainProgress, read_metrics
from posttrain.train.roles import Ranks, SavedOptimizer
from posttrain.train.run_folder import IDENTITY, RunLock, check_resume_settings, claim_fresh_run, run_contents
from posttrain.train.setup import build_state, build_task, embedded_model_path, seed_everything
from posttrain.train.step import TrainState, rl_step, sampling_params
from posttrain.train.trust import TRUST_FLAG, check_run_code, code_in_config
from posttrain.train.watch import (
    StepWatch,
    check_config,
    check_context,
    record_warnings,
    run_warnings,
    warn_once,
)


@dataclass
class TrainResult:
    run_dir: Path
    initial_eval: dict[str, float]
    final_eval: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    plot_path: Path | None = None
    checkpoint: Path | None = None
    table: str = ""


def rows_for_step(
    train_rows: list[dict[str, Any]], position: int, count: int, seed: int
) -> list[dict[str, Any]]:
    """Prompts ``position .. position + count`` of an endless stream of seeded per-epoch shuffles."""
    out = []
    n = len(train_rows)
    for index in range(position, position + count):
        epoch, offset = divmod(index, n)
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(train_rows[order[offset]])
    return out


def _run_eval(state: TrainState, task: Task) -> dict[str, Any]:
    cfg = state.config
    params = sampling_params(cfg, max_new_tokens=state.max_new_tokens, temperature=cfg.eval.temperature)
    return evaluate(state.collector, task.test[: cfg.eval.num_prompts], params, seed=cfg.run.seed)


def _checkpoint(state: TrainState, run_dir: Path, model_path: Path) -> Path | None:
    """Save a checkpoint (rank 0 writes what every rank gathered); None on the other ranks."""
    cfg = state.config
    optimizers, schedulers = _optimizers_and_schedulers(state, gather=True)
    policy = state.actor.full_module()
    critic = state.critic.full_module() if state.critic is not None else None
    path = None
    if state.ranks.is_main:
        trainable = {k: v.detach() for k, v in policy.named_parameters() if v.requires_grad}
        extra = {"policy_trainable": trainable} if cfg.model.lora else None
        trainer_state = {
            "step": state.step,
            "data_position": state.data_position,
            "model_path": str(model_path),
            "kl_controller": state.kl_controller.state_dict() if state.kl_controller else None,
        }
        path = save_checkpoint(
            run_dir,
            state.step,
            policy=policy,
            tokenizer=state.tokenizer,
            critic=critic,
            optimizers=optimizers,
            schedulers=schedulers,
            trainer_state=trainer_state,
            keep_last=cfg.logging.keep_last,
            save_policy=lambda out: save_policy(policy, state.tokenizer, out),
            extra_tensors=extra,
        )
    state.ranks.barrier()
    return path


def _optimizers_and_schedulers(state: TrainState, *, gather: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    optimizers: dict[str, Any] = {"policy": SavedOptimizer(state.actor, gather=gather)}
    schedulers: dict[str, Any] = {"policy": state.actor.scheduler}
    if state.critic is not None:
        optimizers["critic"] = SavedOptimizer(state.critic, gather=gather)
        schedulers["critic"] = state.critic.scheduler
    return optimizers, schedulers


def _restore(state: TrainState, checkpoint: Path) -> None:
    optimizers, schedulers = _optimizers_and_schedulers(state, gather=False)
    trainer_state = load_trainer_state(checkpoint, optimizers=optimizers, schedulers=schedulers)
    state.step = int(trainer_state["step"])
    state.data_position = int(trainer_state["data_position"])
    if state.kl_controller is not None and trainer_state.get("kl_controller"):
        state.kl_controller.load_state_dict(trainer_state["kl_controller"])
    if state.config.model.lora:
        state.actor.load_weights(load_extra_tensors(checkpoint)["policy_trainable"])
    state.engine.sync_weights(state.policy)  # an engine with its own copy samples the restored weights


def _logged_final_eval(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The final eval already logged at ``step`` (a finished run), else None."""
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if row.get("final") and row.get("step") == step:
            return {k: v for k, v in row.items() if k.startswith("eval_")}
    return None


def resume_command(cfg: TrainConfig, run_dir: Path) -> str:
    """The command that continues this run (with the trust flag its own code needs)."""
    trust = f" {TRUST_FLAG}" if code_in_config(cfg.model_dump()) else ""
    return f"posttrain train --resume {shlex.quote(str(run_dir))}{trust}"


@run_warnings()  # each warning of the run printed once, and kept in the run folder
def train(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, ranks: Ranks | None = None
) -> TrainResult:
    """Run RL training as configured, in ``run.output_dir/run.name``.

    A folder that already holds a run is refused unless ``resume`` (continue it from its newest
    usable checkpoint, with the same settings but for ``optim.steps``, ``eval.*`` and ``logging.*``)
    or ``overwrite`` (delete it and start again). One process at a time trains in a folder. SIGINT /
    SIGTERM stop the run after the current step with a checkpoint: ``TrainingInterrupted``.
    ``ranks``: the processes sharing the run (``scale.fsdp.init_distributed()`` under torchrun);
    rank 0 alone writes the run folder.
    """
    if resume and overwrite:
        raise ValueError("resume continues the run in the folder and overwrite deletes it: pick one")
    cfg = config
    ranks = ranks or Ranks()
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # the handlers first: a Ctrl-C at any point of the run, its very start included, ends it cleanly
    with stop_on_signals() as stop:
        try:
            with RunLock(run_dir) if ranks.is_main else contextlib.nullcontext():
                return _train(cfg, run_dir, stop, ranks, resume=resume, overwrite=overwrite)
        except TrainingInterrupted as interrupted:
            checkpoint = interrupted.checkpoint if not interrupted.at_once else latest_checkpoint(run_dir)
            interrupted.describe(
                run_dir, checkpoint, resume_command(cfg, run_dir), bool(run_contents(run_dir))
            )
            raise


def _resume_point(cfg: TrainConfig, run_dir: Path) -> Path:
    """The newest usable checkpoint of the run, saying which newer ones are damaged; the resumed
    settings must be ones a resume may change."""
    checkpoint, damaged = usable_checkpoint(run_dir)
    for path, problems in damaged:
        instead = f"resuming from {checkpoint.name} instead" if checkpoint else "no older one is usable"
        warn_once(f"damaged/{path.name}", f"checkpoint {path} is damaged ({'; '.join(problems)}); {instead}")
    if checkpoint is None and damaged:
        raise CheckpointError(
            f"--resume: no usable checkpoint under {run_dir / 'checkpoints'} (every one is damaged, see "
            "above); start the run again with --overwrite"
        )
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    check_resume_settings(run_dir, cfg, checkpoint_step(checkpoint) or 0)
    return checkpoint


def _train(
    cfg: TrainConfig, run_dir: Path, stop: StopRequest, ranks: Ranks, *, resume: bool, overwrite: bool
) -> TrainResult:
    """``train`` inside the run folder's lock and the signal handlers."""
    checkpoint = _resume_point(cfg, run_dir) if resume else None
    if ranks.is_main:
        if checkpoint is None:
            claim_fresh_run(run_dir, overwrite=overwrite)
        record_warnings(run_dir, resume=checkpoint is not None)
    check_config(cfg)
    if ranks.world_size > 1 and cfg.scale.ray:
        raise ConfigError(
            "scale.ray with several training processes (--nproc / torchrun) is not supported yet"
        )
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    if cfg.model.path:
        model_path = Path(cfg.model.path)
    else:  # rank 0 builds (and caches) the embedded model; the others then load it
        model_path = embedded_model_path(cfg, task) if ranks.is_main else Path()
        ranks.barrier()
        if not ranks.is_main:
            model_path = embedded_model_path(cfg, task)

    # a resumed full fine-tune continues from the checkpoint's weights; the reference stays the original
    policy_path = checkpoint / "policy" if checkpoint is not None and not cfg.model.lora else model_path
    critic_path = (
        checkpoint / "critic" if checkpoint is not None and (checkpoint / "critic").is_dir() else None
    )
    state = ranks.place(build_state(cfg, task, model_path, policy_path=policy_path, critic_path=critic_path))
    try:
        if checkpoint is not None:
            _restore(state, checkpoint)
        check_context(state, task)

        # a resume cuts the logs back to the checkpoint it starts from (an older one if newer are damaged)
        resume_step = checkpoint_step(checkpoint) if checkpoint is not None else None
        with contextlib.ExitStack() as stack:
            if ranks.is_main:
                logger = RunLogger(
                    run_dir,
                    tensorboard=cfg.logging.tensorboard,
                    resume=checkpoint is not None,
                    resume_step=resume_step,
                )
            else:  # the other ranks compute the same metrics; their logs go nowhere
                logger = RunLogger(
                    Path(stack.enter_context(tempfile.TemporaryDirectory())), tensorboard=False
                )
            return _train_logged(cfg, run_dir, stop, state, task, logger, checkpoint, model_path)
    finally:  # Ray workers and background rollout threads end with the run
        for part in (state.collector, state.engine):
            close = getattr(part, "close", None)
            if callable(close):
                close()


def _train_logged(
    cfg: TrainConfig,
    run_dir: Path,
    stop: StopRequest,
    state: TrainState,
    task: Task,
    logger: RunLogger,
    checkpoint: Path | None,
    model_path: Path,
) -> TrainResult:
    """Evaluate, train and evaluate again, logging to ``logger``."""
    with logger:
        logger.write_config(cfg.model_dump())
        initial: dict[str, Any] = {}
        if checkpoint is None:
            initial = _run_eval(state, task)
            logger.log_metrics(0, {k: v for k, v in initial.items() if k != "samples"})
        start = time.perf_counter()
        saved = _rl_steps(state, task, logger, stop, run_dir, model_path)
        if state.ranks.any_rank(stop.requested):  # the running step finished: save it, then stop
            interrupted = stop.interrupted(state.step)
            interrupted.checkpoint = saved or _checkpoint(state, run_dir, model_path)
            raise interrupted
        # a resumed run that had already finished keeps its final eval and checkpoint (no duplicate lines)
        final = _logged_final_eval(run_dir, state.step) if checkpoint is not None else None
        if final is None:
            final = _run_eval(state, task)
            logger.log_metrics(
                state.step, {k: v for k, v in final.items() if k != "samples"} | {"final": 1.0}
            )
            logger.log_samples(
                state.step, [dict(s, split="test") for s in final["samples"][: cfg.logging.num_samples]]
            )
            last = _checkpoint(state, run_dir, model_path)
        else:
            last = checkpoint
    if not state.ranks.is_main:
        return TrainResult(run_dir, {}, {k: v for k, v in final.items() if k != "samples"})
    return _result(cfg, task, run_dir, initial, final, last, time.perf_counter() - start)


def _rl_steps(
    state: TrainState, task: Task, logger: RunLogger, stop: StopRequest, run_dir: Path, model_path: Path
) -> Path | None:
    """RL steps until ``optim.steps`` or a stop signal; returns the checkpoint written after the
    last step run, if one was."""
    cfg = state.config
    watch = StepWatch(cfg)
    saved = None
    # one rank reports progress; the others compute the same numbers
    console = None if state.ranks.is_main else Console(file=io.StringIO(), quiet=True)
    with TrainProgress(
        cfg.optim.steps, enabled=cfg.logging.progress, start_step=state.step, console=console
    ) as progress:
        stop.defer()  # from here a signal lets the running step finish, and the loop saves and stops
        # every rank stops after the same step (a signal may reach only some of them)
        while state.step < cfg.optim.steps and not state.ranks.any_rank(stop.requested):
            rows = rows_for_step(task.train, state.data_position, cfg.rollout.prompts_per_step, cfg.run.seed)
            state.data_position += len(rows)
            metrics = rl_step(state, rows)
            watch.after_step(state.step, metrics)
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.optim.steps:
                metrics.update({k: v for k, v in _run_eval(state, task).items() if k != "samples"})
            logger.log_metrics(state.step, metrics)
            logger.log_samples(state.step, state.last_samples[: cfg.logging.num_samples])
            progress.update(state.step, metrics)
            every = cfg.logging.checkpoint_every
            saved = None
            if every and state.step % every == 0 and state.step < cfg.optim.steps:
                saved = _checkpoint(state, run_dir, model_path)
    return saved


def _result(
    cfg: TrainConfig,
    task: Task,
    run_dir: Path,
    initial: dict[str, Any],
    final: dict[str, Any],
    last: Path | None,
    seconds: float,
) -> TrainResult:
    """Curves, the before/after table and the result of a finished run."""
    history = read_metrics(run_dir / "metrics.jsonl")
    keys = ["reward_mean", "accuracy", "eval_accuracy", "kl", "entropy", "response_length"]
    if cfg.optim.epochs > 1 or cfg.optim.num_mini_batches > 1:
        keys.insert(4, "clipfrac")  # one on-policy update per rollout never clips
    # agent runs, guarded runs and critics only (absent: skipped)
    keys += ["turns", "segments", "guard_interception_rate", "explained_variance"]
    plot = plot_training_curves(
        history, run_dir / "curves.png", keys=keys, title=f"{cfg.algorithm} on {task.name}"
    )
    if not initial:
        initial = next((h for h in history if h.get("step") == 0 and "eval_accuracy" in h), {})
    rows_table = []
    for label, ev in (("before RL", initial), ("after RL", final)):
        if ev:
            rows_table.append(
                {
                    "model": label,
                    "eval accuracy": f"{100 * ev['eval_accuracy']:.1f}%",
                    "eval reward": f"{ev['eval_reward']:.3f}",
                    "response length": f"{ev['eval_response_length']:.1f}",
                }
            )
    table = render_table(
        summary_table(
            rows_table,
            ["model", "eval accuracy", "eval reward", "response length"],
            title=f"{cfg.algorithm} on {task.name}: {cfg.optim.steps} steps in {seconds:.0f} s",
        )
    )
    trend = interception_trend(history)
    if trend:
        table += trend + "\n"
    return TrainResult(
        run_dir=run_dir,
        initial_eval={k: v for k, v in initial.items() if k != "samples"},
        final_eval={k: v for k, v in final.items() if k != "samples"},
        history=history,
        plot_path=plot,
        checkpoint=last,
        table=table,
    )


def _run_folder(path: str | Path) -> Path:
    """``path`` as a run folder whose last part is its name (``.`` or ``runs/x/..`` resolved)."""
    path = Path(path)
    return path.resolve() if path.name in ("", ".", "..") else path


def resume_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    trust_run_code: bool = False,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir``, wherever it was moved, from its newest usable checkpoint,
    with its ``config.yaml`` and the ``overrides`` a resume allows. Code the config names (reward
    files, environments, judges) is imported only with ``trust_run_code``: the folder may be
    someone else's."""
    run_dir = _run_folder(run_dir)
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not a run folder")
    keys = [item.split("=", 1)[0].strip() for item in overrides or []]
    moved = [key for key in keys if key == "run" or key in IDENTITY]
    if moved:
        raise ConfigError(
            f"--resume {run_dir}: --set {moved[0]} cannot move a run; the run is the folder given to --resume"
        )
    check_run_code(config_file, overrides, trusted=trust_run_code, action=f"--resume {run_dir}")
    config = load_config(config_file, overrides)
    # the folder given is the run, even when config.yaml still names where it was written
    config.run.output_dir, config.run.name = str(run_dir.parent), run_dir.name
    return train(config, resume=True, ranks=ranks)
