"""Run set-up: task building, the cached embedded model, TrainState wiring and seeding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModel

from posttrain.algorithms.kl import AdaptiveKLController, FixedKLController
from posttrain.algorithms.presets import PRESETS
from posttrain.data.datasets import DataError
from posttrain.data.tasks import get_task, task_corpus
from posttrain.models.critic import ValueModel
from posttrain.models.load import load_policy, save_policy
from posttrain.rewards.functions import resolve_reward_specs
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.multi_turn import MultiTurnCollector, TurnLimits
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import load_config
from posttrain.train.setup import (
    build_collector,
    build_state,
    build_task,
    embedded_model_path,
    seed_everything,
)
from posttrain.train.step import rl_step, sampling_params

SMALL = [
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "warmstart.steps=0",
    "warmstart.batch_size=8",
    "data.num_train=16",
    "data.num_test=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "logging.tensorboard=false",
    "logging.progress=false",
]


def _config(out_dir: Path, *extra: str):
    return load_config(None, [*SMALL, f"run.output_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    """(output dir, task, model path) of a fresh tiny model, built once for the module."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("setup_runs")
    cfg = _config(out)
    task = build_task(cfg)
    return out, task, embedded_model_path(cfg, task)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _reward_file(folder: Path) -> Path:
    path = folder / "my_rewards.py"
    path.write_text(
        "def exact(prompt, completion, **row):\n    return float(completion.strip() == row['target'])\n"
    )
    return path


# ------------------------------------------------------------------------------- build_task


def test_build_task_builtin_sizes_and_default_reward(tmp_path: Path) -> None:
    task = build_task(_config(tmp_path))
    assert task.name == "arithmetic"
    assert (len(task.train), len(task.test)) == (16, 4)
    assert [spec.fn for spec in task.reward_fns] == ["arithmetic_exact"]
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.test}
    assert all("solution" in row for row in task.train)


def test_build_task_builtin_with_configured_rewards_and_budget(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        "data.reward_fns=[{fn: arithmetic_exact, weight: 0.5}, {fn: format_answer_tag, weight: 2.0}]",
        "data.max_new_tokens=7",
    )
    task = build_task(cfg)
    assert [(s.fn, s.weight) for s in task.reward_fns] == [
        ("arithmetic_exact", 0.5),
        ("format_answer_tag", 2.0),
    ]
    assert task.max_new_tokens == 7
    names = [(name, weight) for name, _, weight in resolve_reward_specs(task.reward_fns)]
    assert names == [("arithmetic_exact", 0.5), ("format_answer_tag", 2.0)]


def test_build_task_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    a = build_task(_config(tmp_path))
    b = build_task(_config(tmp_path))
    c = build_task(_config(tmp_path, "run.seed=1"))
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train


def test_build_task_from_a_user_jsonl(tmp_path: Path) -> None:
    rows = [{"question": f"{i}+1=", "target": str(i + 1)} for i in range(10)]
    data = _write_rows(tmp_path / "data" / "sums.jsonl", rows)
    rewards = _reward_file(tmp_path)
    cfg = _config(
        tmp_path,
        f"data.path={data}",
        "data.prompt_field=question",
        "data.num_train=6",
        "data.num_test=3",
        f"data.reward_fns=[{{fn: '{rewards}:exact', weight: 2.0}}]",
    )
    task = build_task(cfg)
    assert task.name == "sums"
    # no test_path: num_test rows held out by a seeded shuffle, never trained on; num_train caps the rest
    assert len(task.test) == 3 and len(task.train) == 6
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.test}
    assert {r["prompt"] for r in task.train + task.test} <= {f"{i}+1=" for i in range(10)}
    assert all(r["target"] == str(int(r["prompt"].split("+")[0]) + 1) for r in task.train)
    assert "question" not in task.train[0]
    assert task.max_new_tokens == 64  # default budget for a user dataset
    [(name, fn, weight)] = resolve_reward_specs(task.reward_fns)
    assert (name, weight) == ("exact", 2.0)
    assert fn("p", " 5 ", target="5") == 1.0 and fn("p", "4", target="5") == 0.0


