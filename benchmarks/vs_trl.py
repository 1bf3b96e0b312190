"""Side by side: posttrain's GRPO step vs TRL 1.16's ``GRPOTrainer``, matched, one core each.

Both train the same tiny random Llama (built here with ``posttrain.models.tiny``, saved once and
loaded by both sides), with the same tokenizer, prompts and reward (the share of vowels among a
completion's letters), fp32 on CPU, one torch thread each (``OMP_NUM_THREADS=1``), and the same
GRPO: group-normalised advantages, token-mean aggregation over the batch (TRL's ``loss_type="dapo"``,
posttrain's ``grpo`` preset with ``algo.aggregation=token-mean``), no KL (TRL ``beta=0``, posttrain
``algo.kl_placement=none``), one optimizer step per rollout batch (``num_iterations=1``; one
epoch, one mini-batch), AdamW at a constant lr 1e-4, clip 0.2, max grad norm 1, temperature 1,
top-p 1, no top-k, 32 new tokens at most, 8 prompts x 4 completions per step by default.

Runs alternate (posttrain, TRL, posttrain, TRL, ... for ``--rounds`` rounds), each a fresh process
doing ``--warmup`` steps and then ``--steps`` timed steps. A step's time is the interval between the
ends of consecutive steps: TRL's trainer loop as measured by a callback, posttrain's
``rows_for_step`` + ``rl_step`` (the step function ``posttrain.train`` runs, without its logging).
Printed per size: s/step and sampled tokens/s (completion tokens of a step / its time: completion
lengths drift apart as the policies train, so tokens/s is the fairer speed) as median [min, max]
over all timed steps, the peak RSS of each run's process (``ru_maxrss``), the mean reward of the
last step of each run, and the ratios posttrain / TRL.

TRL runs in its own virtualenv (it pins nothing we use, but keeps its dependencies apart)::

    python3 -m venv .venv-trl && .venv-trl/bin/pip install "torch==2.13.0" "trl==1.16.0"

Then::

    python benchmarks/vs_trl.py [--sizes 0.11M,22.5M] [--rounds 3] [--warmup 2] [--steps 5]
        [--prompts-per-step 8] [--group-size 4] [--trl-python .venv-trl/bin/python] [--no-trl]
        [--out runs/bench/vs_trl]

``--no-trl`` runs the posttrain side only. Writes ``<out>/results.json`` (every step of every run)
and ``<out>/table.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _bench_common import (
    THREAD_ENV,
    TRL_MATCHED_ALGO,
    ModelSize,
    build_model,
    build_posttrain,
    count_parameters,
    fmt_spread,
    machine_info,
    make_prompts,
    parse_size,
    posttrain_config,
    quiet_transformers,
    ratio,
    spread,
    write_results,
    write_rows,
)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEFAULT_TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
INSTALL_TRL = 'python3 -m venv .venv-trl && .venv-trl/bin/pip install "torch==2.13.0" "trl==1.16.0"'
SIDES = ("posttrain", "trl")


def run_posttrain_side(spec: dict[str, Any]) -> dict[str, Any]:
    """posttrain's side, in this (child) process: set up as ``posttrain.train`` does, then step."""
    import torch

    from posttrain.train.loop import rows_for_step
    from posttrain.train.step import rl_step

    torch.set_num_threads(1)
    quiet_transformers()
    task, state = build_posttrain(
        posttrain_config(
            model=spec["model"],
            rows=spec["rows"],
            workdir=spec["workdir"],
            seed=spec["seed"],
            steps=spec["warmup"] + spec["steps"],
            prompts_per_step=spec["prompts_per_step"],
            group_size=spec["group_size"],
            max_new_tokens=spec["max_new_tokens"],
            temperature=spec["temperature"],
            lr=spec["lr"],
            algo=TRL_MATCHED_ALGO,
        )
    )
    cfg = state.config
    times: list[float] = []
    tokens: list[int] = []
    rewards: list[float] = []
    for _ in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        rows = rows_for_step(task.train, state.data_position, cfg.rollout.prompts_per_step, cfg.run.seed)
        state.data_position += len(rows)
        metrics = rl_step(state, rows)
        times.append(time.perf_counter() - start)
        tokens.append(int(metrics["sampled_tokens"]))
        rewards.append(float(metrics["reward_mean"]))
    warm = spec["warmup"]
    return {
        "side": "posttrain",
        "step_times": times[warm:],
        "tokens": tokens[warm:],
        "rewards": rewards[warm:],
        "threads": torch.get_num_threads(),
        "steps_run": len(times),
    }


