"""Critic or group baseline on long agent episodes? ppo vs grpo vs gspo on the key_chain environment.

    python benchmarks/agent_horizon_study.py --seeds 0,1,2 [--algorithms ppo,grpo,gspo]
        [--set optim.steps=40] [--out runs/agent_horizon_study]

Settings of the built-in key_chain task (``--settings``, default ``short,long``): ``short``, whose
episodes fit one context; ``long``, compacted into about 3 sub-traces (``env.context_budget``); and
``longer``, 5-8 sub-traces with rarer success. Every run starts from the same warm-start per seed (a
sloppy demonstrator that answers early at keys starting with 9), samples the same number of episodes
per step, and is evaluated greedily on held-out chains. Writes
``<out>/results-<settings>-<algorithms>-s<seeds>.json`` (run e.g. ``--settings short`` and
``--settings long`` as two processes to use two cores; each reports every result found in
``<out>``), ``<out>/table.txt`` (held-out success mean ± std over seeds, sampled tokens to reach
the threshold, seconds of RL) and ``<out>/<setting>.png`` (success vs sampled tokens, mean and
min-max band over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging as hf_logging

from posttrain.report.plots import plot_curves_by_group
from posttrain.report.tables import render_table, summary_table
from posttrain.train.config import load_config
from posttrain.train.logging import read_metrics
from posttrain.train.loop import train

# shared by every run: the model, the warm-start, the batch, the evaluation
COMMON = [
    "data.task=key_chain",
    "data.num_train=600",
    "data.num_test=100",
    "model.tiny_hidden_size=64",
    "model.tiny_layers=2",
    "warmstart.steps=1200",
    "warmstart.batch_size=32",
    "warmstart.lr=0.003",
    "rollout.prompts_per_step=16",
    "rollout.group_size=4",
    "optim.steps=30",
    "optim.lr=2e-4",
    "eval.every=5",
    "eval.num_prompts=100",
    "env.context_budget=64",
    "env.keep_turns=1",
    "logging.tensorboard=false",
    "logging.progress=false",
]
SETTINGS = {
    "short": ["data.task_options={min_horizon: 2, max_horizon: 3}"],  # fits one 64-token context
    "long": ["data.task_options={min_horizon: 6, max_horizon: 8}"],  # 2-3 sub-traces per episode
    "longer": ["data.task_options={min_horizon: 14, max_horizon: 18}"],  # 5-8 sub-traces, rarer success
}
ORDER = ["ppo", "grpo", "gspo"]
THRESHOLD = 0.9  # held-out success rate for "tokens to reach"


def eval_curve(history: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative sampled tokens, held-out success) at every evaluation, step 0 included."""
    tokens, xs, ys = 0.0, [], []
    for row in sorted(history, key=lambda r: r.get("step", 0)):
        tokens += row.get("sampled_tokens", 0.0)
        if "eval_accuracy" in row:
            xs.append(tokens)
            ys.append(row["eval_accuracy"])
    return np.asarray(xs), np.asarray(ys)


def rl_seconds(history: list[dict[str, Any]]) -> float:
    """Seconds spent in RL steps (collect, prepare, update), without the warm-start and evaluations."""
    return float(sum(row.get("time/step", 0.0) for row in history))