def test_build_task_from_user_files_with_a_test_path_and_budget(tmp_path: Path) -> None:
    train = _write_rows(
        tmp_path / "train.jsonl", [{"prompt": f"{i}+2=", "target": str(i + 2)} for i in range(5)]
    )
    test = _write_rows(
        tmp_path / "test.jsonl", [{"prompt": f"{i}+3=", "target": str(i + 3)} for i in range(4)]
    )
    rewards = _reward_file(tmp_path)
    cfg = _config(
        tmp_path,
        f"data.path={train}",
        f"data.test_path={test}",
        "data.num_test=2",
        "data.max_new_tokens=3",
        f"data.reward_fns=[{{fn: '{rewards}:exact'}}]",
    )
    task = build_task(cfg)
    assert len(task.train) == 5  # num_train (16) is a limit, not a requirement
    assert [r["prompt"] for r in task.test] == ["0+3=", "1+3="]
    assert task.max_new_tokens == 3


def test_user_dataset_without_reward_functions_is_a_clear_error(tmp_path: Path) -> None:
    data = _write_rows(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "target": "2"}])
    with pytest.raises(ValueError, match=r"data.reward_fns: a dataset given by data.path needs at least one"):
        build_task(_config(tmp_path, f"data.path={data}"))


# ------------------------------------------------------- your own data: splits and demonstrations

ALL_ROWS = ["data.num_train=null", "data.num_test=null"]


def _sums(folder: Path, count: int, *, solutions: int | None = None, field: str = "solution") -> Path:
    """``count`` rows ``"i+1="``; the first ``solutions`` of them (default all) carry a demonstration."""
    rows = [{"prompt": f"{i}+1=", "target": str(i + 1)} for i in range(count)]
    for row in rows[: count if solutions is None else solutions]:
        row[field] = row["target"]
    return _write_rows(folder / "sums.jsonl", rows)


def _dataset_config(tmp_path: Path, data: Path, *extra: str):
    rewards = _reward_file(tmp_path)
    return _config(
        tmp_path, f"data.path={data}", f"data.reward_fns=[{{fn: '{rewards}:exact'}}]", *ALL_ROWS, *extra
    )


def _prompts(rows: list[dict]) -> set[str]:
    return {row["prompt"] for row in rows}


def test_every_row_is_used_and_a_tenth_held_out_by_default(tmp_path: Path, capsys) -> None:
    task = build_task(_dataset_config(tmp_path, _sums(tmp_path, 50)))
    assert (len(task.train), len(task.test)) == (45, 5)  # no warm-start here (warmstart.steps=0)
    assert not _prompts(task.train) & _prompts(task.test)
    assert (
        capsys.readouterr().out.splitlines()[-1].endswith("sums.jsonl: 50 rows -> 45 RL, 5 test (held out)")
    )
    again = build_task(_dataset_config(tmp_path, _sums(tmp_path, 50), "data.test_fraction=0.2"))
    assert (len(again.train), len(again.test)) == (40, 10)
    other_seed = build_task(_dataset_config(tmp_path, _sums(tmp_path, 50), "run.seed=1"))
    assert _prompts(other_seed.test) != _prompts(task.test)


