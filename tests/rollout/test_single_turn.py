"""Single-turn collection: samples carry the row's reference fields next to the completion."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from posttrain.rewards.functions import RewardTerm
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.scripted import ScriptedEngine
from posttrain.rollout.single_turn import MAX_REFERENCE_CHARS, SingleTurnCollector, reference_fields


def exact(prompt: str, completion: str, target: str, **row: object) -> float:
    return float(completion == target)


def test_samples_show_each_rows_target_beside_its_completion(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collector = SingleTurnCollector(
        ScriptedEngine(tokenizer, lambda context: "7"), tokenizer, [RewardTerm("exact", exact, 1.0)], 4
    )
    rows = [{"prompt": "3+4=", "target": "7", "level": 1}, {"prompt": "1+1=", "target": "2", "level": 2}]
    rollout = collector.collect(rows, SamplingParams(max_new_tokens=4), group_size=2, seed=0)
    assert [(s["prompt"], s["completion"], s["reward"], s["row"]) for s in rollout.samples] == [
        ("3+4=", "7", 1.0, {"target": "7", "level": 1}),
        ("3+4=", "7", 1.0, {"target": "7", "level": 1}),
        ("1+1=", "7", 0.0, {"target": "2", "level": 2}),
        ("1+1=", "7", 0.0, {"target": "2", "level": 2}),
    ]
    json.dumps(rollout.samples)  # ready for samples.jsonl


def test_long_reference_fields_are_cut() -> None:
    row = {
        "prompt": "p",
        "essay": "x" * 1000,
        "tests": ["assert f(1) == 2"] * 100,
        "small": [1, 2],
        "none": None,
    }
    fields = reference_fields(row)
    assert fields["essay"] == "x" * MAX_REFERENCE_CHARS + "..."
    assert isinstance(fields["tests"], str) and len(fields["tests"]) == MAX_REFERENCE_CHARS + 3
    assert fields["tests"].startswith('["assert f(1) == 2"')
    assert (fields["small"], fields["none"]) == ([1, 2], None) and "prompt" not in fields
