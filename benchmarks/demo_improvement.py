"""Does RL improve the warm-started tiny model on the default task? ppo and grpo, several seeds.

    python benchmarks/demo_improvement.py --algorithms ppo,grpo --seeds 0,1 [--set optim.steps=40]

A thin wrapper over ``posttrain compare`` on the embedded demo: every algorithm runs every seed
(consecutive seeds, e.g. 0,1 or 3,4,5), in parallel processes; each run's line shows its held-out
accuracy before and after RL, then the comparison table, the recommendation and where
``report.md`` and the curves are (``--out``, default runs/demo-improvement).
"""

from __future__ import annotations

import argparse

from posttrain.cli import main as posttrain


def consecutive_seeds(text: str) -> tuple[int, int]:
    """``"3,4,5"`` -> (first seed 3, count 3); compare runs seeds ``run.seed .. run.seed + n - 1``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise argparse.ArgumentTypeError(f"expected consecutive seeds such as 0,1 or 3,4,5; got {text!r}")
    return seeds[0], len(seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", default="ppo,grpo")
    parser.add_argument("--seeds", type=consecutive_seeds, default=(0, 2), metavar="0,1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/demo-improvement")
    parser.add_argument("--workers", default=None)
    args = parser.parse_args(argv)
    first, count = args.seeds
    command = ["compare", "--algos", args.algorithms, "--seeds", str(count), "--out", args.out, "--overwrite"]
    command += ["--set", f"run.seed={first}", *[arg for item in args.set for arg in ("--set", item)]]
    if args.workers is not None:
        command += ["--workers", args.workers]
    return posttrain(command)


if __name__ == "__main__":
    raise SystemExit(main())
