"""End-to-end agent runs: the key_chain environment, compaction into sub-traces, PPO and GRPO."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.train.config import load_config
from posttrain.train.loop import train

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).parents[2] / "configs"

# the shipped agent configs, shrunk to a few seconds
AGENT = [
    "data.task_options={min_horizon: 5, max_horizon: 7}",
    "data.num_train=32",
    "data.num_test=4",
    "env.context_budget=48",  # a prompt and ~3 turns: every episode is compacted
    "env.keep_turns=1",
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=20",
    "warmstart.batch_size=8",
    "warmstart.lr=0.003",
    "eval.num_prompts=4",
    "eval.every=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "optim.steps=2",
    "optim.num_mini_batches=2",
    "logging.tensorboard=false",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("agent_runs")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_agent_run_with_compaction_end_to_end(out_dir, algorithm):
    path = CONFIGS / f"agent_{algorithm}.yaml"
    cfg = load_config(path, [*AGENT, f"run.output_dir={out_dir}", f"run.name={algorithm}"])
    assert cfg.algorithm == algorithm and cfg.data.task == "key_chain"
    result = train(cfg)
    steps = [row for row in result.history if "reward_mean" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        # every episode outgrows the 48-token budget at least once, unless it ends in < 3 turns
        assert row["segments"] > 1 and row["compacted_fraction"] > 0
        assert row["turns"] >= 1
    if algorithm == "ppo":
        assert "value_loss" in steps[0] and "explained_variance" in steps[0]
    assert "eval_turns" in result.final_eval and "eval_segments" in result.final_eval
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    compacted = [s for s in samples if s["compacted_after_turns"]]
    assert compacted, "samples.jsonl should show where episodes were compacted"
    for sample in samples:
        assert sample["prompt"].startswith("find the end of chain")
        assert sample["segments"] == len(sample["compacted_after_turns"]) + 1
        assert all(
            {"action", "observation", "reward", "tool", "error"} <= set(turn) for turn in sample["turns"]
        )
    assert (result.checkpoint / "policy" / "config.json").is_file()


def test_a_resumed_ppo_agent_run_matches_an_uninterrupted_one(out_dir):
    """Compacted multi-turn episodes resume bit for bit: a run cut after its step-2 checkpoint
    continues to the uninterrupted run's steps 3-4 (sampling seeds, critic, schedules)."""

    def config(name):
        extra = [
            "optim.steps=4",
            "logging.checkpoint_every=2",
            f"run.output_dir={out_dir}",
            f"run.name={name}",
        ]
        return load_config(CONFIGS / "agent_ppo.yaml", [*AGENT, *extra])

    full = train(config("full"))
    cut = train(config("cut"))
    shutil.rmtree(cut.checkpoint)  # as if the run had died before its step-4 checkpoint
    resumed = train(config("cut"), resume=True)

    def steps(result):
        rows = [r for r in result.history if r["step"] in (3, 4) and "reward_mean" in r]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]

    assert steps(resumed) == steps(full) and len(steps(full)) == 2
    assert resumed.final_eval == full.final_eval


def test_a_guarded_run_counts_intercepts_marks_samples_and_reports_the_rate(out_dir, chat_server):
    """env.guard end to end: a rule marks every lookup suspect, an HTTP judge (a local server)
    denies them, the policy sees decoys, and metrics, samples and the report say so."""
    chat_server.content = "DENY: testing the guard"
    guard = (
        "env.guard={default_rules: false, rules: [{name: lookups, pattern: '[0-9]', action: suspect, "
        f"tools: [lookup]}}], judge: {{kind: http, url: '{chat_server.base_url}', model: judge}}}}"
    )
    cfg = load_config(
        CONFIGS / "agent_guard.yaml",
        # enough warm-start for the policy to write parseable calls
        [*AGENT, "warmstart.steps=200", guard, f"run.output_dir={out_dir}", "run.name=guarded"],
    )
    assert cfg.data.task == "leaky_chain" and cfg.env.guard.judge.kind == "http"
    result = train(cfg)
    steps = [row for row in result.history if "reward_mean" in row]
    assert chat_server.requests, "the judge was never asked"
    for row in steps:
        assert row["guard_checked"] >= row["guard_flagged"] == row["guard_judged"] >= row["guard_denied"]
        assert row["guard_denied"] > 0 and 0 < row["guard_interception_rate"] <= 1
        assert 0 < row["guard_intercepted_episodes"] <= 1 and row["guard_judge_seconds"] > 0
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    intercepted = [t for s in samples for t in s["turns"] if t.get("guard", {}).get("denied")]
    assert intercepted and all(t["guard"]["reason"] == "testing the guard" for t in intercepted)
    assert all(t["tool"] == "lookup" and t["observation"].strip() == "= no such file" for t in intercepted)
    assert "guard:" in result.table and "tool calls intercepted" in result.table
