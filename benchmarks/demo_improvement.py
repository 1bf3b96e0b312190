"""Does RL improve the warm-started tiny model on the default task? ppo and grpo, several seeds.

    python benchmarks/demo_improvement.py --algorithms ppo,grpo --seeds 0,1 [--set optim.steps=40]

Prints held-out accuracy before and after RL for every run, and the mean gain per algorithm.
"""

from __future__ import annotations

import argparse
import statistics

from transformers.utils import logging as hf_logging

from posttrain.train.config import load_config
from posttrain.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", default="ppo,grpo")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # as the CLI does: one progress bar per run is enough
    gains: dict[str, list[float]] = {}
    print(f"{'algorithm':<10} {'seed':>4} {'before':>8} {'after':>8} {'gain':>8}")
    for algorithm in args.algorithms.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            overrides = [
                f"algorithm={algorithm}",
                f"run.seed={seed}",
                f"run.name=bench-{algorithm}-s{seed}",
                "logging.progress=false",
                *args.set,
            ]
            result = train(load_config(None, overrides), overwrite=True)  # a rerun replaces its runs
            before = 100 * result.initial_eval["eval_accuracy"]
            after = 100 * result.final_eval["eval_accuracy"]
            gains.setdefault(algorithm, []).append(after - before)
            print(
                f"{algorithm:<10} {seed:>4} {before:>7.1f}% {after:>7.1f}% {after - before:>+7.1f}",
                flush=True,
            )
    for algorithm, values in gains.items():
        print(f"{algorithm}: mean gain {statistics.mean(values):+.1f} points over {len(values)} seed(s)")


if __name__ == "__main__":
    main()
