"""Sampled tokens/s of posttrain's rollout engine against plain HF ``generate``, same prompts.

Every variant samples the same rows' prompts (``--prompts-per-step`` x ``--group-size`` samples,
posttrain's prompt encoding) from the same model object (loaded as the trainer loads it), with the
same ``max_new_tokens``, sampling (temperature, top-p 1, no top-k), batch size (the engine's
micro-batch of prompts, left-padded) and seed, alternately in each round (the order rotating
from round to round), one torch thread:

- ``HF generate``: ``model.generate`` and the cut after the first EOS, nothing else;
- ``HF generate + logprob forward``: the same plus one no-grad forward over prompt + completion
  for the behaviour log-probs, what an engine that does not read them from the sampler must add;
- ``posttrain HFRolloutEngine``: ``HFRolloutEngine.generate`` (completions with behaviour
  log-probs, finish reasons and decoded text: everything the collector needs).

The other engine in ``posttrain/rollout/`` (``ScriptedEngine``) replays a script for warm-start
demonstrations and samples nothing, so it is not timed. Printed: s/call and tokens/s (median
[min, max] over the timed rounds), tokens per call, and each variant's ratio to plain generate.

    python benchmarks/rollout.py [--size 22.5M] [--rounds 5] [--warmup 1] [--prompts-per-step 8]
        [--group-size 4] [--max-new-tokens 32] [--batch-size 64] [--out runs/bench/rollout]

Writes ``<out>/results.json`` and ``<out>/table.txt``.
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
    count_parameters,
    fmt_num,
    fmt_spread,
    machine_info,
    make_prompts,
    parse_size,
    quiet_transformers,
    ratio,
    spread,
    write_results,
)

PLAIN = "HF generate"
PLAIN_FORWARD = "HF generate + logprob forward"
ENGINE = "posttrain HFRolloutEngine"


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts`` padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def plain_generate(
    model: Any, prompts: list[list[int]], config: Any, batch_size: int, pad: int, eos: int, logprobs: bool
) -> int:
    """Sample with ``model.generate`` (and, with ``logprobs``, one forward for the behaviour
    log-probs); returns the number of sampled tokens (through the first EOS)."""
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = left_padded(chunk, pad)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            completions = []
            for row in out[:, ids.shape[1] :].tolist():
                completions.append(row[: row.index(eos) + 1] if eos in row else row)
            tokens += sum(len(c) for c in completions)
            if logprobs:
                full = [p + c for p, c in zip(chunk, completions)]
                width = max(len(s) for s in full)
                full_ids = torch.full((len(full), width), pad, dtype=torch.long)
                full_mask = torch.zeros((len(full), width), dtype=torch.long)
                for row, sequence in enumerate(full):
                    full_ids[row, : len(sequence)] = torch.tensor(sequence)
                    full_mask[row, : len(sequence)] = 1
                logits = model(input_ids=full_ids, attention_mask=full_mask, use_cache=False).logits
                torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, full_ids[:, 1:, None])
    return tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up rounds, then timed rounds of every variant on the same prompts and seed."""
    from transformers import GenerationConfig

    from posttrain.models.load import load_policy
    from posttrain.rollout.collector import encode_prompt
    from posttrain.rollout.engine import SamplingParams
    from posttrain.rollout.hf import HFRolloutEngine

    torch.set_num_threads(args.threads)
    name, size = parse_size(args.size)
    model_dir = build_model(Path(args.models), size, seed=args.seed)
    params = count_parameters(model_dir)
    model, tokenizer = load_policy(model_dir)
    model.eval()
    pad, eos = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
    texts = make_prompts(args.prompts_per_step, seed=args.seed)
    prompts = [encode_prompt(tokenizer, text) for text in texts for _ in range(args.group_size)]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        eos_token_id=[eos],
        pad_token_id=pad,
        use_cache=True,
        num_beams=1,
    )
    engine = HFRolloutEngine(model, tokenizer, batch_size=args.batch_size)

    def engine_call(seed: int) -> int:
        completions = engine.generate(prompts, sampling, seed=seed)  # seeds itself
        return sum(len(c.completion_ids) for c in completions)

    def plain_call(with_forward: bool) -> Callable[[int], int]:
        def call(seed: int) -> int:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return plain_generate(model, prompts, config, args.batch_size, pad, eos, with_forward)

        return call

    variants: dict[str, Callable[[int], int]] = {
        PLAIN: plain_call(False),
        PLAIN_FORWARD: plain_call(True),
        ENGINE: engine_call,
    }
    print(
        f"== {name}: {params:,} parameters; {len(prompts)} samples of <= {args.max_new_tokens} tokens, "
        f"batches of {args.batch_size}, {args.threads} thread(s)",
        flush=True,
    )
    records: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    for index in range(args.warmup + args.rounds):
        seed = args.seed * 1_000_003 + index
        line = []
        shift = index % len(variants)  # each variant takes its turn first
        for label in list(variants)[shift:] + list(variants)[:shift]:
            start = time.perf_counter()
            tokens = variants[label](seed)
            seconds = time.perf_counter() - start
            if index >= args.warmup:
                records[label].append({"seconds": seconds, "tokens": tokens})
            line.append(f"{label} {seconds:.3f} s / {tokens} tokens")
        kind = "round" if index >= args.warmup else "warm-up"
        print(
            f"  {kind} {index + 1 - (args.warmup if index >= args.warmup else 0)}: " + "; ".join(line),
            flush=True,
        )
    summary: dict[str, Any] = {}
    for label, runs in records.items():
        summary[label] = {
            "s_per_call": spread([r["seconds"] for r in runs]),
            "tokens_per_call": spread([r["tokens"] for r in runs]),
            "tokens_per_s": spread([r["tokens"] / r["seconds"] for r in runs]),
        }
    base = summary[PLAIN]["tokens_per_s"]["median"]
    ratios = {label: ratio(s["tokens_per_s"]["median"], base) for label, s in summary.items()}
    return {
        "size": name,
        "shape": size,
        "params": params,
        "samples": len(prompts),
        "records": records,
        "summary": summary,
        "tokens_per_s_vs_plain": ratios,
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    from posttrain.report.tables import render_table, summary_table

    rows = []
    for label, runs in result["records"].items():
        rows.append(
            {
                "variant": label,
                "s/call": fmt_spread([r["seconds"] for r in runs]),
                "tokens/call": fmt_num(result["summary"][label]["tokens_per_call"]["median"]),
                "tokens/s": fmt_spread([r["tokens"] / r["seconds"] for r in runs]),
                "tokens/s vs plain": fmt_num(result["tokens_per_s_vs_plain"][label]),
            }
        )
    header = (
        f"rollout, {result['size']} ({result['params'] / 1e6:.3g}M): {result['samples']} samples "
        f"({args.prompts_per_step} prompts x {args.group_size}), <= {args.max_new_tokens} new tokens, "
        f"batches of {args.batch_size}, {args.threads} thread(s); {args.rounds} rounds after {args.warmup} "
        "warm-up, median [min, max]\n"
    )
    columns = ["variant", "s/call", "tokens/call", "tokens/s", "tokens/s vs plain"]
    return header + render_table(summary_table(rows, columns), width=150)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="22.5M", help="0.11M, 22.5M or HIDDENxLAYERSxHEADSxFFN")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/rollout")
    parser.add_argument("--models", default="runs/bench/models", help="where the tiny models are cached")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0 (sampling)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    result = run(args)
    table = render(result, args)
    print(table)
    path = write_results(
        Path(args.out), "rollout", {"settings": vars(args), "machine": machine_info(), **result}, table
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