def test_builtin_task_defaults_are_the_demos_680_and_200(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    assert (cfg.data.num_train, cfg.data.num_test) == (None, None)
    task = build_task(cfg)
    reference = get_task("arithmetic", seed=0, num_train=680, num_test=200)
    assert task.train == reference.train and task.test == reference.test
    assert task.demonstrations is None  # the warm-start imitates the training rows, as before


def test_warm_start_and_rl_split_the_rows_with_demonstrations(tmp_path: Path, capsys) -> None:
    cfg = _dataset_config(
        tmp_path, _sums(tmp_path, 50, field="target"), "warmstart.steps=1", "data.solution_field=target"
    )
    task = build_task(cfg)
    warm = task.warmstart_rows()
    assert len(warm) + len(task.train) == 45 and abs(len(warm) - len(task.train)) <= 1
    assert not _prompts(warm) & _prompts(task.train) and not _prompts(warm) & _prompts(task.test)
    assert all(row["solution"] == row["target"] for row in warm)  # the configured field, as text
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith(f"50 rows -> {len(warm)} warm-start, {len(task.train)} RL, 5 test (held out)")
    shares = build_task(
        _dataset_config(tmp_path, _sums(tmp_path, 50), "warmstart.steps=1", "warmstart.split_fraction=0.2")
    )
    assert len(shares.warmstart_rows()) == 9 and len(shares.train) == 36


def test_warm_start_on_all_rows_when_asked(tmp_path: Path, capsys) -> None:
    task = build_task(
        _dataset_config(tmp_path, _sums(tmp_path, 20), "warmstart.steps=1", "warmstart.rows=all")
    )
    assert _prompts(task.warmstart_rows()) == _prompts(task.train) and len(task.train) == 18
    assert "-> 18 RL (the warm-start imitates 18 of them), 2 test" in capsys.readouterr().out


def test_no_split_without_a_warm_start(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _sums(tmp_path, 20)
    for extra in ("warmstart.steps=0", f"model.path={tiny_model_dir}"):
        task = build_task(_dataset_config(tmp_path, data, "warmstart.steps=1", extra))
        assert len(task.train) == 18  # RL trains on every training row


def test_builtin_task_splits_only_when_asked(tmp_path: Path) -> None:
    task = build_task(_config(tmp_path, "warmstart.steps=1", "warmstart.rows=split"))
    assert (len(task.warmstart_rows()), len(task.train)) == (8, 8)
    assert not _prompts(task.warmstart_rows()) & _prompts(task.train)
    assert all("flawed_solution" in row for row in task.warmstart_rows())  # built-in rows, unchanged


def test_only_rows_with_a_demonstration_are_imitated_and_counted(tmp_path: Path, capsys) -> None:
    cfg = _dataset_config(
        tmp_path, _sums(tmp_path, 40, solutions=10), "warmstart.steps=1", "warmstart.rows=all"
    )
    task = build_task(cfg)
    training = len(task.train)
    with_demo = [row for row in task.train if row["solution"] is not None]  # a missing field reads None
    assert _prompts(task.warmstart_rows()) == _prompts(with_demo)
    line = capsys.readouterr().out.splitlines()[-1]
    assert (
        f"only {len(with_demo)} of {training} training rows have a demonstration (data.solution_field 'solution')"
        in line
    )


def test_demonstrations_from_a_file_of_their_own(tmp_path: Path, capsys) -> None:
    demos = _write_rows(
        tmp_path / "demos" / "demos.jsonl", [{"q": f"{i}+5=", "answer": i + 5} for i in range(7)]
    )
    data = _write_rows(tmp_path / "rows.jsonl", [{"q": f"{i}+1=", "target": str(i + 1)} for i in range(20)])
    cfg = _dataset_config(
        tmp_path,
        data,
        "warmstart.steps=1",
        "data.prompt_field=q",
        "data.solution_field=answer",
        f"data.demonstrations_path={demos}",
    )
    task = build_task(cfg)
    assert len(task.train) == 18  # RL trains on every training row
    assert [(row["prompt"], row["solution"]) for row in task.warmstart_rows()] == [
        (f"{i}+5=", str(i + 5)) for i in range(7)
    ]
    assert (
        capsys.readouterr().out.splitlines()[-1].endswith("; warm-start: 7 rows of data.demonstrations_path")
    )
    assert "6+5=" in "".join(task_corpus(task))  # the tokenizer sees the demonstrations too
    _write_rows(demos, [{"q": "1+5=", "answer": "6"}, {"q": "1+1="}])
    with pytest.raises(
        DataError,
        match=r"row 1 \(line 2\) of data.demonstrations_path .* no value for required field 'answer'",
    ):
        build_task(cfg)


def test_too_few_rows_for_the_splits_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.path '.*sums.jsonl' has 2 rows: too few to hold out 2"):
        build_task(_dataset_config(tmp_path, _sums(tmp_path, 2), "data.num_test=2"))
    with pytest.raises(DataError, match=r"none left for RL; add rows, or set warmstart.rows=all"):
        build_task(_dataset_config(tmp_path, _sums(tmp_path, 2), "warmstart.steps=1"))


def test_an_empty_dataset_is_a_data_error_naming_the_setting(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"data.path '.*empty.jsonl' has no rows"):
        build_task(_dataset_config(tmp_path, empty))


# ------------------------------------------------------------------------ embedded model


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_embedded_model_without_warm_start_is_the_cached_base(base) -> None:
    out, task, path = base
    assert path.parent == out / ".cache"
    assert path.name.startswith("tiny-arithmetic-") and path.name.endswith("h32-l1-s0")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    before = _mtimes(path)
    again = embedded_model_path(_config(out), task)
    assert again == path
    assert _mtimes(path) == before  # not rebuilt


def test_embedded_model_is_sized_by_the_config(base) -> None:
    _, _, path = base
    model, tokenizer = load_policy(path)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert tokenizer.pad_token is not None
    assert tokenizer("12+3=", add_special_tokens=False).input_ids == [
        tokenizer.convert_tokens_to_ids(c) for c in "12+3="
    ]  # one token per digit / symbol


def test_char_tokenizer_option_builds_its_own_cached_model(base) -> None:
    out, task, bpe_path = base
    char_path = embedded_model_path(_config(out, "model.tiny_tokenizer=char"), task)
    assert char_path != bpe_path and char_path.parent == bpe_path.parent
    _, tokenizer = load_policy(char_path)
    assert tokenizer.convert_ids_to_tokens(tokenizer("12+3=", add_special_tokens=False).input_ids) == list(
        "12+3="
    )
    assert embedded_model_path(_config(out), task) == bpe_path  # the default's cache key is unchanged


def test_warm_start_is_cached_and_keyed_by_its_settings(base) -> None:
    out, task, base_path = base
    cfg = _config(out, "warmstart.steps=2")
    warm = embedded_model_path(cfg, task)
    assert warm != base_path and warm.parent == base_path.parent
    assert warm.name.startswith("warm-")
    weights = warm / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    cache_listing = sorted(p.name for p in warm.parent.iterdir())
    assert embedded_model_path(_config(out, "warmstart.steps=2"), task) == warm
    assert weights.stat().st_mtime_ns == stamp  # the warm-start did not run again
    assert sorted(p.name for p in warm.parent.iterdir()) == cache_listing
    # any warm-start setting changes the cache key
    other_lr = embedded_model_path(_config(out, "warmstart.steps=2", "warmstart.lr=0.002"), task)
    other_steps = embedded_model_path(_config(out, "warmstart.steps=3"), task)
    assert len({warm, other_lr, other_steps}) == 3
    # and the warm-start really changed the weights
    model_base, _ = load_policy(base_path)
    model_warm, _ = load_policy(warm)
    assert not torch.equal(model_base.model.embed_tokens.weight, model_warm.model.embed_tokens.weight)


def test_dataset_without_solutions_skips_the_warm_start_and_says_so(tmp_path: Path, capsys) -> None:
    data = _write_rows(
        tmp_path / "plain.jsonl", [{"prompt": f"{i}+1=", "target": str(i + 1)} for i in range(6)]
    )
    rewards = _reward_file(tmp_path)
    cfg = _config(
        tmp_path, f"data.path={data}", "warmstart.steps=5", f"data.reward_fns=[{{fn: '{rewards}:exact'}}]"
    )
    task = build_task(cfg)
    path = embedded_model_path(cfg, task)
    assert path.name.startswith("tiny-plain-")
    assert not any(p.name.startswith("warm-") for p in path.parent.iterdir())
    assert (
        "warning: data.solution_field 'solution' is in none of the rows: the embedded tiny model starts "
        "from random weights and cannot learn; add demonstrations (data.solution_field / "
        "data.demonstrations_path) or give model.path"
    ) in capsys.readouterr().err.splitlines()


def test_warm_start_cache_key_depends_on_the_training_rows(tmp_path: Path) -> None:
    cfg_a = _config(tmp_path, "warmstart.steps=1", "data.num_test=4")
    cfg_b = _config(tmp_path, "warmstart.steps=1", "data.num_test=8")
    task_a, task_b = build_task(cfg_a), build_task(cfg_b)
    leaked = {r["prompt"] for r in task_a.train} & {r["prompt"] for r in task_b.test}
    # B's held-out prompts are demonstrations in A's warm-start: B must not reuse A's cached model
    assert leaked
    assert embedded_model_path(cfg_a, task_a) != embedded_model_path(cfg_b, task_b)


def test_warm_start_cache_key_depends_on_the_dataset_contents(tmp_path: Path) -> None:
    rewards = _reward_file(tmp_path)
    paths = []
    for folder, op in (("a", "+"), ("b", "-")):
        rows = [{"prompt": f"{i}{op}1=", "solution": str(eval(f"{i}{op}1")), "target": "0"} for i in range(6)]
        data = _write_rows(tmp_path / folder / "train.jsonl", rows)
        cfg = _config(
            tmp_path, f"data.path={data}", "warmstart.steps=1", f"data.reward_fns=[{{fn: '{rewards}:exact'}}]"
        )
        paths.append(embedded_model_path(cfg, build_task(cfg)))
    assert paths[0] != paths[1]


def test_a_dataset_edited_in_place_gets_a_fresh_warm_start(tmp_path: Path) -> None:
    rewards = _reward_file(tmp_path)
    data = tmp_path / "train.jsonl"
    cfg = _config(
        tmp_path, f"data.path={data}", "warmstart.steps=1", f"data.reward_fns=[{{fn: '{rewards}:exact'}}]"
    )
    paths = []
    for answer in ("1", "2"):  # same file name, same prompts, other solutions
        _write_rows(data, [{"prompt": f"{i}*1=", "solution": answer, "target": "0"} for i in range(6)])
        paths.append(embedded_model_path(cfg, build_task(cfg)))
    assert paths[0] != paths[1]
    assert paths[0].is_dir() and paths[1].is_dir()


# ---------------------------------------------------------------------------- build_state


def _state(base, *extra: str, **kwargs):
    out, task, path = base
    cfg = _config(out, *extra)
    return cfg, build_state(cfg, task, path, **kwargs)


@pytest.mark.parametrize("algorithm", sorted(PRESETS))
def test_state_wiring_follows_the_preset(base, algorithm: str) -> None:
    # distill learns from teachers: the starting model itself here
    teachers = [f'distill.teachers=[{{name: self, path: "{base[2]}"}}]'] if algorithm == "distill" else []
    cfg, state = _state(base, f"algorithm={algorithm}", *teachers)
    assert (state.teachers is not None) == (algorithm == "distill")
    preset = PRESETS[algorithm]
    assert state.preset == cfg.preset()
    assert (state.critic is not None) == preset.uses_critic
    assert (state.critic is not None and state.critic.optimizer is not None) == preset.uses_critic
    assert (state.critic is not None and state.critic.scheduler is not None) == preset.uses_critic
    wants_reference = preset.kl_placement != "none" and preset.kl_coef > 0
    assert (state.reference is not None) == wants_reference
    assert (state.kl_controller is not None) == wants_reference
    if wants_reference:
        assert isinstance(state.kl_controller, FixedKLController)
        assert state.kl_controller.coef == preset.kl_coef
        assert not state.reference.shares_policy
        assert not any(p.requires_grad for p in state.reference.model.parameters())
    if state.critic is not None:
        assert isinstance(state.critic.module, ValueModel)
    assert state.step == 0 and state.data_position == 0
    assert state.max_new_tokens == base[1].max_new_tokens
    assert isinstance(state.engine, HFRolloutEngine) and state.engine.model is state.policy
    assert isinstance(state.collector, SingleTurnCollector)
    assert [term.name for term in state.collector.reward_terms] == ["arithmetic_exact"]


def test_zero_kl_coefficient_means_no_reference(base) -> None:
    _, state = _state(base, "algorithm=grpo", "algo.kl_coef=0")
    assert state.reference is None and state.kl_controller is None
    _, state = _state(base, "algorithm=grpo", "algo.kl_placement=none")
    assert state.reference is None and state.kl_controller is None
    _, state = _state(base, "algorithm=dapo", "algo.kl_placement=loss", "algo.kl_coef=0.1")
    assert state.reference is not None and state.kl_controller.coef == 0.1


def test_adaptive_kl_target_gives_an_adaptive_controller(base) -> None:
    _, state = _state(base, "algorithm=ppo", "optim.adaptive_kl_target=0.2")
    assert isinstance(state.kl_controller, AdaptiveKLController)
    assert state.kl_controller.coef == PRESETS["ppo"].kl_coef and state.kl_controller.target == 0.2


def test_reference_is_a_frozen_copy_of_the_starting_model(base) -> None:
    _, state = _state(base, "algorithm=grpo")
    ref_params = dict(state.reference.model.named_parameters())
    for name, param in state.policy.named_parameters():
        assert torch.equal(param, ref_params[name])
        assert param.data_ptr() != ref_params[name].data_ptr()
    with torch.no_grad():
        next(state.policy.parameters()).add_(1.0)
    assert not torch.equal(next(state.policy.parameters()), next(state.reference.model.parameters()))


def test_optimizers_hold_exactly_the_trainable_parameters(base) -> None:
    _, state = _state(
        base, "algorithm=ppo", "optim.lr=0.003", "optim.critic_lr=0.02", "optim.weight_decay=0.1"
    )
    [group] = state.actor.optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in state.policy.parameters()}
    assert group["lr"] == 0.003 and group["weight_decay"] == 0.1
    [critic_group] = state.critic.optimizer.param_groups
    assert {id(p) for p in critic_group["params"]} == {id(p) for p in state.critic.module.parameters()}
    assert critic_group["lr"] == 0.02


def test_lora_trains_only_the_adapters_and_the_reference_shares_the_policy(base) -> None:
    _, state = _state(base, "algorithm=grpo", "model.lora={r: 4, alpha: 8}")
    trainable = {name for name, p in state.policy.named_parameters() if p.requires_grad}
    frozen = {name for name, p in state.policy.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all("lora_" in name for name in trainable)
    assert {id(p) for p in state.actor.optimizer.param_groups[0]["params"]} == {
        id(p) for p in state.policy.parameters() if p.requires_grad
    }
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert state.reference is not None and state.reference.shares_policy
    assert state.reference.model is state.policy


def _lrs(optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_warms_up_linearly_then_holds(base) -> None:
    _, state = _state(
        base,
        "algorithm=ppo",
        "optim.lr=0.01",
        "optim.critic_lr=0.1",
        "optim.warmup_steps=4",
        "optim.lr_schedule=constant",
    )
    assert _lrs(state.actor.optimizer, state.actor.scheduler, 6) == pytest.approx(
        [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01]
    )
    assert _lrs(state.critic.optimizer, state.critic.scheduler, 6) == pytest.approx(
        [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]
    )


def test_lr_without_warmup_is_constant(base) -> None:
    _, state = _state(base, "optim.lr=0.01", "optim.lr_schedule=constant")
    assert _lrs(state.actor.optimizer, state.actor.scheduler, 3) == pytest.approx([0.01] * 3)


def test_default_lr_schedule_decays_linearly_over_the_run(base) -> None:
    _, state = _state(base, "optim.lr=0.01", "optim.steps=2")
    assert _lrs(state.actor.optimizer, state.actor.scheduler, 3) == pytest.approx([0.01, 0.005, 0.0])


def test_linear_lr_schedule_decays_to_zero_at_the_last_step(base) -> None:
    _, state = _state(base, "optim.lr=0.01", "optim.steps=4", "optim.lr_schedule=linear")
    assert _lrs(state.actor.optimizer, state.actor.scheduler, 5) == pytest.approx(
        [0.01, 0.0075, 0.005, 0.0025, 0.0]
    )


def test_resume_paths_load_policy_and_critic_but_reference_stays_the_start(base, tmp_path: Path) -> None:
    _, _, path = base
    model, tokenizer = load_policy(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2.0)
    save_policy(model, tokenizer, tmp_path / "policy")
    critic = ValueModel.from_pretrained(path)
    with torch.no_grad():
        critic.value_head.weight.fill_(0.25)
        critic.value_head.bias.fill_(-1.5)
    critic.save_pretrained(tmp_path / "critic")

    _, state = _state(base, "algorithm=ppo", policy_path=tmp_path / "policy", critic_path=tmp_path / "critic")
    torch.testing.assert_close(state.policy.model.embed_tokens.weight, model.model.embed_tokens.weight)
    start, _ = load_policy(path)
    torch.testing.assert_close(
        state.reference.model.model.embed_tokens.weight, start.model.embed_tokens.weight
    )
    assert (state.critic.module.value_head.weight == 0.25).all() and (
        state.critic.module.value_head.bias == -1.5
    ).all()


def test_config_critic_path_initialises_the_critic(base, tmp_path: Path) -> None:
    _, _, path = base
    critic = ValueModel.from_pretrained(path)
    with torch.no_grad():
        critic.value_head.bias.fill_(3.0)
    critic.save_pretrained(tmp_path / "critic")
    _, state = _state(base, "algorithm=ppo", f"model.critic_path={tmp_path / 'critic'}")
    assert state.critic.module.value_head.bias.item() == 3.0


def _small_critic(path: Path, out: Path, vocab_size: int) -> Path:
    config = AutoConfig.from_pretrained(path)
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = 16, 1, 32
    config.num_attention_heads = config.num_key_value_heads = 2
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    ValueModel(AutoModel.from_config(config)).save_pretrained(out)
    return out


def test_a_smaller_critic_than_the_policy_trains_with_ppo(base, tmp_path: Path) -> None:
    _, task, path = base
    policy_config = AutoConfig.from_pretrained(path)
    critic_dir = _small_critic(path, tmp_path / "small_critic", policy_config.vocab_size)
    _, state = _state(base, "algorithm=ppo", f"model.critic_path={critic_dir}", "rollout.prompts_per_step=2")
    assert state.critic.module.backbone.config.hidden_size == 16 < policy_config.hidden_size
    head_before = state.critic.module.value_head.weight.detach().clone()
    metrics = rl_step(state, task.train[:2])
    assert metrics["value_loss"] > 0
    assert not torch.equal(state.critic.module.value_head.weight, head_before)


def test_a_critic_with_a_smaller_vocabulary_is_refused(base, tmp_path: Path) -> None:
    _, _, path = base
    vocab = AutoConfig.from_pretrained(path).vocab_size
    critic_dir = _small_critic(path, tmp_path / "narrow_critic", vocab - 5)
    with pytest.raises(
        ValueError, match=r"model\.critic_path: .*vocabulary of \d+ tokens.*tokenizer has \d+"
    ):
        _state(base, "algorithm=ppo", f"model.critic_path={critic_dir}")


# ------------------------------------------------------------------------------- seeding


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5])
def test_seed_everything_makes_python_numpy_and_torch_repeat(seed: int) -> None:
    seed_everything(seed)
    first = _draws()
    seed_everything(seed)
    assert _draws() == first
    seed_everything(seed + 1)
    assert _draws() != first


def test_seed_everything_makes_critic_heads_reproducible(base) -> None:
    _, _, path = base
    seed_everything(3)
    a = ValueModel.from_pretrained(path).value_head.weight
    seed_everything(3)
    b = ValueModel.from_pretrained(path).value_head.weight
    torch.testing.assert_close(a, b)


def test_every_env_setting_reaches_the_multi_turn_collector(tmp_path: Path, tiny_model_dir) -> None:
    cfg = _config(
        tmp_path,
        "data.task=key_chain",
        "env.options={step_reward: 0.25}",
        "env.max_turns=7",
        "env.max_episode_tokens=99",
        "env.max_tool_output_tokens=5",
        "env.context_budget=77",
        "env.compaction=policy",
        "env.keep_turns=2",
        "rollout.stop=['!']",
    )
    assert cfg.env_name() == "key_chain"
    task = build_task(cfg)
    model, tokenizer = load_policy(tiny_model_dir)
    collector = build_collector(cfg, task, HFRolloutEngine(model, tokenizer), tokenizer)
    assert isinstance(collector, MultiTurnCollector)
    assert collector.limits == TurnLimits(
        max_turns=7,
        max_episode_tokens=99,
        max_tool_output_tokens=5,
        context_budget=77,
        compaction="policy",
        keep_turns=2,
    )
    assert collector.make_env().step_reward == 0.25
    assert collector.max_episode_actions == min(99, 7 * task.max_new_tokens)
    assert sampling_params(cfg, max_new_tokens=3).stop == ("!",)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_run_on_your_own_data_reports_what_it_used(tmp_path: Path, capsys) -> None:
    """train() on a made-up JSONL: the split's sizes are printed, the saved config names the dataset
    (not the built-in task), and samples.jsonl shows each row's target beside its completion."""
    from posttrain.train.loop import train

    data = _sums(tmp_path, 30, field="target")
    cfg = _dataset_config(
        tmp_path,
        data,
        "data.solution_field=target",
        "data.max_new_tokens=4",
        "warmstart.steps=2",
        "optim.steps=1",
        "eval.num_prompts=3",
        "run.name=own",
    )
    result = train(cfg)
    out = capsys.readouterr().out
    assert f"data: {data}: 30 rows -> 14 warm-start, 13 RL, 3 test (held out)" in out
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["data"]["task"] is None and saved["data"]["path"] == str(data)
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["row"]["target"] == str(int(s["prompt"].split("+")[0]) + 1) for s in samples)


def test_no_warm_start_and_no_model_warns_of_random_weights(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "warmstart.steps=0")
    path = embedded_model_path(cfg, build_task(cfg))
    assert path.name.startswith("tiny-")
    assert (
        "warning: warmstart.steps is 0 and model.path is not set: RL starts from the embedded tiny model's "
        "random weights"
    ) in capsys.readouterr().err
