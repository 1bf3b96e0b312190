"""posttrain's RL step against its floor: how much of a step is work any trainer must do?

The floor is what one on-policy step cannot avoid, written with plain transformers + torch: HF
``generate`` of the same samples (same prompts, group size, max_new_tokens and sampling, in the
rollout engine's batches), one forward/backward over the same tokens (prompt + completion,
right-padded as posttrain pads, in posttrain's micro-batches) with a token-mean policy-gradient
loss, gradient clipping and one AdamW step. It runs in the same process, on its own copy of the
same model, alternately with posttrain's ``rl_step`` on the same rows (the order rotating from
round to round), one torch thread.

Printed: s/step, sampled tokens/step and tokens/s of each (median [min, max] over the timed
rounds), the ratio step / floor (per step and per sampled token, since lengths differ between
samples), and where the time goes: every ``time/*`` metric ``rl_step`` returns (the floor's own
generate / forward_backward / optimizer beside them), plus "bookkeeping", the step's measured
total minus the parts (an aggregate such as ``time/train`` is split into its parts and a rest).

``--algorithm ppo`` times the PPO step and the GRPO step at the same batch, alternately with the
floor, and prints PPO / GRPO (the goal: <= 1.5). Presets run as shipped (GRPO and PPO with their
KL terms, so with a reference model); ``--no-kl`` drops the KL (``algo.kl_placement=none``), and
``--set KEY=VALUE`` overrides any posttrain setting of every posttrain run; ``--critic-size`` gives
PPO a smaller critic (``model.critic_path``: a tiny model of that size with the same tokenizer).

    python benchmarks/step_budget.py [--size 22.5M] [--algorithm grpo|ppo] [--no-kl] [--critic-size 320x3x5x535]
        [--rounds 5] [--warmup 1] [--prompts-per-step 8] [--group-size 4] [--out runs/bench/step_budget]

Writes ``<out>/results.json`` (every round's timings) and ``<out>/table.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _bench_common import THREAD_ENV

for _key, _value in THREAD_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the thread settings)
from _bench_common import (  # noqa: E402
    build_model,
    build_posttrain,
    count_parameters,
    fmt_num,
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

# time/* metrics that add up others: the total, and aggregates split into their parts when present
TOTAL_KEYS = ("time/step",)
AGGREGATES = {"time/train": ("time/forward_backward", "time/optimizer")}
BOOKKEEPING = "bookkeeping"
TOTAL = "total (measured)"


class Floor:
    """The floor step on its own copy of the model: generate, one forward/backward, optimizer."""

    def __init__(self, model_dir: Path, lr: float, max_grad_norm: float) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm
        self.pad = int(self.tokenizer.pad_token_id)
        self.eos = int(self.tokenizer.eos_token_id)

    def generation_config(self, max_new_tokens: int, temperature: float) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            eos_token_id=[self.eos],
            pad_token_id=self.pad,
            use_cache=True,
            num_beams=1,
        )

    def generate(self, prompts: list[list[int]], config: Any, batch_size: int) -> list[list[int]]:
        """Sampled completions (cut after the first EOS, which is kept)."""
        completions: list[list[int]] = []
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, prompt in enumerate(chunk):
                    ids[row, width - len(prompt) :] = torch.tensor(prompt)
                    mask[row, width - len(prompt) :] = 1
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for row in out[:, width:].tolist():
                    end = row.index(self.eos) + 1 if self.eos in row else len(row)
                    completions.append(row[:end])
        return completions

    def step(
        self, prompts: list[list[int]], config: Any, batch_size: int, micro_batch_size: int, seed: int
    ) -> tuple[dict[str, float], int]:
        """One floor step; its phase times and the number of sampled tokens."""
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            completions = self.generate(prompts, config, batch_size)
        t1 = time.perf_counter()
        full = [p + c for p, c in zip(prompts, completions)]
        width = max(len(s) for s in full)
        ids = torch.full((len(full), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(full), width), dtype=torch.long)
        actions = torch.zeros((len(full), width))
        for row, (prompt, sequence) in enumerate(zip(prompts, full)):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
            actions[row, len(prompt) : len(sequence)] = 1.0
        advantages = torch.randn(len(full), 1)
        num_actions = actions.sum().clamp(min=1.0)
        self.model.train()
        t2 = time.perf_counter()
        for rows in torch.arange(len(full)).split(micro_batch_size):
            logits = self.model(input_ids=ids[rows], attention_mask=attention[rows], use_cache=False).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            chosen = logprobs.gather(-1, ids[rows, 1:].unsqueeze(-1)).squeeze(-1)
            loss = -(advantages[rows] * chosen * actions[rows, 1:]).sum() / num_actions
            loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        times = {
            "time/generate": t1 - t0,
            "time/forward_backward": t3 - t2,
            "time/optimizer": t4 - t3,
            BOOKKEEPING: (t2 - t1),  # EOS cuts, padding, masks
            TOTAL: t4 - t0,
        }
        return times, sum(len(c) for c in completions)


def phases(metrics: dict[str, float], total: float) -> dict[str, float]:
    """The step's parts from its ``time/*`` metrics, plus bookkeeping (total minus the parts) and
    the measured total. Totals are left out; an aggregate whose parts are all present becomes its
    parts plus ``<aggregate> rest``, so nothing is counted twice."""
    times = {k: float(v) for k, v in metrics.items() if k.startswith("time/") and k not in TOTAL_KEYS}
    parts: dict[str, float] = {}
    for key, value in times.items():
        children = AGGREGATES.get(key, ())
        if children and all(child in times for child in children):
            parts[f"{key} rest"] = value - sum(times[child] for child in children)
        else:
            parts[key] = value
    parts[BOOKKEEPING] = total - sum(parts.values())
    parts[TOTAL] = total
    return parts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up rounds, then timed rounds of every posttrain run and the floor on the same rows."""
    from posttrain.rollout.collector import encode_prompt
    from posttrain.train.config_input import merge_trees, parse_overrides
    from posttrain.train.loop import rows_for_step
    from posttrain.train.step import rl_step

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    name, size = parse_size(args.size)
    model_dir = build_model(Path(args.models), size, seed=args.seed)
    params = count_parameters(model_dir)
    rows_path = write_rows(out / "rows.jsonl", make_prompts(args.num_prompts, seed=args.seed))
    algorithms = [args.algorithm] + (["grpo"] if args.algorithm != "grpo" else [])
    overrides = list(args.set) + (["algo.kl_placement=none"] if args.no_kl else [])
    states: dict[str, Any] = {}
    task = None
    for algorithm in algorithms:
        tree = posttrain_config(
            model=model_dir,
            rows=rows_path,
            workdir=out / "work",
            seed=args.seed,
            steps=args.warmup + args.rounds,
            prompts_per_step=args.prompts_per_step,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            lr=args.lr,
            algorithm=algorithm,
        )
        own = list(overrides)
        if args.critic_size and algorithm == "ppo":  # a smaller critic with the policy's tokenizer
            critic_dir = build_model(Path(args.models), parse_size(args.critic_size)[1], seed=args.seed)
            own.append(f"model.critic_path={critic_dir}")
        task, states[algorithm] = build_posttrain(merge_trees(tree, parse_overrides(own)))
    assert task is not None
    first = states[algorithms[0]]
    cfg = first.config
    floor = Floor(model_dir, cfg.optim.lr, cfg.optim.max_grad_norm)
    gen_config = floor.generation_config(first.max_new_tokens, cfg.rollout.temperature)
    engine_batch = int(getattr(first.engine, "batch_size", 64))
    print(
        f"== {name}: {params:,} parameters; {', '.join(algorithms)} vs floor; {cfg.rollout.prompts_per_step} "
        f"prompts x {cfg.rollout.group_size}, <= {first.max_new_tokens} new tokens, {args.threads} thread(s)",
        flush=True,
    )
    group = cfg.rollout.group_size

    def posttrain_run(algorithm: str) -> Callable[[list[dict[str, Any]], int], dict[str, Any]]:
        def call(rows: list[dict[str, Any]], index: int) -> dict[str, Any]:
            start = time.perf_counter()
            metrics = rl_step(states[algorithm], rows)
            total = time.perf_counter() - start
            return {
                "times": phases(metrics, total),
                "raw": {k: v for k, v in metrics.items() if k.startswith("time/")},
                "tokens": int(metrics["sampled_tokens"]),
            }

        return call

    def floor_run(rows: list[dict[str, Any]], index: int) -> dict[str, Any]:
        prompts = [encode_prompt(floor.tokenizer, row["prompt"]) for row in rows for _ in range(group)]
        times, tokens = floor.step(prompts, gen_config, engine_batch, cfg.optim.micro_batch_size, seed=index)
        return {"times": times, "raw": {}, "tokens": tokens}

    runs = {f"posttrain {a}": posttrain_run(a) for a in algorithms} | {"floor": floor_run}
    labels = list(runs)
    records: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    position = 0
    for index in range(args.warmup + args.rounds):
        rows = rows_for_step(task.train, position, cfg.rollout.prompts_per_step, args.seed)
        position += len(rows)
        timed = index >= args.warmup
        line = []
        shift = index % len(labels)  # each run takes its turn first: no run always follows another
        for label in labels[shift:] + labels[:shift]:
            record = runs[label](rows, index)
            if timed:
                records[label].append(record)
            line.append(f"{label} {record['times'][TOTAL]:.3f} s")
        kind = "round" if timed else "warm-up"
        print(f"  {kind} {index + 1 - (args.warmup if timed else 0)}: " + ", ".join(line), flush=True)
    return {
        "size": name,
        "shape": size,
        "params": params,
        "algorithms": algorithms,
        "overrides": overrides,
        "engine_batch_size": engine_batch,
        "records": records,
        "summary": summarise(records, algorithms),
    }


