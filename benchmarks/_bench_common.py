"""Shared pieces of the speed benchmarks (vs_trl.py, step_budget.py, rollout.py).

Prompts, the reward, model sizes, statistics and result files. The TRL side (``_trl_side.py``) runs in
TRL's own virtualenv, where posttrain is not installed, and imports this module too: nothing here
imports posttrain or transformers at module level.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# one thread per process: set before torch is imported by whoever imports this module first
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
}

VOWELS = frozenset("aeiouAEIOU")


@dataclass(frozen=True)
class ModelSize:
    """A tiny Llama's shape (tied embeddings, as ``posttrain.models.tiny`` builds it)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    def key(self) -> str:
        return f"h{self.hidden}-l{self.layers}-a{self.heads}-i{self.intermediate}"


# named by their parameter count with the 512-token tokenizer these benchmarks train
SIZES: dict[str, ModelSize] = {
    "0.11M": ModelSize(hidden=64, layers=2, heads=4, intermediate=120),
    "22.5M": ModelSize(hidden=640, layers=6, heads=10, intermediate=1070),
}


def parse_size(text: str) -> tuple[str, ModelSize]:
    """A size by name (``0.11M``, ``22.5M``) or spelt out as ``HIDDENxLAYERSxHEADSxINTERMEDIATE``."""
    if text in SIZES:
        return text, SIZES[text]
    try:
        hidden, layers, heads, intermediate = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"model size {text!r}: give one of {sorted(SIZES)} or HIDDENxLAYERSxHEADSxINTERMEDIATE "
            "(e.g. 32x1x2x64)"
        ) from None
    size = ModelSize(hidden, layers, heads, intermediate)
    return size.key(), size


def vowel_share(text: str) -> float:
    """The benchmarks' reward: the share of a completion's letters that are vowels (0 without letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0


def vowel_reward(prompt: str, completion: str, **row: Any) -> float:
    """``vowel_share`` as a posttrain reward function ``(prompt, completion, **row) -> float``."""
    return vowel_share(completion)


# posttrain's grpo preset made TRL's GRPO (loss_type "dapo", beta 0): token-mean over the batch, no KL
TRL_MATCHED_ALGO: dict[str, Any] = {"aggregation": "token-mean", "kl_placement": "none"}


def posttrain_config(
    *,
    model: str | Path,
    rows: str | Path,
    workdir: str | Path,
    seed: int,
    steps: int,
    prompts_per_step: int,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    lr: float,
    algorithm: str = "grpo",
    algo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A posttrain config tree (for ``TrainConfig.model_validate``) for the benchmarks' task.

    The model folder ``model``, the prompts of ``rows`` (JSONL) trained on in full, the vowel reward,
    no warm-start, no evaluation or logging; one epoch of one mini-batch in one micro-batch (one
    optimizer step per rollout batch, one forward as TRL does), AdamW at a constant ``lr``, max grad
    norm 1. ``algo``: preset overrides (``TRL_MATCHED_ALGO`` for the TRL comparison; None = the
    preset as shipped).
    """
    return {
        "algorithm": algorithm,
        "run": {"name": "bench", "output_dir": str(workdir), "seed": seed, "num_threads": 1},
        "model": {"path": str(model)},
        "data": {
            "path": str(rows),
            "test_path": str(rows),  # train on every row, as TRL does (the test split is unused)
            "reward_fns": [{"fn": vowel_reward}],
            "max_new_tokens": max_new_tokens,
        },
        "rollout": {
            "prompts_per_step": prompts_per_step,
            "group_size": group_size,
            "temperature": temperature,
        },
        "algo": dict(algo or {}),
        "optim": {
            "steps": steps,
            "lr": lr,
            "lr_schedule": "constant",
            "micro_batch_size": prompts_per_step * group_size,
            "max_grad_norm": 1.0,
        },
        "warmstart": {"steps": 0},
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False, "num_samples": 0},
    }


def build_posttrain(tree: dict[str, Any]) -> tuple[Any, Any]:
    """``(task, state)`` for a config tree, built as ``posttrain.train`` builds them (seeded)."""
    from posttrain import TrainConfig
    from posttrain.train.setup import build_state, build_task, seed_everything

    cfg = TrainConfig.model_validate(tree)
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    assert cfg.model.path is not None
    return task, build_state(cfg, task, Path(cfg.model.path))


def quiet_transformers() -> None:
    """No progress bars or info lines from transformers (model loading prints both)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def make_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct short prompts (about 10-14 tokens each with the benchmarks' tokenizer)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7)))
        prompt = f"write a word like {word} with many vowels:"
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Text the benchmarks' BPE tokenizer is trained on: the prompts and random words (512 tokens)."""
    rng = random.Random(seed + 1)
    words = [
        " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
            for _ in range(rng.randint(3, 10))
        )
        for _ in range(2000)
    ]
    return make_prompts(512, seed) + words


def write_rows(path: Path, prompts: Sequence[str]) -> Path:
    """The prompts as a JSONL dataset (one ``{"prompt": ...}`` row per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (NaN for none)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is NaN."""
    return a / b if b and a == a and b == b else float("nan")


def fmt_num(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, but whole numbers from 1000 up (no exponent)."""
    return f"{value:.0f}" if abs(value) >= 10 ** (digits - 1) * 10 else f"{value:.{digits}g}"


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """``median [min, max]``."""
    s = spread(values)
    return f"{fmt_num(s['median'], digits)} [{fmt_num(s['min'], digits)}, {fmt_num(s['max'], digits)}]"


def build_model(folder: Path, size: ModelSize, seed: int = 0) -> Path:
    """The tiny Llama of ``size`` with the benchmarks' tokenizer, saved (once) under ``folder``."""
    from posttrain.models.tiny import build_tiny_model

    return build_tiny_model(
        folder / f"tiny-{size.key()}-s{seed}",
        tokenizer_corpus(seed),
        hidden_size=size.hidden,
        num_layers=size.layers,
        num_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=128,
        seed=seed,
    )


def count_parameters(model_dir: Path) -> int:
    """Parameters of the saved model (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(out: Path, name: str, results: dict[str, Any], table: str) -> Path:
    """``<out>/results.json`` and ``<out>/table.txt``; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table)
    path = out / "results.json"
    path.write_text(json.dumps({"benchmark": name, **results}, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
