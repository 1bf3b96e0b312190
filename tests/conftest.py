"""Shared fixtures: one thread per test process, offline HF, a tiny model + tokenizer built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from posttrain.models.tiny import build_tiny_model

# Tiny models: one thread avoids oversubscription stalls when test processes share few cores.
torch.set_num_threads(1)


def arithmetic_corpus() -> list[str]:
    sums = [f"{a}+{b}={a + b}" for a in range(0, 100, 7) for b in range(0, 100, 9)]
    return sums + ["What is 12 plus 3? The answer is 15.", "Compute: 7 + 8 = 15"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model",
        arithmetic_corpus(),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
