"""On-policy distillation on CPU: two tiny experts merged into one student (docs/distill.md).

    python benchmarks/distill_demo.py [--out runs/distill-demo] [--steps 100] [--expert-steps 60]
        [--eval-every 5] [--coef 0] [--set KEY=VALUE ...] [--reuse-experts]

1. Experts: the embedded tiny model warm-started on one built-in task each (arithmetic: the sloppy
   demonstrator that drops minus signs; countdown with two numbers) and trained with GRPO on it.
2. Student: the embedded model warm-started on both tasks at once (``data.task: mix``, the generic
   warm-start), then, from the same start, (a) distilled from both experts with each row routed to
   its domain's teacher (``configs/distill.yaml``) and (b) trained with GRPO on the task rewards
   alone, the same steps and rollouts per step (the same config with ``algorithm: grpo`` and no
   ``distill``); with ``--coef C`` also (c) GRPO with ``distill.coef: C`` (task reward plus the
   teachers' signal).
3. Held-out greedy accuracy per domain (the 200 test rows of each task, which no run trained on) of
   each expert, the student before, and the students every ``--eval-every`` steps; the sampled
   tokens and training seconds each student needed to close 50% and 90% of the gap to the
   experts (the mean over domains of each expert on its own domain) and to reach them.

``--set`` applies to every run (``--set model.tiny_hidden_size=32`` shrinks them all); the
experts and students share the embedded model's tokenizer through ``model.tiny_tokenizer: char``.
Writes ``<out>/results.json`` and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from posttrain.data.tasks import get_task
from posttrain.models.load import load_policy
from posttrain.report.runs import read_metrics
from posttrain.rewards.functions import resolve_reward_specs
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.config import TrainConfig, load_config
from posttrain.train.evaluate import evaluate
from posttrain.train.loop import train
from posttrain.train.setup import build_task, embedded_model_path

CONFIG = Path(__file__).parents[1] / "configs" / "distill.yaml"
DOMAINS = ("arithmetic", "countdown")
COMMON = ["logging.tensorboard=false", "logging.progress=false"]
GAP_SHARES = (0.5, 0.9, 1.0)  # thresholds: shares of the gap from the student's start to the experts


def expert_config(domain: str, out: Path, steps: int, extra: list[str]) -> TrainConfig:
    """GRPO on one built-in task (with the task options ``configs/distill.yaml`` gives it in the
    mix), with the student's tokenizer kind."""
    mix = yaml.safe_load(CONFIG.read_text())["data"].get("task_options", {})
    options = (mix.get("options") or {}).get(domain, {})
    return load_config(
        None,
        [
            *COMMON,
            "algorithm=grpo",
            "model.tiny_tokenizer=char",
            f"data.task={domain}",
            f"data.task_options={json.dumps(options)}",
            f"optim.steps={steps}",
            f"run.output_dir={out}",
            f"run.name=expert-{domain}",
            *extra,
        ],
    )


def student_config(
    kind: str,
    out: Path,
    teachers: dict[str, Path],
    steps: int,
    every: int,
    extra: list[str],
    coef: float = 0.0,
) -> TrainConfig:
    """``configs/distill.yaml`` as it is (kind distill, with these teachers), without its
    ``distill`` section and with ``algorithm: grpo`` (kind rl), or with ``algorithm: grpo`` and
    ``distill.coef: coef`` (kind rl-distill); checkpoints every ``every`` steps."""
    tree = yaml.safe_load(CONFIG.read_text())
    if kind != "distill":
        tree["algorithm"] = "grpo"
    if kind == "rl":
        tree.pop("distill")
    else:
        tree["distill"]["teachers"] = [{"name": name, "path": str(path)} for name, path in teachers.items()]
    if kind == "rl-distill":
        tree["distill"]["coef"] = coef
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f"student-{kind}.yaml"
    config_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    overrides = [
        *COMMON,
        f"run.output_dir={out}",
        f"run.name=student-{kind}",
        f"optim.steps={steps}",
        f"logging.checkpoint_every={every}",
        f"logging.keep_last={steps}",
        "eval.every=0",
    ]
    return load_config(config_file, [*overrides, *extra])


