"""Fixtures of the Ray tests (test_ray.py, test_asynchronous.py): one local Ray session per test
module (2 CPUs, offline), a tiny warm-started Llama, train states built by ``build_state`` with the
Ray engine swapped in. Nothing here imports Ray unless a test asks for these fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from posttrain.rewards.functions import RewardTerm
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import load_config
from posttrain.train.loop import rows_for_step
from posttrain.train.setup import build_state, build_task, embedded_model_path, seed_everything
from posttrain.train.step import TrainState, rl_step

SMALL = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=80",
    "warmstart.lr=0.003",
    "warmstart.batch_size=16",
    "data.num_train=32",
    "data.num_test=4",
    "eval.num_prompts=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "logging.tensorboard=false",
    "logging.progress=false",
]
# workers take half a logical CPU each, so two engines and a trainer task fit the 2-CPU session
WORKER_CPUS = 0.5


def char_score(prompt: str, completion: str, **row: Any) -> float:
    """A deterministic reward with spread inside a group (the tiny model rarely solves the task)."""
    return float(sum(map(ord, completion)) % 7) / 6.0


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from posttrain.scale.ray import LOCAL_INIT

    torch.set_num_threads(1)
    ray.init(num_cpus=2, **LOCAL_INIT)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    """(output dir, task, model path): a tiny Llama warm-started for a few steps."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("scale_runs")
    cfg = load_config(None, [*SMALL, f"run.output_dir={out}"])
    task = build_task(cfg)
    return out, task, embedded_model_path(cfg, task)


def make_config(setup: Any, *extra: str) -> Any:
    return load_config(None, [*SMALL, f"run.output_dir={setup[0]}", *extra])


def make_state(setup: Any, *extra: str, engine: Any = None) -> TrainState:
    """A ``build_state`` state scored by ``char_score``; with ``engine``, that engine (synced with
    the new policy) samples instead of the in-process one."""
    _, task, path = setup
    cfg = make_config(setup, *extra)
    seed_everything(cfg.run.seed)
    state = build_state(cfg, task, path)
    if engine is not None:
        engine.logprobs_match_policy = True  # an earlier asynchronous test may have cleared it
        engine.sync_weights(state.policy)
        state.engine = engine
    terms = [RewardTerm("char_score", char_score, 1.0)]
    state.collector = SingleTurnCollector(state.engine, state.tokenizer, terms, state.max_new_tokens)
    return state


def run_steps(state: TrainState, train_rows: list[dict[str, Any]], steps: int) -> list[dict[str, float]]:
    """``steps`` RL steps on the loop's stream of rows, as ``train.loop._rl_steps`` draws them."""
    cfg = state.config
    history = []
    for _ in range(steps):
        rows = rows_for_step(train_rows, state.data_position, cfg.rollout.prompts_per_step, cfg.run.seed)
        state.data_position += len(rows)
        history.append(rl_step(state, rows) | {"samples": [s["completion"] for s in state.last_samples]})
    return history


@pytest.fixture(scope="module")
def kit(setup: Any) -> SimpleNamespace:
    """The helpers bound to this module's tiny model: ``kit.state(*overrides, engine=None)``,
    ``kit.config(*overrides)``, ``kit.run_steps(state, steps)``, ``kit.worker_cpus``."""
    return SimpleNamespace(
        state=lambda *extra, engine=None: make_state(setup, *extra, engine=engine),
        config=lambda *extra: make_config(setup, *extra),
        run_steps=lambda state, steps: run_steps(state, setup[1].train, steps),
        worker_cpus=WORKER_CPUS,
    )


@pytest.fixture(scope="module")
def engine(ray_session: None, setup: Any) -> Iterator[Any]:
    """One rollout worker on the tiny model, shared by a module's tests (each syncs its weights)."""
    from posttrain.scale.ray import ray_engine

    _, task, path = setup
    state = build_state(make_config(setup), task, path)
    made = ray_engine(state.policy, state.tokenizer, path, num_workers=1, cpus_per_worker=WORKER_CPUS)
    yield made
    made.close()
