"""Command line: ``posttrain train``, ``eval``, ``compare``, ``report``, ``classic``.

Errors that come from what the user gave (a config key, a data file, a reward function, a model
folder, a checkpoint) print as ``error: <message>`` on at most two lines and exit with code 2;
``--debug`` (or ``POSTTRAIN_DEBUG=1``) prints the traceback as well. Any other exception is a bug
and shows its traceback.
"""

from __future__ import annotations

import argparse
import linecache
import math
import os
import shlex
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import yaml
from pydantic import BaseModel

DEBUG_ENV = "POSTTRAIN_DEBUG"
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped

# Errors posttrain raises on purpose, as "module:Class". Checked through sys.modules: a class whose
# module was never imported cannot have been raised, and reporting an error must not import torch.
USER_ERRORS = (
    "posttrain.train.config:ConfigError",
    "posttrain.models.load:ModelLoadError",
    "posttrain.rewards.functions:RewardSpecError",
    "posttrain.rewards.functions:RewardFunctionError",
    "posttrain.envs.registry:EnvSpecError",
    "posttrain.rollout.multi_turn:EnvError",
    "posttrain.cli:UsageError",
    "posttrain.train.run_folder:RunFolderError",
    "posttrain.report.runs:RunReadError",
)
# Modules whose plain ValueError / FileNotFoundError check what the user gave (data rows, files,
# settings, checkpoints). The same classes raised anywhere else (torch, a bug of ours) are not caught.
INPUT_CHECKING_MODULES = (
    "posttrain.data",
    "posttrain.rewards",
    "posttrain.envs",
    "posttrain.plugins",
    "posttrain.models.load",
    "posttrain.rollout.multi_turn",
    "posttrain.train.config",
    "posttrain.train.setup",
    "posttrain.train.checkpoint",
    "posttrain.train.loop",
    "posttrain.classic",
    "posttrain.report.runs",
)


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to add."""


# ------------------------------------------------------------------------------ user errors


def user_error_classes() -> tuple[type[BaseException], ...]:
    """The classes of ``USER_ERRORS`` whose modules are imported."""
    classes = []
    for spec in USER_ERRORS:
        module_name, name = spec.split(":")
        module = sys.modules.get(module_name)
        if module is not None:
            classes.append(getattr(module, name))
    return tuple(classes)


def _in_module(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def raised_on_purpose(error: BaseException) -> bool:
    """True when a ``raise`` statement in one of ``INPUT_CHECKING_MODULES`` raised ``error``
    (not, say, ``int("x")`` failing inside one of them)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return _in_module(module, INPUT_CHECKING_MODULES) and line.lstrip().startswith("raise")


def is_user_error(error: BaseException) -> bool:
    """An error about the user's input, to report in a line or two, not a bug."""
    if isinstance(error, user_error_classes()):
        return True
    return isinstance(error, ValueError | FileNotFoundError) and raised_on_purpose(error)