def tokens_to_reach(curve: tuple[np.ndarray, np.ndarray], threshold: float) -> float | None:
    xs, ys = curve
    hits = np.nonzero(ys >= threshold)[0]
    return float(xs[hits[0]]) if hits.size else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", default="ppo,grpo,gspo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="short,long")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/agent_horizon_study")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots from <out>")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(load_results(out), out)
        return
    results: list[dict[str, Any]] = []
    for setting in args.settings.split(","):
        for algorithm in args.algorithms.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                overrides = [
                    *COMMON,
                    *SETTINGS[setting],
                    f"algorithm={algorithm}",
                    f"run.seed={seed}",
                    f"run.name=study-{setting}-{algorithm}-s{seed}",
                    f"run.output_dir={out}",
                    *args.set,
                ]
                start = time.perf_counter()
                result = train(load_config(None, overrides), overwrite=True)  # a rerun replaces its runs
                xs, ys = eval_curve(result.history)
                record = {
                    "setting": setting,
                    "algorithm": algorithm,
                    "seed": seed,
                    "before": result.initial_eval["eval_accuracy"],
                    "after": result.final_eval["eval_accuracy"],
                    "segments": result.final_eval.get("eval_segments"),
                    "sampled_tokens": float(xs[-1]) if xs.size else 0.0,
                    "seconds": time.perf_counter() - start,
                    "rl_seconds": rl_seconds(result.history),
                    "curve": [xs.tolist(), ys.tolist()],
                }
                results.append(record)
                print(
                    f"{setting:<6} {algorithm:<5} seed {seed}: {100 * record['before']:.0f}% -> "
                    f"{100 * record['after']:.0f}% ({record['seconds']:.0f} s)",
                    flush=True,
                )
                (
                    out / f"results-{args.settings}-{args.algorithms}-s{args.seeds}.json".replace(",", "-")
                ).write_text(json.dumps(results, indent=1))
    write_report(load_results(out), out)


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every run recorded in ``out`` (settings run as separate processes report together)."""
    found = [record for path in sorted(out.glob("results-*.json")) for record in json.loads(path.read_text())]
    # a run repeated by another process counts once
    records = list({(r["setting"], r["algorithm"], r["seed"]): r for r in found}.values())
    for record in records:
        if "rl_seconds" not in record:  # recorded by an earlier version: read the run's metrics
            name = f"study-{record['setting']}-{record['algorithm']}-s{record['seed']}"
            record["rl_seconds"] = rl_seconds(read_metrics(out / name / "metrics.jsonl"))
    return records


def percent_mean_std(values: list[float]) -> str:
    """``"mean ± std"`` in percent over seeds (std with Bessel's correction)."""
    percents = [100 * v for v in values]
    spread = statistics.stdev(percents) if len(percents) > 1 else 0.0
    return f"{statistics.mean(percents):.1f} ± {spread:.1f}"


def write_report(results: list[dict[str, Any]], out: Path) -> None:
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        curves: dict[str, list[tuple[Any, Any]]] = {}
        # a fixed order, so an algorithm keeps its colour across settings
        for algorithm in sorted(
            {r["algorithm"] for r in results},
            key=lambda a: (a not in ORDER, ORDER.index(a) if a in ORDER else 0, a),
        ):
            runs = [r for r in results if r["setting"] == setting and r["algorithm"] == algorithm]
            if not runs:
                continue
            curves[algorithm] = [tuple(r["curve"]) for r in runs]
            hits = [
                tokens_to_reach((np.asarray(r["curve"][0]), np.asarray(r["curve"][1])), THRESHOLD)
                for r in runs
            ]
            reached = [tokens for tokens in hits if tokens is not None]
            rows.append(
                {
                    "setting": setting,
                    "algorithm": algorithm,
                    "seeds": len(runs),
                    "sub-traces": f"{statistics.mean(r['segments'] or 1 for r in runs):.2f}",
                    "sampled tokens": f"{statistics.mean(r['sampled_tokens'] for r in runs):.3g}",
                    "success before %": percent_mean_std([r["before"] for r in runs]),
                    "success after %": percent_mean_std([r["after"] for r in runs]),
                    f"tokens to {THRESHOLD:.0%}": f"{statistics.mean(reached):.3g} ({len(reached)}/{len(runs)})"
                    if reached
                    else f"- (0/{len(runs)})",
                    "RL s": f"{statistics.mean(r['rl_seconds'] for r in runs):.0f}",
                }
            )
        plot_curves_by_group(
            curves,
            out / f"{setting}.png",
            xlabel="sampled tokens",
            ylabel="held-out success",
            title=f"key_chain, {setting} horizon",
        )
    columns = list(rows[0]) if rows else []
    table = render_table(summary_table(rows, columns, title="agent horizon study"))
    (out / "table.txt").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
