"""Train with your own reward function on a built-in task, from Python.

python examples/custom_reward.py
"""

from posttrain import TrainConfig, train


def short_and_correct(prompt: str, completion: str, **row) -> float:
    """1 for the exact answer, minus a small penalty per extra character."""
    text = completion.strip()
    correct = text.split()[0] == row["answer"] if text else False
    return float(correct) - 0.01 * max(0, len(text) - len(row["answer"]))


if __name__ == "__main__":
    config = TrainConfig(
        algorithm="grpo",
        run={"name": "custom-reward"},
        optim={"steps": 10},
        # the function itself; a YAML config names it as 'examples/custom_reward.py:short_and_correct'
        data={"reward_fns": [{"fn": short_and_correct}]},
    )
    result = train(config, overwrite=True)  # running the example again replaces its run
    print(result.table)
