"""TRL's side of ``vs_trl.py``: one run of TRL's ``GRPOTrainer``, timed step by step.

Run by ``vs_trl.py`` with TRL's own interpreter (``.venv-trl/bin/python benchmarks/_trl_side.py
SPEC.json``); not meant to be run by hand. Reads the run's settings from SPEC.json and writes the
per-step times, completion tokens and rewards to the spec's ``result`` path. Imports nothing from
posttrain (it is not installed in TRL's virtualenv).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _bench_common import THREAD_ENV, vowel_share

for _key, _value in THREAD_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the thread settings)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``warmup + steps`` GRPO steps; time every step by its end-to-end interval."""
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    total_steps = spec["warmup"] + spec["steps"]
    tokens: list[int] = []
    rewards: list[float] = []

    def vowel_reward(prompts: list[Any], completions: list[str], completion_ids: list[list[int]], **_: Any):
        """The benchmarks' reward (``vowel_share``), batched as TRL calls it; counts sampled tokens."""
        scores = [vowel_share(text) for text in completions]
        tokens.append(sum(len(ids) for ids in completion_ids))
        rewards.append(sum(scores) / len(scores))
        return scores

    class StepTimes(TrainerCallback):
        """perf_counter at each optimizer step's start and end."""

        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines() if line.strip()]
    config = GRPOConfig(
        output_dir=spec["workdir"],
        per_device_train_batch_size=spec["prompts_per_step"] * spec["group_size"],
        gradient_accumulation_steps=1,
        num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",  # token-mean over the whole batch
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=total_steps,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )
    timer = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[vowel_reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    torch.set_num_threads(1)  # in case the trainer's set-up changed it
    trainer.train()
    # a step's time is the interval between consecutive step ends (the trainer's whole loop body,
    # data loading included); the first step has no previous end, so it counts from its start
    intervals = [timer.ends[0] - timer.begins[0]] + [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {
        "side": "trl",
        "step_times": intervals[spec["warmup"] :],
        "tokens": tokens[spec["warmup"] :],
        "rewards": rewards[spec["warmup"] :],
        "threads": torch.get_num_threads(),
        "steps_run": len(timer.ends),
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run(spec)
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
