"""The README's "Train on your own task" tutorial, run as written (the training shrunk by --set)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
TUTORIAL = README[README.index("## Train on your own task") : README.index("## What `make demo` does")]
POSTTRAIN = str(Path(sys.executable).with_name("posttrain"))

SHRINK = [
    "warmstart.steps=60",
    "rollout.prompts_per_step=4",
    "optim.steps=2",
    "eval.every=0",
    "eval.num_prompts=8",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def test_the_data_script_writes_the_shipped_rows_and_the_readme_shows_one():
    shipped = (ROOT / "examples" / "own_task" / "reverse.jsonl").read_bytes()
    done = subprocess.run(
        [sys.executable, "examples/own_task/make_data.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (ROOT / "examples" / "own_task" / "reverse.jsonl").read_bytes() == shipped  # deterministic
    rows = [json.loads(line) for line in shipped.decode().splitlines()]
    assert len(rows) == 2000
    shown = json.loads(re.search(r"```json\n(.*?)\n```", TUTORIAL, re.DOTALL).group(1))
    assert shown in rows
    sloppy = [r for r in rows if r["demo"] != r["target"]]
    assert sloppy and all(len(r["target"]) == 6 and r["demo"] == r["target"][:-1] for r in sloppy)


def test_the_reward_shown_is_the_one_the_config_uses():
    shown = re.search(r"```python\n(def exact.*?)```", TUTORIAL, re.DOTALL).group(1)
    namespace: dict = {}
    exec(shown, namespace)
    sys.path.insert(0, str(ROOT / "examples" / "own_task"))
    try:
        import reward
    finally:
        sys.path.pop(0)
    for completion in ("blsoyr", " blsoyr\n", "blsoy", ""):
        assert namespace["exact"]("p", completion, target="blsoyr") == reward.exact(
            "p", completion, target="blsoyr"
        )


@pytest.mark.slow
def test_the_tutorial_commands_train_and_evaluate(tmp_path):
    commands = re.search(r"\*\*4\. Train and evaluate\*\*\n\n```bash\n(.*?)```", TUTORIAL, re.DOTALL).group(1)
    make_data, train, evaluate = commands.strip().splitlines()
    assert train == "posttrain train --config configs/own_task.yaml"
    out = tmp_path / "runs"
    done = subprocess.run(
        [
            POSTTRAIN,
            *train.split()[1:],
            *[arg for s in SHRINK for arg in ("--set", s)],
            "--set",
            f"run.output_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "data: examples/own_task/reverse.jsonl: 2000 rows -> 900 warm-start, 900 RL, 200 test (held out)"
        in done.stdout
    )
    assert "before RL" in done.stdout and "after RL" in done.stdout
    samples = [json.loads(line) for line in (out / "own-task" / "samples.jsonl").read_text().splitlines()]
    assert all({"target", "demo"} <= set(sample["row"]) for sample in samples)
    args = evaluate.split()[1:]
    model_at = args.index("--model") + 1
    args[model_at] = args[model_at].replace("runs", str(out), 1)
    done = subprocess.run(
        [POSTTRAIN, *args, "--num-prompts", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reverse test: accuracy" in done.stdout