def summarise(records: dict[str, list[dict[str, Any]]], algorithms: list[str]) -> dict[str, Any]:
    """Per run: spreads of s/step, tokens/step, tokens/s and of every phase; the ratios."""
    summary: dict[str, Any] = {}
    for label, runs in records.items():
        totals = [r["times"][TOTAL] for r in runs]
        keys = list(dict.fromkeys(k for r in runs for k in r["times"]))
        summary[label] = {
            "s_per_step": spread(totals),
            "tokens_per_step": spread([float(r["tokens"]) for r in runs]),
            "tokens_per_s": spread([r["tokens"] / r["times"][TOTAL] for r in runs]),
            "s_per_token": spread([r["times"][TOTAL] / max(r["tokens"], 1) for r in runs]),
            "phases": {k: spread([r["times"].get(k, 0.0) for r in runs]) for k in keys},
            "raw": {
                k: spread([r["raw"][k] for r in runs if k in r["raw"]])
                for k in dict.fromkeys(k for r in runs for k in r["raw"])
            },
        }
    floor = summary["floor"]
    ratios: dict[str, float] = {}
    for algorithm in algorithms:
        ours = summary[f"posttrain {algorithm}"]
        ratios[f"{algorithm}/floor"] = ratio(ours["s_per_step"]["median"], floor["s_per_step"]["median"])
        ratios[f"{algorithm}/floor per token"] = ratio(
            ours["s_per_token"]["median"], floor["s_per_token"]["median"]
        )
    for algorithm in algorithms[:1]:
        if algorithm != "grpo":
            ours, grpo = summary[f"posttrain {algorithm}"], summary["posttrain grpo"]
            ratios[f"{algorithm}/grpo"] = ratio(ours["s_per_step"]["median"], grpo["s_per_step"]["median"])
            ratios[f"{algorithm}/grpo per token"] = ratio(
                ours["s_per_token"]["median"], grpo["s_per_token"]["median"]
            )
    summary["ratios"] = ratios
    return summary


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    """Two tables: the runs side by side with their ratios, and where the time goes."""
    from posttrain.report.tables import render_table, summary_table

    summary, records = result["summary"], result["records"]
    labels = list(records)
    ratios = summary["ratios"]
    rows = []
    for label in labels:
        algorithm = label.removeprefix("posttrain ")
        rows.append(
            {
                "run": label,
                "s/step": fmt_spread([r["times"][TOTAL] for r in records[label]]),
                "tokens/step": fmt_num(summary[label]["tokens_per_step"]["median"]),
                "tokens/s": fmt_spread([r["tokens"] / r["times"][TOTAL] for r in records[label]]),
                "x floor": fmt_num(ratios.get(f"{algorithm}/floor", 1.0)),
                "x floor per token": fmt_num(ratios.get(f"{algorithm}/floor per token", 1.0)),
                "x grpo": fmt_num(ratios[f"{algorithm}/grpo"]) if f"{algorithm}/grpo" in ratios else "",
            }
        )
    kl = "no KL" if args.no_kl else "presets as shipped"
    title = (
        f"{result['size']} ({result['params'] / 1e6:.3g}M) step vs floor: {args.prompts_per_step} prompts x "
        f"{args.group_size}, <= {args.max_new_tokens} new tokens, {kl}"
        + (f", --set {' '.join(args.set)}" if args.set else "")
        + f"; {args.rounds} rounds after {args.warmup} warm-up, median [min, max]"
    )
    columns = ["run", "s/step", "tokens/step", "tokens/s", "x floor", "x floor per token", "x grpo"]
    first = title + "\n" + render_table(summary_table(rows, columns), width=150)
    phase_keys = list(dict.fromkeys(k for label in labels for k in summary[label]["phases"]))
    phase_keys = [k for k in phase_keys if k not in (BOOKKEEPING, TOTAL)] + [BOOKKEEPING, TOTAL]
    phase_rows = []
    for key in phase_keys:
        row: dict[str, Any] = {"phase": key}
        for label in labels:
            phase = summary[label]["phases"].get(key)
            total = summary[label]["phases"][TOTAL]["median"]
            row[label] = (
                "" if phase is None else f"{phase['median']:.3f} s ({100 * phase['median'] / total:.0f}%)"
            )
        phase_rows.append(row)
    for label in labels:  # the aggregates rl_step reports, for reference (not added up above)
        for key, value in summary[label]["raw"].items():
            if key in TOTAL_KEYS or key in AGGREGATES:
                row = next((r for r in phase_rows if r["phase"] == f"({key})"), None)
                if row is None:
                    row = {"phase": f"({key})"}
                    phase_rows.append(row)
                row[label] = f"{value['median']:.3f} s"
    second = "where the time goes (median seconds, share of the measured total)\n" + render_table(
        summary_table(phase_rows, ["phase", *labels]), width=150
    )
    return first + second


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="22.5M", help="0.11M, 22.5M or HIDDENxLAYERSxHEADSxFFN")
    parser.add_argument("--algorithm", default="grpo", help="posttrain preset; not grpo: timed beside grpo")
    parser.add_argument("--no-kl", action="store_true", help="algo.kl_placement=none for every posttrain run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="posttrain override")
    parser.add_argument(
        "--critic-size",
        default=None,
        help="PPO's critic at this size (0.11M or HIDDENxLAYERSxHEADSxINTERMEDIATE), not the policy's",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/step_budget")
    parser.add_argument("--models", default="runs/bench/models", help="where the tiny models are cached")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    result = run(args)
    table = render(result, args)
    print(table)
    settings = vars(args)
    path = write_results(
        Path(args.out), "step_budget", {"settings": settings, "machine": machine_info(), **result}, table
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
