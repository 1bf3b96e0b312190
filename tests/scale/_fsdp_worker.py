"""One run of 2 RL steps on a fixed model and a deterministic sampler, in one process or in each
of torchrun's: writes the metrics and the final weights (rank 0) to ``OUT``.

    python _fsdp_worker.py MODEL_DIR OUT ALGORITHM [--set key=value ...]
    torchrun --nproc-per-node 2 _fsdp_worker.py MODEL_DIR OUT ALGORITHM [...]
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

from posttrain.rewards.functions import RewardTerm
from posttrain.rollout.engine import FINISH_LENGTH, Completion
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.scale.fsdp import init_distributed, place_on_ranks, world_size_from_env
from posttrain.train.config import load_config
from posttrain.train.setup import build_state, build_task, seed_everything
from posttrain.train.step import rl_step


class CountingEngine:
    """Completion k of a prompt in one call: tokens picked by a hash of (prompt, k), the same
    whichever process samples it; log-probs 0, so the trainer computes its own."""

    logprobs_match_policy = False

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def generate(self, prompt_ids, params, *, seed=None):
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for prompt in prompt_ids:
            key = tuple(prompt)
            k = seen[key] = seen.get(key, -1) + 1
            length = 2 + zlib.crc32(repr((key, k)).encode()) % 4
            ids = [3 + zlib.crc32(repr((key, k, i)).encode()) % (self.vocab - 3) for i in range(length)]
            out.append(Completion(list(prompt), ids, [0.0] * length, FINISH_LENGTH, " ".join(map(str, ids))))
        return out

    def sync_weights(self, model) -> None:
        pass


def spread(prompt: str, completion: str, **row) -> float:
    return float(sum(map(ord, completion)) % 7) / 6.0


def main() -> None:
    model_dir, out, algorithm, *sets = sys.argv[1:]
    torch.set_num_threads(1)
    overrides = [s for s in sets if s != "--set"]
    cfg = load_config(None, [f"model.path={model_dir}", f"algorithm={algorithm}", *overrides])
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    state = build_state(cfg, task, Path(model_dir))
    terms = [RewardTerm("spread", spread, 1.0)]
    engine = CountingEngine(len(state.tokenizer))
    state.collector = SingleTurnCollector(state.engine, state.tokenizer, terms, state.max_new_tokens)
    ranks = None
    if world_size_from_env() > 1:
        ranks = init_distributed()
        state = place_on_ranks(state, ranks)
    state.engine = engine
    inner = state.collector.collector if ranks is not None else state.collector
    inner.engine = engine
    history = []
    for step in range(2):
        rows = task.train[step * cfg.rollout.prompts_per_step : (step + 1) * cfg.rollout.prompts_per_step]
        history.append(rl_step(state, rows))
    policy = state.actor.full_module() if ranks is not None else state.actor.module
    critic = None
    if state.critic is not None:
        critic = state.critic.full_module() if ranks is not None else state.critic.module
    if ranks is None or ranks.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        weights = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
        if critic is not None:
            weights |= {f"critic.{k}": v.detach().clone() for k, v in critic.state_dict().items()}
        torch.save(weights, Path(out) / "weights.pt")
        (Path(out) / "metrics.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
