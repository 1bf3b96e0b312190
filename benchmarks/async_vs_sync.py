"""Asynchronous rollouts (lag 1) against synchronous ones, side by side on one machine.

The demo's settings (``posttrain train``'s default config: GRPO on arithmetic, the embedded tiny
Llama, 32 prompts x 8 samples per step) with few steps. One Ray rollout worker and the trainer
(this process), one torch thread each, so 2 cores:

- sync: the worker samples step k's rollout while the trainer waits, then the trainer trains while
  the worker waits (``rl_step`` with the Ray engine, as the in-process one would);
- async: ``scale.asynchronous`` with ``max_policy_lag`` 1 and the truncated rollout correction
  (the trainer recomputes old log-probs: the samples are one update old); step k+1's rollout is
  generated while step k trains;
- in-process: the HF engine on the policy itself, no Ray (the single-process reference).

Printed: wall seconds per step (median [min, max] over the steps after each run's first), the
sync / async ratio (> 1: async is faster) and where a step's time goes.

    python benchmarks/async_vs_sync.py [--steps 8] [--rounds 2] [--set KEY=VALUE ...] [--out runs/bench/async_vs_sync]

The warm-started model is cached under ``run.output_dir/.cache`` (the demo's, ``runs``, by
default). Writes ``<out>/results.json`` and ``<out>/table.txt``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from _bench_common import THREAD_ENV

for _key, _value in THREAD_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the thread settings)
from _bench_common import fmt_spread, machine_info, quiet_transformers, ratio, spread, write_results  # noqa: E402

MODES = ("sync", "async", "in-process")
CORRECTION = "algo.rollout_correction={mode: truncate, threshold: 2.0}"
# the parts of a step printed beside the totals (medians over the timed steps)
PARTS = ("time/generate", "async/wait_s", "time/logprobs", "time/train", "time/sync")


def run_mode(
    mode: str, cfg: Any, task: Any, model_path: Path, engine: Any, steps: int
) -> list[dict[str, float]]:
    """``steps`` RL steps of a fresh state in ``mode``; per step its metrics and wall seconds."""
    from posttrain.scale.asynchronous import make_asynchronous
    from posttrain.train.loop import rows_for_step
    from posttrain.train.setup import build_state, seed_everything
    from posttrain.train.step import rl_step

    seed_everything(cfg.run.seed)
    state = build_state(cfg, task, model_path)
    if mode != "in-process":
        engine.logprobs_match_policy = True
        engine.sync_weights(state.policy)
        engine.wait_synced()
        state.engine = state.collector.engine = engine  # type: ignore[attr-defined]
    if mode == "async":
        make_asynchronous(state, task.train, max_policy_lag=1)
    history = []
    for _ in range(steps):
        started = time.perf_counter()
        rows = rows_for_step(task.train, state.data_position, cfg.rollout.prompts_per_step, cfg.run.seed)
        state.data_position += len(rows)
        metrics = rl_step(state, rows)
        metrics["wall_s"] = time.perf_counter() - started
        history.append(metrics)
    close = getattr(state.collector, "close", None)
    if callable(close):
        close()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/async_vs_sync"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first step of a run is not timed")

    import ray

    quiet_transformers()
    from posttrain.scale.ray import LOCAL_INIT, ray_engine
    from posttrain.train.config import load_config
    from posttrain.train.setup import build_state, build_task, embedded_model_path

    base = ["logging.progress=false", "logging.tensorboard=false", *args.set]
    configs = {
        "sync": load_config(None, base),
        "async": load_config(None, [*base, CORRECTION]),
        "in-process": load_config(None, base),
    }
    cfg = configs["sync"]
    torch.set_num_threads(cfg.run.num_threads or 1)
    task = build_task(cfg)
    model_path = embedded_model_path(cfg, task)
    ray.init(num_cpus=2, **LOCAL_INIT)
    try:
        policy_state = build_state(cfg, task, model_path)
        engine = ray_engine(policy_state.policy, policy_state.tokenizer, model_path, num_workers=1)
        del policy_state
        histories: dict[str, list[list[dict[str, float]]]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                histories[mode].append(run_mode(mode, configs[mode], task, model_path, engine, args.steps))
        engine.close()
    finally:
        ray.shutdown()

    timed = {mode: [step for run in runs for step in run[1:]] for mode, runs in histories.items()}
    walls = {mode: [step["wall_s"] for step in steps] for mode, steps in timed.items()}
    speedup = ratio(spread(walls["sync"])["median"], spread(walls["async"])["median"])
    lines = [
        f"async vs sync rollouts: {cfg.algorithm} on {task.name}, {cfg.rollout.prompts_per_step} prompts x "
        f"{cfg.rollout.group_size} samples, tiny {cfg.model.tiny_hidden_size}x{cfg.model.tiny_layers}; "
        f"1 Ray rollout worker + 1 trainer, 1 thread each; {args.rounds} x {args.steps} steps per mode",
        "wall s/step, median [min, max] over the steps after each run's first:",
    ]
    for mode in MODES:
        lag = spread([step.get("async/policy_lag", 0.0) for step in timed[mode]])["median"]
        lines.append(f"  {mode:<11} {fmt_spread(walls[mode])}   policy lag {lag:g}")
    lines.append(f"ratio sync / async: {speedup:.2f}  (> 1: async is faster)")
    lines.append("parts (median s): " + ", ".join(PARTS))
    for mode in MODES:
        parts = [spread([step.get(key, 0.0) for step in timed[mode]])["median"] for key in PARTS]
        lines.append(f"  {mode:<11} " + "  ".join(f"{value:.3f}" for value in parts))
    table = "\n".join(lines) + "\n"
    print(table, end="")
    results = {
        "machine": machine_info(),
        "steps": args.steps,
        "rounds": args.rounds,
        "overrides": args.set,
        "wall_s": {mode: spread(values) for mode, values in walls.items()},
        "ratio_sync_over_async": speedup,
        "history": {
            mode: [[_numbers(step) for step in run] for run in runs] for mode, runs in histories.items()
        },
    }
    write_results(args.out, "async_vs_sync", results, table)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}


if __name__ == "__main__":
    main()
