"""Write the tutorial's made-up task: reverse a string of 3-6 letters.

python examples/own_task/make_data.py   # -> examples/own_task/reverse.jsonl (2,000 rows)

Each row has a ``prompt``, the ``target`` the reward functions in ``reward.py`` check, and a
``demo``: a demonstration for the warm-start, as a dataset of human-written answers would have
one. Like such data it is imperfect: for 6-letter strings, 4 demonstrations in 5 drop the last
letter. Imitation learns that flaw; RL with the exact reward can fix it.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).with_name("reverse.jsonl")


def make_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))))
    rows = []
    for word in sorted(words):
        target = word[::-1]
        sloppy = len(word) == 6 and rng.random() < 0.8
        rows.append(
            {"prompt": f"reverse {word}:", "target": target, "demo": target[:-1] if sloppy else target}
        )
    return rows


if __name__ == "__main__":
    rows = make_rows(2000)
    random.Random(1).shuffle(rows)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {OUT}")