def domain_accuracy(model_dir: Path, test_rows: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, float]:
    """Greedy held-out accuracy of the model in ``model_dir`` on each domain's test rows."""
    task = get_task("mix", seed=cfg.run.seed, num_train=0, num_test=1, **cfg.data.task_options)
    policy, tokenizer = load_policy(model_dir)
    policy.eval()
    engine = HFRolloutEngine(policy, tokenizer)
    terms = resolve_reward_specs(task.reward_fns)
    collector = SingleTurnCollector(engine, tokenizer, terms, task.max_new_tokens)
    params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0)
    return {
        domain: evaluate(
            collector, [r for r in test_rows if r["domain"] == domain], params, seed=cfg.run.seed
        )["eval_accuracy"]
        for domain in DOMAINS
    }


def cumulative_compute(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Step -> (sampled tokens, training seconds) summed over the steps up to it."""
    rows = sorted(
        (r for r in read_metrics(run_dir / "metrics.jsonl") if "sampled_tokens" in r), key=lambda r: r["step"]
    )
    out, tokens, seconds = {0: (0.0, 0.0)}, 0.0, 0.0
    for row in rows:
        tokens, seconds = tokens + row["sampled_tokens"], seconds + row["time/step"]
        out[int(row["step"])] = (tokens, seconds)
    return out


def student_curve(
    run_dir: Path, before: dict[str, float], test_rows: list[dict[str, Any]], cfg: TrainConfig
) -> list[dict[str, Any]]:
    """Per checkpoint (and step 0, the start): accuracy per domain and the compute spent to get there."""
    compute = cumulative_compute(run_dir)
    curve = [{"step": 0, **before, "tokens": 0.0, "seconds": 0.0}]
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(checkpoint.name.removeprefix("step_"))
        tokens, seconds = compute[step]
        curve.append(
            {
                "step": step,
                **domain_accuracy(checkpoint / "policy", test_rows, cfg),
                "tokens": tokens,
                "seconds": seconds,
            }
        )
    return curve


def mean(scores: dict[str, Any]) -> float:
    return sum(scores[d] for d in DOMAINS) / len(DOMAINS)


def first_reaching(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of ``curve`` whose mean accuracy over the domains is at least ``target``."""
    return next((point for point in curve if mean(point) >= target - 1e-9), None)


def reach_table(
    curves: dict[str, list[dict[str, Any]]], start: float, expert: float
) -> tuple[list[str], list[dict[str, Any]]]:
    lines, reached = [], []
    for share in GAP_SHARES:
        target = start + share * (expert - start)
        label = "the experts' level" if share == 1.0 else f"{share:.0%} of the gap"
        cells = []
        for kind, curve in curves.items():
            point = first_reaching(curve, target)
            reached.append({"kind": kind, "share": share, "target": target, "point": point})
            cells.append(
                f"not within {curve[-1]['step']} steps"
                if point is None
                else f"step {point['step']}: {point['tokens'] / 1e3:.0f}k tokens, {point['seconds']:.0f} s"
            )
        lines.append(f"| {label} ({100 * target:.1f}%) | " + " | ".join(cells) + " |")
    return lines, reached


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/distill-demo"))
    parser.add_argument("--steps", type=int, default=100, help="student steps (distillation and RL alike)")
    parser.add_argument("--expert-steps", type=int, default=60, help="GRPO steps of each expert")
    parser.add_argument("--eval-every", type=int, default=5, help="student checkpoints evaluated per domain")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every run"
    )
    parser.add_argument("--reuse-experts", action="store_true", help="keep experts already trained in --out")
    parser.add_argument(
        "--coef",
        type=float,
        default=0.0,
        help="> 0: a third student, GRPO with distill.coef (task reward + teachers)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out: Path = args.out

    experts: dict[str, Path] = {}
    expert_compute: dict[str, tuple[float, float]] = {}  # GRPO's sampled tokens and seconds
    for domain in DOMAINS:
        cfg = expert_config(domain, out, args.expert_steps, args.set)
        run_dir = out / cfg.run.name
        if not (args.reuse_experts and latest_checkpoint(run_dir) is not None):
            train(cfg, overwrite=True)
        experts[domain] = run_dir
        expert_compute[domain] = cumulative_compute(run_dir)[args.expert_steps]

    distill_cfg = student_config("distill", out, experts, args.steps, args.eval_every, args.set)
    rl_cfg = student_config("rl", out, experts, args.steps, args.eval_every, args.set)
    students = [("distill", distill_cfg), ("rl", rl_cfg)]
    if args.coef:
        students.append(
            (
                "rl-distill",
                student_config("rl-distill", out, experts, args.steps, args.eval_every, args.set, args.coef),
            )
        )
    task = build_task(distill_cfg)
    test_rows = task.test
    start_model = embedded_model_path(distill_cfg, task)  # the generic warm-start both students start from
    before = domain_accuracy(start_model, test_rows, distill_cfg)
    expert_scores = {
        domain: domain_accuracy(latest_checkpoint(path) / "policy", test_rows, distill_cfg)  # type: ignore[operator]
        for domain, path in experts.items()
    }
    curves = {}
    for kind, cfg in students:
        train(cfg, overwrite=True)
        curves[kind] = student_curve(out / cfg.run.name, before, test_rows, distill_cfg)

    expert_level = {domain: expert_scores[domain][domain] for domain in DOMAINS}
    lines = [
        f"Held-out greedy accuracy ({len(test_rows) // len(DOMAINS)} test prompts per domain, seed {distill_cfg.run.seed})",
        "",
        "| model | " + " | ".join(DOMAINS) + " | mean |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for domain in DOMAINS:
        lines.append(
            f"| expert {domain} ({args.expert_steps} GRPO steps) | "
            + " | ".join(percent(expert_scores[domain][d]) for d in DOMAINS)
            + f" | {percent(mean(expert_scores[domain]))} |"
        )
    lines.append(
        "| student before (generic warm-start) | "
        + " | ".join(percent(before[d]) for d in DOMAINS)
        + f" | {percent(mean(before))} |"
    )
    labels = {
        "distill": "distillation from both experts",
        "rl": "GRPO on the task rewards",
        "rl-distill": f"GRPO + {args.coef:g} x the experts' signal",
    }
    for kind, curve in curves.items():
        end = curve[-1]
        lines.append(
            f"| student after {end['step']} steps of {labels[kind]} | "
            + " | ".join(percent(end[d]) for d in DOMAINS)
            + f" | {percent(mean(end))} |"
        )
    lines += [
        "",
        f"Compute to reach each level (mean over domains; experts: {percent(mean(expert_level))} on their own domain)",
        "",
    ]
    lines += ["| target | " + " | ".join(labels[k] for k in curves) + " |", "|---|" + "---|" * len(curves)]
    reach_lines, reached = reach_table(curves, mean(before), mean(expert_level))
    lines += reach_lines
    lines += [
        "",
        "| step | "
        + " | ".join(f"{k} {d}" for k in curves for d in DOMAINS)
        + " | "
        + " | ".join(f"{k} tokens, s" for k in curves)
        + " |",
    ]
    lines.append("|---|" + "---|" * (len(curves) * (len(DOMAINS) + 1)))
    for i, point in enumerate(curves["distill"]):
        rows = [curves[k][i] for k in curves if i < len(curves[k])]
        lines.append(
            f"| {point['step']} | "
            + " | ".join(percent(r[d]) for r in rows for d in DOMAINS)
            + " | "
            + " | ".join(f"{r['tokens'] / 1e3:.0f}k, {r['seconds']:.0f}" for r in rows)
            + " |"
        )
    lines += [
        "",
        "Experts' GRPO: "
        + ", ".join(f"{d} {t / 1e3:.0f}k tokens, {sec:.0f} s" for d, (t, sec) in expert_compute.items())
        + f"; whole demo {time.perf_counter() - started:.0f} s (warm-starts included, cached ones not)",
    ]
    table = "\n".join(lines)
    print(table)
    results = {
        "experts": expert_scores,
        "before": before,
        "curves": curves,
        "reached": reached,
        "expert_compute": expert_compute,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
