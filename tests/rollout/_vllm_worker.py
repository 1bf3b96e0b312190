"""Exercise ``VLLMRolloutEngine`` against ``HFRolloutEngine``; run with the vLLM venv's interpreter.

    .venv-vllm/bin/python tests/rollout/_vllm_worker.py WORK_DIR OUT_JSON

Builds a tiny Llama (head_dim 32: vLLM's CPU attention has no smaller head size), fits it briefly
so its greedy answers end in EOS, starts one vLLM engine and writes what ``test_vllm.py`` asserts
on as JSON: per scenario the completions of both engines (ids, log-probs, finish reasons, texts).
One engine serves every scenario, since starting vLLM costs ~30 s here.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models.forward import token_logprobs
from posttrain.models.load import LoraSettings, load_policy
from posttrain.models.tiny import build_tiny_model
from posttrain.rollout.engine import Completion, SamplingParams
from posttrain.rollout.hf import HFRolloutEngine, pad_batch
from posttrain.rollout.vllm import build_vllm_engine

CORPUS = [f"{a}+{b}={a + b}" for a in range(0, 100, 7) for b in range(0, 100, 9)]
# The last prompt spans several KV-cache blocks, so a stale prefix cache after a sync would show.
PROMPTS = ["1+2=", "12+34=", "7+8=", "40+2=", "3+3=", "99+1=", "5+17=", " ".join(CORPUS[:8]) + " 63+9="]


def fit(model: nn.Module, rows: list[list[int]], pad_id: int, *, steps: int, lr: float) -> None:
    """``steps`` Adam steps of next-token NLL on ``rows`` (full sequences)."""
    input_ids, attention_mask = pad_batch(rows, pad_id, left=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logprobs, _ = token_logprobs(model, input_ids, attention_mask)
        (-logprobs.sum() / attention_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def scored(
    model: nn.Module, pad_id: int, completions: list[Completion], temperature: float
) -> list[list[float]]:
    """log pi_T of each completion's tokens by the training forward (right padding, no cache)."""
    rows = [c.prompt_ids + c.completion_ids for c in completions]
    input_ids, attention_mask = pad_batch(rows, pad_id, left=False)
    with torch.no_grad():
        logprobs, _ = token_logprobs(model.eval(), input_ids, attention_mask, temperature=temperature)
    return [
        logprobs[row, len(c.prompt_ids) : len(c.prompt_ids) + len(c.completion_ids)].tolist()
        for row, c in enumerate(completions)
    ]


def dump(completions: list[Completion]) -> list[dict[str, Any]]:
    return [
        {"ids": c.completion_ids, "logprobs": c.logprobs, "finish": c.finish_reason, "text": c.text}
        for c in completions
    ]


def main(work_dir: Path, out_path: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = build_tiny_model(
        work_dir / "model",
        CORPUS + PROMPTS,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model, tokenizer = load_policy(path)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [[bos, *tokenizer(text).input_ids] for text in PROMPTS]
    fit(model, [[bos, *tokenizer(t).input_ids, eos] for t in CORPUS], pad, steps=60, lr=1e-2)
    hf = HFRolloutEngine(model, tokenizer)
    results: dict[str, Any] = {"eos": eos, "timings": {}}

    start = time.perf_counter()
    # The file holds the random init: the engine samples from the fitted weights only if the
    # build's sync_weights(policy) worked.
    # block_size 32 (CPU default: 128) so the long prompt fills prefix-cache blocks; the KV cache
    # size is the CPU default, as the rollout.engine: vllm config builds it.
    engine = build_vllm_engine(model, tokenizer, path, max_model_len=128, block_size=32)
    results["timings"]["engine_start_s"] = time.perf_counter() - start

    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    start = time.perf_counter()
    results["greedy"] = {
        "vllm": dump(engine.generate(prompts, greedy)),
        "hf": dump(hf.generate(prompts, greedy)),
    }
    results["timings"]["greedy_generate_s"] = time.perf_counter() - start
    no_eos = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_eos=False)
    results["no_eos"] = {
        "vllm": dump(engine.generate(prompts, no_eos)),
        "hf": dump(hf.generate(prompts, no_eos)),
    }

    # A two-character stop string taken from the middle of the first greedy answer.
    answer = results["greedy"]["hf"][0]["text"]
    stop = SamplingParams(max_new_tokens=12, temperature=0.0, stop=(answer[1:3], "\n"))
    results["stop"] = {
        "strings": list(stop.stop),
        "vllm": dump(engine.generate(prompts, stop)),
        "hf": dump(hf.generate(prompts, stop)),
    }

    # n samples per prompt = repeated prompts; seeded.
    sample = SamplingParams(max_new_tokens=10, temperature=0.8)
    repeated = [prompt for prompt in prompts[:3] for _ in range(4)]
    first = engine.generate(repeated, sample, seed=7)
    results["sampling"] = {
        "first": dump(first),
        "again": dump(engine.generate(repeated, sample, seed=7)),
        "other": dump(engine.generate(repeated, sample, seed=8)),
        "forward": scored(model, pad, first, 0.8),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.8, top_k=5), seed=1)
    results["truncation_warned"] = any("truncated" in str(w.message) for w in caught)

    # Weight sync: two optimizer steps towards answering "7" then EOS, then push the weights.
    seven = tokenizer.convert_tokens_to_ids("7")
    fit(model, [p + [seven, eos] for p in prompts], pad, steps=2, lr=3e-2)
    stale = engine.generate(prompts, greedy)
    start = time.perf_counter()
    engine.sync_weights(model)
    results["timings"]["sync_s"] = time.perf_counter() - start
    results["sync"] = {
        "stale": dump(stale),
        "vllm": dump(engine.generate(prompts, greedy)),
        "hf": dump(hf.generate(prompts, greedy)),
    }

    # LoRA: a peft policy on the saved (random-init) base with nonzero adapters, merged on sync.
    peft_model, _ = load_policy(path, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    peft_model.eval()
    engine.sync_weights(peft_model)
    lora_hf = HFRolloutEngine(peft_model, tokenizer)
    with peft_model.disable_adapter():
        base_only = dump(lora_hf.generate(prompts, greedy))
    results["lora"] = {
        "vllm": dump(engine.generate(prompts, greedy)),
        "hf": dump(lora_hf.generate(prompts, greedy)),
        "base_only": base_only,
    }
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main(Path(sys.argv[1]), Path(sys.argv[2]))