def run_child(command: list[str], spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one side in a fresh process; its result plus its peak RSS (``ru_maxrss``) and wall time."""
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / "log.txt"
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **THREAD_ENV},
            cwd=ROOT,
        )
        killer = threading.Timer(timeout_s, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{spec['side']} run failed (exit {process.returncode}); {log_path}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    result["wall_s"] = time.perf_counter() - start
    return result


def check_prompt_tokens(model_dir: Path, prompts: list[str]) -> bool:
    """True when TRL's tokenisation of a plain prompt (special tokens on) equals posttrain's (off)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return all(
        tokenizer(p)["input_ids"] == tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts
    )


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step s/step and tokens/s pooled over runs; peak RSS and final reward per run."""
    times = [t for run in runs for t in run["step_times"]]
    speeds = [n / t for run in runs for n, t in zip(run["tokens"], run["step_times"])]
    return {
        "s_per_step": spread(times),
        "tokens_per_s": spread(speeds),
        "tokens_per_step": spread([float(n) for run in runs for n in run["tokens"]]),
        "peak_rss_mb": spread([run["peak_rss_mb"] for run in runs]),
        "final_reward": spread([run["rewards"][-1] for run in runs if run["rewards"]]),
        "values": {
            "s_per_step": times,
            "tokens_per_s": speeds,
            "peak_rss_mb": [run["peak_rss_mb"] for run in runs],
            "final_reward": [run["rewards"][-1] for run in runs if run["rewards"]],
        },
    }


def bench_size(args: argparse.Namespace, name: str, size: ModelSize, sides: list[str]) -> dict[str, Any]:
    """Every round of every side at one model size."""
    out = Path(args.out)
    model_dir = build_model(Path(args.models), size, seed=args.seed)
    params = count_parameters(model_dir)
    prompts = make_prompts(args.num_prompts, seed=args.seed)
    rows = write_rows(out / "rows.jsonl", prompts)
    print(f"== {name}: {params:,} parameters ({params / 1e6:.3g}M), {model_dir}", flush=True)
    commands = {
        "posttrain": [sys.executable, str(Path(__file__).resolve()), "--child"],
        "trl": [str(args.trl_python), str(HERE / "_trl_side.py")],
    }
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in sides:
            workdir = out / "work" / f"{size.key()}-{side}-r{round_index}"
            spec = {
                "side": side,
                "model": str(model_dir),
                "rows": str(rows),
                "workdir": str(workdir),
                "result": str(workdir / "result.json"),
                "seed": args.seed + round_index,
                "warmup": args.warmup,
                "steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "lr": args.lr,
            }
            result = run_child(commands[side], spec, args.timeout)
            runs[side].append(result)
            mean_step = sum(result["step_times"]) / max(len(result["step_times"]), 1)
            print(
                f"  round {round_index + 1}/{args.rounds} {side:9s}: {mean_step:.3f} s/step, "
                f"{sum(result['tokens']) / max(sum(result['step_times']), 1e-9):.0f} tokens/s, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['threads']} thread(s), "
                f"process {result['wall_s']:.1f} s",
                flush=True,
            )
    summary = {side: summarise(side_runs) for side, side_runs in runs.items()}
    ratios: dict[str, float] = {}
    if "trl" in summary:
        ours, theirs = summary["posttrain"], summary["trl"]
        for key in ("s_per_step", "tokens_per_s", "tokens_per_step", "peak_rss_mb"):
            ratios[key] = ratio(ours[key]["median"], theirs[key]["median"])
    return {
        "size": name,
        "shape": size,
        "params": params,
        "model_dir": str(model_dir),
        "prompt_tokens_match": check_prompt_tokens(model_dir, prompts),
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
    }


def render(results: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The final table: one row per size and side, then a ratio row per size."""
    from posttrain.report.tables import render_table, summary_table

    columns = ["size", "side", "s/step", "tokens/s", "tokens/step", "peak RSS MB", "final reward"]
    rows: list[dict[str, Any]] = []
    for result in results:
        label = f"{result['size']} ({result['params'] / 1e6:.3g}M)"
        for side, summary in result["summary"].items():
            lists = summary["values"]
            rows.append(
                {
                    "size": label,
                    "side": side,
                    "s/step": fmt_spread(lists["s_per_step"]),
                    "tokens/s": fmt_spread(lists["tokens_per_s"]),
                    "tokens/step": f"{summary['tokens_per_step']['median']:.0f}",
                    "peak RSS MB": fmt_spread(lists["peak_rss_mb"]),
                    "final reward": fmt_spread(lists["final_reward"]),
                }
            )
        if result["ratios"]:
            r = result["ratios"]
            rows.append(
                {
                    "size": label,
                    "side": "posttrain/TRL",
                    "s/step": f"{r['s_per_step']:.3f}",
                    "tokens/s": f"{r['tokens_per_s']:.3f}",
                    "tokens/step": f"{r['tokens_per_step']:.3f}",
                    "peak RSS MB": f"{r['peak_rss_mb']:.3f}",
                    "final reward": "",
                }
            )
    title = (
        f"GRPO step, posttrain vs TRL: {settings['prompts_per_step']} prompts x {settings['group_size']} "
        f"completions, <= {settings['max_new_tokens']} new tokens, {settings['rounds']} round(s) x "
        f"({settings['warmup']} warm-up + {settings['steps']} timed steps), 1 thread; median [min, max]"
    )
    return title + "\n" + render_table(summary_table(rows, columns), width=160)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="0.11M,22.5M", help="comma-separated names or HIDDENxLAYERSxHEADSxFFN"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-prompts", type=int, default=64, help="rows of the prompt dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=str(DEFAULT_TRL_PYTHON), help="TRL's virtualenv's python")
    parser.add_argument("--no-trl", action="store_true", help="run the posttrain side only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--out", default="runs/bench/vs_trl")
    parser.add_argument("--models", default="runs/bench/models", help="where the tiny models are cached")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 0, --steps and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(run_posttrain_side(spec)))
        return 0
    sides = ["posttrain"] if args.no_trl else list(SIDES)
    if not args.no_trl and not Path(args.trl_python).is_file():
        print(
            f"TRL's interpreter {args.trl_python} is missing. Install TRL in its own virtualenv "
            f"(from the repository root):\n\n    {INSTALL_TRL}\n\nor pass --trl-python PATH, or run "
            "posttrain alone with --no-trl.",
            file=sys.stderr,
        )
        return 2
    sizes = [parse_size(text.strip()) for text in args.sizes.split(",")]
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    results = [bench_size(args, name, size, sides) for name, size in sizes]
    table = render(results, settings)
    print(table)
    path = write_results(
        Path(args.out), "vs_trl", {"settings": settings, "machine": machine_info(), "sizes": results}, table
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
