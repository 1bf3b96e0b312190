"""Your own multi-turn environment with a tool, trained with PPO: sum a list one `add` call at a time.

python examples/custom_env.py

Each call's result decides the next call (the running total), so the task needs a chain of
dependent tool calls. The environment is plain Python: tools are typed, documented methods, and
`posttrain` owns tokens, masks, log-probs and compaction. `demonstrate` (optional) is a scripted
policy the embedded tiny model imitates before RL; your own HF model does not need one. Four RL
steps show the wiring in half a minute; raise `optim.steps` to train for real.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from posttrain.envs.tools import ToolEnv
from posttrain.train.config import load_config
from posttrain.train.loop import train


class AddEnv(ToolEnv):
    """Sum the numbers of the prompt with `add(a, b)`, then `answer(total)`; reward 1 if right."""

    def start(self, row: dict[str, Any]) -> str:
        self.numbers = [int(n) for n in row["numbers"]]
        self.additions = 0
        self.answered: int | None = None
        return row["prompt"] + "\n"

    def tools(self) -> dict[str, Any]:
        return {"add": self.add, "answer": self.answer}

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The running total (or the first number).
            b: The next number of the list.
        """
        self.additions += 1
        return a + b

    def answer(self, total: int) -> str:
        """Give the sum of all the numbers; ends the episode.

        Args:
            total: The sum.
        """
        self.answered = total
        return "done"

    def finished(self) -> bool:
        return self.answered is not None

    def outcome_reward(self) -> float:
        return float(self.answered == sum(self.numbers))

    def summary(self) -> str:
        return f"so far: {self.additions} additions"

    @staticmethod
    def demonstrate(context: str, rng: random.Random, flawed_fraction: float) -> str:
        """Add the next number to the latest result; answer after the last one."""
        numbers = [int(n) for n in re.match(r"add ([\d ]+)", context).group(1).split()]  # type: ignore[union-attr]
        results = [int(n) for n in re.findall(r"^= (\d+)$", context, flags=re.M)]
        done = len(results)
        total = results[-1] if results else numbers[0]
        if done + 1 < len(numbers):
            return f"add({total}, {numbers[done + 1]})\n"
        return f"answer({total})\n"


def write_rows(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        numbers = [rng.randint(1, 30) for _ in range(3)]
        prompt = "add " + " ".join(map(str, numbers))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "numbers": numbers, "answer": str(sum(numbers))})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    folder = Path(tempfile.mkdtemp(prefix="add-env-"))
    write_rows(folder / "train.jsonl", 200, seed=0)
    write_rows(folder / "test.jsonl", 20, seed=1)
    config = load_config(
        None,
        [
            "run.name=custom-env",
            f"run.output_dir={folder / 'runs'}",
            "algorithm=ppo",
            f"env.name={__file__}:AddEnv",
            f"data.path={folder / 'train.jsonl'}",
            f"data.test_path={folder / 'test.jsonl'}",
            "data.max_new_tokens=12",
            "model.tiny_hidden_size=64",
            "model.tiny_layers=2",
            "warmstart.steps=300",
            "warmstart.batch_size=16",
            "warmstart.lr=0.003",
            "rollout.prompts_per_step=8",
            "rollout.group_size=2",
            "optim.steps=4",
            "eval.num_prompts=20",
            "logging.tensorboard=false",
        ],
    )
    result = train(config)
    print(result.table)
    print(json.dumps(json.loads((result.run_dir / "samples.jsonl").read_text().splitlines()[-1]), indent=1))
