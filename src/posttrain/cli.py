"""Command line: ``posttrain train``, ``posttrain eval``, ``posttrain classic``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _train(args: argparse.Namespace) -> int:
    from posttrain.train.config import ConfigError, load_config
    from posttrain.train.loop import resume_run, train

    try:
        if args.resume:
            result = resume_run(args.resume, args.set)
        else:
            config = load_config(args.config, args.set)
            if args.print_config:
                print(yaml.safe_dump(config.model_dump(), sort_keys=False))
                return 0
            result = train(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.table)
    print(f"curves:     {result.plot_path}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from posttrain.models.load import load_policy
    from posttrain.rollout.hf import HFRolloutEngine
    from posttrain.train.checkpoint import resolve_policy_dir
    from posttrain.train.config import ConfigError, load_config
    from posttrain.train.evaluate import evaluate
    from posttrain.train.logging import CONFIG_FILE
    from posttrain.train.setup import build_collector, build_task
    from posttrain.train.step import sampling_params

    try:
        model_dir, run_dir = resolve_policy_dir(args.model)
        run_config = run_dir / CONFIG_FILE if run_dir and (run_dir / CONFIG_FILE).is_file() else None
        # a run's own checkpoint is evaluated on that run's task and split unless --config says otherwise
        config = load_config(args.config or run_config, args.set)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    task = build_task(config)
    print(
        f"model: {model_dir}"
        + (f"  (task settings from {run_config})" if run_config and not args.config else "")
    )
    model, tokenizer = load_policy(model_dir)
    rows = task.test if args.split == "test" else task.train
    collector = build_collector(config, task, HFRolloutEngine(model, tokenizer), tokenizer)
    params = sampling_params(config, max_new_tokens=task.max_new_tokens, temperature=args.temperature)
    result = evaluate(collector, rows[: args.num_prompts], params)
    print(
        f"{task.name} {args.split}: accuracy {100 * result['eval_accuracy']:.1f}%  "
        f"mean reward {result['eval_reward']:.3f}  ({len(result['samples'])} prompts)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="RL-train a causal LM (no arguments: the embedded demo)")
    train.add_argument("--config", type=Path, default=None, help="YAML config (default: the embedded demo)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set algorithm=ppo --set rollout.group_size=8",
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue runs/<name> from its last checkpoint",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a task split")
    ev.add_argument(
        "--model", required=True, help="a run folder, one of its checkpoints, or any local HF model folder"
    )
    ev.add_argument("--config", type=Path, default=None)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--split", choices=["test", "train"], default="test")
    ev.add_argument("--num-prompts", type=int, default=200)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.set_defaults(func=_eval)

    try:
        from posttrain.classic.study import add_classic_arguments, main_from_args
    except ImportError:  # the classic study is optional
        pass
    else:
        classic = sub.add_parser("classic", help="critic vs group baselines on gymnasium control tasks")
        add_classic_arguments(classic)
        classic.set_defaults(func=main_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
