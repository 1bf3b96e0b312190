"""Supervised warm-start: teach a fresh tiny model the task before RL, from (possibly flawed) demonstrations."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from posttrain.algorithms.masked import masked_mean
from posttrain.data.tasks import Task
from posttrain.models.forward import token_logprobs
from posttrain.models.load import load_policy
from posttrain.rollout.collector import encode_prompt
from posttrain.rollout.hf import pad_batch
from posttrain.train.logging import TrainProgress

# one demonstration: token ids and their loss mask (1 = imitate this token)
Demonstration = tuple[list[int], list[int]]
# (tokenizer, rows, rng) -> demonstrations for those rows (e.g. scripted agent episodes)
DemonstrationSource = Callable[[Any, list[dict[str, Any]], random.Random], list[Demonstration]]


def row_demonstrations(tokenizer: Any, rows: list[dict[str, Any]]) -> list[Demonstration]:
    """``prompt + solution + eos`` per row; the loss mask covers solution and eos only."""
    out = []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        answer = list(tokenizer(row["solution"], add_special_tokens=False)["input_ids"])
        answer.append(tokenizer.eos_token_id)
        out.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return out


def pad_demonstrations(demonstrations: list[Demonstration], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(input_ids, attention_mask, loss_mask)``, each ``[batch, time]``."""
    input_ids, attention_mask = pad_batch([ids for ids, _ in demonstrations], pad_token_id, left=False)
    loss_mask = torch.zeros(input_ids.shape)
    for i, (_, mask) in enumerate(demonstrations):
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.float32)
    return input_ids, attention_mask, loss_mask


def supervised_batch(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + solution + eos``; the loss mask covers solution and eos only."""
    return pad_demonstrations(row_demonstrations(tokenizer, rows), tokenizer.pad_token_id)


def demonstration(row: dict[str, Any], rng: random.Random, flawed_fraction: float) -> dict[str, Any]:
    """``row`` with its ``solution`` replaced by ``flawed_solution`` with probability ``flawed_fraction``.

    Rows without a ``flawed_solution`` are returned unchanged (and draw no random number).
    """
    if "flawed_solution" not in row:
        return row
    if rng.random() < flawed_fraction:
        return {**row, "solution": row["flawed_solution"]}
    return row


def warm_start(
    base_path: Path,
    out_dir: Path,
    task: Task,
    settings: Any,
    *,
    seed: int,
    progress: bool = True,
    source: DemonstrationSource | None = None,
) -> Path:
    """Fine-tune ``base_path`` on demonstrations of ``task.warmstart_rows()`` (the task's own
    demonstration rows, else its training rows) for ``settings.steps`` steps (cached).

    By default a demonstration is a row's solution (rows without one are skipped); a share
    ``settings.flawed_fraction`` of them comes from the rows' flawed solutions, when the task has
    them: imitation then learns the flaw, and RL against the verifier has something to correct.
    ``source`` replaces that with other demonstrations of the sampled rows (a scripted agent's
    episodes, one per sub-trace).
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    model, tokenizer = load_policy(base_path)
    model.train()
    # the loop AdamW, not the fused one: cached warm-starts stay what a fresh machine builds
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # cosine decay keeps the short stage stable
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=settings.steps)
    rng = random.Random(seed)
    rows = list(task.warmstart_rows())
    if source is None:
        rows = [row for row in rows if row.get("solution") is not None]
    if not rows:
        raise ValueError(f"task {task.name!r} has no rows to warm-start on")
    bar = TrainProgress(settings.steps, enabled=progress, fields=(("sft_loss", "warm-start loss"),))
    bar.start()
    for step in range(settings.steps):
        picked = rng.sample(rows, min(settings.batch_size, len(rows)))
        if source is None:
            demos = row_demonstrations(
                tokenizer, [demonstration(row, rng, settings.flawed_fraction) for row in picked]
            )
        else:
            demos = source(tokenizer, picked, rng)
        input_ids, attention_mask, loss_mask = pad_demonstrations(demos, tokenizer.pad_token_id)
        logprobs, _ = token_logprobs(model, input_ids, attention_mask)
        loss = -masked_mean(logprobs, loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(step + 1, {"sft_loss": loss.item()})
    bar.stop()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-warm-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished the same warm-start first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise
    return out_dir
