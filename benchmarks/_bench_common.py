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


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """``median [min, max]``."""
    s = spread(values)
    return f"{s['median']:.{digits}g} [{s['min']:.{digits}g}, {s['max']:.{digits}g}]"


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
