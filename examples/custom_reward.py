"""Train with your own reward function on a built-in task, from Python.

python examples/custom_reward.py
"""

from posttrain import TrainConfig, train
from posttrain.train.config import load_config


def short_and_correct(prompt: str, completion: str, **row) -> float:
    """1 for the exact answer, minus a small penalty per extra character."""
    text = completion.strip()
    correct = text.split()[0] == row["answer"] if text else False
    return float(correct) - 0.01 * max(0, len(text) - len(row["answer"]))


if __name__ == "__main__":
    config: TrainConfig = load_config(
        None,
        [
            "run.name=custom-reward",
            "algorithm=grpo",
            "optim.steps=10",
            f"data.reward_fns=[{{fn: '{__file__}:short_and_correct'}}]",
        ],
    )
    result = train(config)
    print(result.table)
