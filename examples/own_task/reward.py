"""Reward functions for the tutorial task (reverse a string): ``(prompt, completion, **row) -> float``."""


def exact(prompt: str, completion: str, target: str, **row) -> float:
    """1 when the completion is the reversed string, else 0 (the first reward: it defines accuracy)."""
    return float(completion.strip() == target)


def letters_in_place(prompt: str, completion: str, target: str, **row) -> float:
    """Partial credit: the share of the target's letters at the right position."""
    answer = completion.strip()
    return sum(a == b for a, b in zip(answer, target)) / len(target)
