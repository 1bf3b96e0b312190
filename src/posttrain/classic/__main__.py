"""``python -m posttrain.classic --env CartPole-v1 --algos ppo,grpo,rloo --seeds 3 --steps 300000``."""

from __future__ import annotations

import argparse

from posttrain.classic.study import add_classic_arguments, main_from_args


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.classic", description=__doc__)
    add_classic_arguments(parser)
    return main_from_args(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