def format_error(error: BaseException, width: int = 100) -> str:
    """``error: <message>`` on at most two lines: the message's own lines are joined (a config's
    "invalid config:" list becomes "invalid config: a: ...; b: ..."), then a long message is split
    once, at a clause boundary if one is near the width, so nothing is lost."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = parts[0]
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    text = "error: " + text
    if len(text) <= width:
        return text
    cut = _break_point(text, width)
    return text[:cut].rstrip() + "\n  " + text[cut:].lstrip()


def _break_point(text: str, width: int) -> int:
    """Where to split ``text``: after the last "; ", ": " or ". " in the second half of ``width``,
    else at the last space before it, else at ``width``."""
    head = text[:width]
    clause = max(head.rfind(sep) for sep in ("; ", ": ", ". "))
    if clause >= width // 2:
        return clause + 2
    space = head.rfind(" ")
    return space + 1 if space > 0 else width


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


# ------------------------------------------------------------------------------ --print-config


def commented_yaml(section: BaseModel, indent: int = 0) -> str:
    """``section`` as YAML that ``load_config`` reads back, with each key's description (its
    Field description, else its section's docstring) as ``#`` comment lines above the key."""
    pad = " " * indent
    dumped = section.model_dump()
    lines: list[str] = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        note = field.description or (value.__doc__ if isinstance(value, BaseModel) else None)
        if note:
            lines += [pad + "# " + line for line in textwrap.wrap(" ".join(note.split()), 100 - indent)]
        if isinstance(value, BaseModel) and type(value).model_fields:
            lines.append(f"{pad}{name}:")
            lines.append(commented_yaml(value, indent + 2))
        else:
            block = yaml.safe_dump({name: dumped[name]}, sort_keys=False, width=float("inf"))
            lines += [pad + line for line in block.splitlines()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ commands


def _check_train_flags(args: argparse.Namespace) -> None:
    """Flags that would be ignored in this combination are refused, naming what to drop."""
    if args.resume is None:
        if args.trust_run_code:
            raise UsageError(
                "--trust-run-code applies to --resume (a run folder's config may name code); a run "
                "started from your own config needs no flag"
            )
        return
    for flag, given in (("--config", args.config), ("--overwrite", args.overwrite)):
        if given:
            raise UsageError(
                f"--resume continues the run in {args.resume} with its own config.yaml; drop {flag}"
            )
    if args.print_config:
        raise UsageError("--print-config shows a new run's config; the run's own is in its config.yaml")


def _train(args: argparse.Namespace) -> int:
    from posttrain.train.config import load_config

    _check_train_flags(args)
    if args.ray:
        args.set = [*args.set, "scale.ray=true"]
    # the trainer imports in seconds: a bad config is reported before that
    config = None if args.resume else load_config(args.config, args.set)
    if config is not None and args.print_config:
        print(commented_yaml(config))
        return 0
    if args.resume is not None:
        from posttrain.train.logging import CONFIG_FILE
        from posttrain.train.trust import check_run_code

        # before the trainer's imports too, and before loading the config (which imports an environment)
        action = f"--resume {args.resume}"
        check_run_code(args.resume / CONFIG_FILE, args.set, trusted=args.trust_run_code, action=action)
    if args.nproc > 1:
        return _launch_processes(args)
    from posttrain.scale.fsdp import init_distributed, world_size_from_env
    from posttrain.train.loop import resume_run, train

    ranks = init_distributed() if world_size_from_env() > 1 else None  # under torchrun
    if config is None:
        result = resume_run(args.resume, args.set, trust_run_code=args.trust_run_code, ranks=ranks)
    elif config.scale.ray:  # the trainer is a Ray task too, beside the rollout workers
        from posttrain.scale.ray import run_training_on_ray

        result = run_training_on_ray(config, address=config.scale.ray_address, overwrite=args.overwrite)
    else:
        result = train(config, overwrite=args.overwrite, ranks=ranks)
    if ranks is not None and not ranks.is_main:
        return 0
    print(result.table)
    print(f"curves:     {result.plot_path}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}")
    return 0


def _launch_processes(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command in N processes under torchrun (one machine), FSDP2 over them."""
    argv = list(args.argv)
    at = next(i for i, item in enumerate(argv) if item == "--nproc" or item.startswith("--nproc="))
    del argv[at : at + (1 if "=" in argv[at] else 2)]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    return subprocess.call([*launcher, "-m", "posttrain.cli", *argv])


def _sets_data(overrides: list[str]) -> bool:
    """True when a ``--set`` names the data to use (``data.task=...``, ``data.path=...``, ``data={...}``)."""
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    return any(key == "data" or key.startswith("data.") for key in keys)


def _eval(args: argparse.Namespace) -> int:
    from posttrain.models.load import load_policy
    from posttrain.rollout.hf import HFRolloutEngine
    from posttrain.train.checkpoint import resolve_policy_dir
    from posttrain.train.config import load_config
    from posttrain.train.evaluate import evaluate
    from posttrain.train.logging import CONFIG_FILE
    from posttrain.train.setup import build_collector, build_task
    from posttrain.train.step import sampling_params

    model_dir, run_dir = resolve_policy_dir(args.model)
    run_config = run_dir / CONFIG_FILE if run_dir and (run_dir / CONFIG_FILE).is_file() else None
    if run_config is None and args.config is None and not _sets_data(args.set):
        # the config's default task would be scored silently: a result about the wrong data
        raise UsageError(
            f"eval --model {args.model}: this folder has no run config; say what to evaluate on with "
            "--config FILE or --set data.task=NAME / --set data.path=FILE"
        )
    if run_config is not None and args.config is None:
        from posttrain.train.trust import check_run_code

        check_run_code(run_config, args.set, trusted=args.trust_run_code, action=f"eval --model {args.model}")
    # a run's own checkpoint is evaluated on that run's task and split unless --config says otherwise
    config = load_config(args.config or run_config, args.set)
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


TRUST_HELP = (
    "import the code (reward files, environments, judges) the run's config.yaml names; without it "
    "posttrain lists that code and stops, since a run folder from someone else can run anything"
)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``rows[:0]`` or ``rows[:-5]`` would silently mislead)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="RL post-training of causal LMs.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the full traceback of an error, not just its message (or set {DEBUG_ENV}=1)",
    )
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
        help="continue the run in RUN_DIR from its newest usable checkpoint, with its config.yaml "
        "(--set may change optim.steps, eval.* and logging.* only)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in run.output_dir/run.name (its folder is deleted first)",
    )
    train.add_argument("--trust-run-code", action="store_true", help=TRUST_HELP)
    train.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (torchrun; FSDP2 shards the policy and critic; "
        "gloo on CPU, NCCL on GPUs)",
    )
    train.add_argument(
        "--ray",
        action="store_true",
        help="sample on Ray rollout workers and train in a Ray task (--set scale.ray=true; "
        "scale.rollout_workers, scale.max_policy_lag, scale.ray_address)",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, each key with its description, and exit",
    )
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a task split")
    ev.add_argument(
        "--model", required=True, help="a run folder, one of its checkpoints, or any local HF model folder"
    )
    ev.add_argument(
        "--config", type=Path, default=None, help="what to evaluate on (default: the run's own config)"
    )
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.task=countdown or --set data.path=rows.jsonl",
    )
    ev.add_argument("--split", choices=["test", "train"], default="test")
    ev.add_argument("--num-prompts", type=_positive_int, default=200, help="prompts to evaluate (>= 1)")
    ev.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy; a finite number >= 0")
    ev.add_argument("--trust-run-code", action="store_true", help=TRUST_HELP)
    ev.set_defaults(func=_eval)

    from posttrain.cli_compare import add_compare_arguments, add_report_arguments, compare, report

    compare_parser = sub.add_parser(
        "compare",
        help="run several algorithms x seeds on one config; table, curves and a recommendation",
    )
    add_compare_arguments(compare_parser)
    compare_parser.set_defaults(func=compare)
    report_parser = sub.add_parser("report", help="the comparison table, curves and report of finished runs")
    add_report_arguments(report_parser)
    report_parser.set_defaults(func=report)

    try:
        from posttrain.classic.study import add_classic_arguments, main_from_args
    except ImportError:  # the classic study is optional
        pass
    else:
        classic = sub.add_parser("classic", help="critic vs group baselines on gymnasium control tasks")
        add_classic_arguments(classic)
        classic.set_defaults(func=main_from_args)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a user error becomes ``error: ...`` on stderr and exit code 2, an
    interruption its message (what was saved, how to resume) and 128 + the signal (130, 143)."""
    try:
        return int(args.func(args))
    except KeyboardInterrupt as stop:  # posttrain.train.interrupt.TrainingInterrupted, or a plain Ctrl-C
        print(f"\n{stop}" if str(stop) else "\ninterrupted", file=sys.stderr)
        return int(getattr(stop, "exit_code", INTERRUPTED_EXIT))
    except Exception as error:
        if not is_user_error(error):
            raise  # a bug: its traceback is the report
        if debug_requested(args):
            traceback.print_exc()
        print(format_error(error), file=sys.stderr)
        return USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command_line = shlex.join(["posttrain", *(sys.argv[1:] if argv is None else argv)])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
