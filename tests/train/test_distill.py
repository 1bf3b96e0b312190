"""On-policy distillation in the trainer: the distill config, loading and routing teachers, the
teacher phase of the step, distillation added to RL, and a short end-to-end run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.algorithms.registry import ADVANTAGES
from posttrain.data.batch import collate_episodes
from posttrain.distill.teachers import TeacherError, make_router
from posttrain.models.prefix import ActionForward
from posttrain.models.tiny import build_tiny_model
from posttrain.rewards.functions import RewardTerm
from posttrain.rollout.single_turn import SingleTurnCollector
from posttrain.train.config import ConfigError, load_config
from posttrain.train.config_distill import teacher_folder
from posttrain.train.setup import build_state, build_task, build_teachers, seed_everything
from posttrain.train.step import (
    TrainState,
    compute_advantages,
    fill_old_ref_values,
    fill_teacher_logprobs,
    logprob_temperature,
    rl_step,
    sampling_params,
    shape_rewards,
    update,
)
from posttrain.train.trust import code_in_config

BASE = [
    "data.task=mix",  # arithmetic and countdown rows, each with its `domain`
    "data.num_train=6",
    "data.num_test=2",
    "rollout.prompts_per_step=4",
    "rollout.group_size=2",
    "eval.num_prompts=4",
    "logging.tensorboard=false",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """{'student': the tiny model, 'other': the same tokenizer with other weights, 'out': a folder}."""
    out = tmp_path_factory.mktemp("distill")
    other = out / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    return {"student": tiny_model_dir, "other": other, "out": out}


def teachers(**paths) -> str:
    return "distill.teachers=" + json.dumps(
        [{"name": name, "path": str(path)} for name, path in paths.items()]
    )


def config(models, *extra: str):
    return load_config(
        None, [*BASE, f"model.path={models['student']}", f"run.output_dir={models['out']}", *extra]
    )


def two_experts(models) -> list[str]:
    """The arithmetic rows go to the student's own weights, the countdown rows to the other ones."""
    return [teachers(arithmetic=models["student"], countdown=models["other"]), "distill.route_field=domain"]


# ------------------------------------------------------------------------------------------------
# The distill section: bad values fail at load, naming the field


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["algorithm=distill"], "add distill.teachers"),
        (["algorithm=distill", teachers(a="/no/such/folder")], "distill.teachers.0.path"),
        (["algorithm=distill", teachers(a="{student}", b="{other}")], "need a routing"),
        (["algorithm=distill", teachers(a="{student}", b="{student}x")], "distill.teachers.1.path"),
        (["algorithm=distill", teachers(**{"a/b": "{student}"})], "distill.teachers.0.name"),
        (
            [
                "algorithm=distill",
                'distill.teachers=[{name: a, path: "{student}"}, {name: a, path: "{other}"}]',
                "distill.route_field=domain",
            ],
            "given twice",
        ),
        (
            [
                "algorithm=distill",
                teachers(a="{student}"),
                "distill.route_field=domain",
                "distill.routes={x: b}",
            ],
            "distill.routes.x: unknown teacher 'b'",
        ),
        (["algorithm=distill", teachers(a="{student}"), "distill.routes={x: a}"], "distill.route_field"),
        (
            [
                "algorithm=distill",
                teachers(a="{student}"),
                "distill.route_field=domain",
                "distill.route_fn=m:f",
            ],
            "set only one",
        ),
        (["algorithm=distill", teachers(a="{student}"), "distill.route_fn=route"], "distill.route_fn"),
        (["algorithm=distill", teachers(a="{student}"), "distill.coef=0.5"], "drop distill.coef"),
        (
            ["algorithm=distill", teachers(a="{student}"), "algo.advantage_kwargs={gamma: 0.5}"],
            "distill.discount",
        ),
        (["algorithm=distill", teachers(a="{student}"), "distill.discount=1.5"], "distill.discount"),
        ([teachers(a="{student}"), "distill.discount=0.5"], "set distill.coef > 0"),
        (["distill.coef=0.5"], "distill.coef is set, but distill.teachers is empty"),
        (["distill.route_field=domain"], "distill.route_field is set, but distill.teachers is empty"),
        (["distill.coef=-1"], "distill.coef"),
    ],
)
def test_bad_distill_settings_fail_at_load(models, settings, message):
    settings = [
        s.replace("{student}", str(models["student"])).replace("{other}", str(models["other"]))
        for s in settings
    ]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config(models, *settings)


def test_good_distill_settings_load(models):
    cfg = config(
        models, "algorithm=distill", *two_experts(models), "distill.discount=0.3", "rollout.group_size=1"
    )
    assert cfg.preset().advantage_kwargs == {"gamma": 0.3}  # one discount setting, given to the estimator
    with pytest.raises(ConfigError, match="group_size must be >= 2"):  # a group baseline still needs a group
        config(models, "rollout.group_size=1")
    cfg = config(models, *two_experts(models), "distill.coef=0.5", "distill.discount=0.9")
    assert cfg.algorithm == "grpo" and cfg.distill.coef == 0.5
    assert config(models, teachers(a=models["student"])).distill.coef == 0  # teachers that only report


def test_a_teacher_path_may_be_a_run_folder_or_a_checkpoint(models, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000004"
    shutil.copytree(models["student"], checkpoint / "policy")
    (checkpoint / "COMPLETE").write_text("")
    assert teacher_folder(str(tmp_path / "run")) == str(checkpoint / "policy")
    assert teacher_folder(str(checkpoint)) == str(checkpoint / "policy")
    assert teacher_folder(str(models["student"])) == str(models["student"])
    config(models, "algorithm=distill", teachers(a=tmp_path / "run"))


def test_a_route_fn_is_code_that_a_resumed_run_must_be_trusted_with():
    refs = code_in_config({"distill": {"route_fn": "routes.py:by_domain"}})
    assert [ref.key for ref in refs] == ["distill.route_fn"]


# ------------------------------------------------------------------------------------------------
# Routing and loading teachers


def test_routers(tmp_path):
    rows = [{"prompt": "1-2=", "domain": "math"}, {"prompt": "nums 1 2 target 3:", "domain": "countdown"}]
    by_field = make_router(["arith", "countdown"], route_field="domain", routes={"math": "arith"})
    assert [by_field(row) for row in rows] == ["arith", "countdown"]
    with pytest.raises(TeacherError, match="has domain 'math', which names no teacher"):
        make_router(["arith", "countdown"], route_field="domain")(rows[0])
    with pytest.raises(TeacherError, match="has no field 'topic'"):
        make_router(["arith"], route_field="topic")(rows[0])
    assert make_router(["only"])(rows[1]) == "only"
    with pytest.raises(TeacherError, match="need a routing"):
        make_router(["a", "b"])
    code = tmp_path / "routing.py"
    code.write_text("def by_length(row):\n    return 'short' if len(row['prompt']) < 8 else 'long'\n")
    by_fn = make_router(["short", "long"], route_fn=f"{code}:by_length")
    assert [by_fn(row) for row in rows] == ["short", "long"]
    with pytest.raises(TeacherError, match="returned 'long'"):
        make_router(["short"], route_fn=f"{code}:by_length")(rows[1])


def test_a_teacher_with_another_tokenizer_is_refused_at_setup(models, tmp_path):
    foreign = build_tiny_model(
        tmp_path / "char",
        ["abc"],
        hidden_size=16,
        num_layers=1,
        num_heads=1,
        intermediate_size=32,
        tokenizer_kind="char",
    )
    cfg = config(models, "algorithm=distill", teachers(a=foreign))
    student_tokenizer = AutoTokenizer.from_pretrained(models["student"])
    with pytest.raises(
        TeacherError, match=r"teacher 'a' .* does not share the student's tokenizer.*tiny_tokenizer=char"
    ):
        build_teachers(cfg, build_task(cfg), student_tokenizer, dtype=torch.float32)


def test_a_training_row_that_routes_to_no_teacher_fails_at_setup(models):
    cfg = config(
        models, "algorithm=distill", teachers(arithmetic=models["student"]), "distill.route_field=domain"
    )
    with pytest.raises(TeacherError, match="countdown"):
        build_teachers(
            cfg, build_task(cfg), AutoTokenizer.from_pretrained(models["student"]), dtype=torch.float32
        )


# ------------------------------------------------------------------------------------------------
# The teacher phase of the step


def char_score(prompt: str, completion: str, **row) -> float:
    """A reward with spread inside a group, whatever the untrained model writes."""
    return float(sum(map(ord, completion)) % 7) / 6.0


def make_state(models, *extra: str) -> tuple[TrainState, list[dict]]:
    cfg = config(models, *extra)
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    state = build_state(cfg, task, models["student"])
    terms = [RewardTerm("char_score", char_score, 1.0)]
    state.collector = SingleTurnCollector(state.engine, state.tokenizer, terms, state.max_new_tokens)
    return state, task.train[: cfg.rollout.prompts_per_step]


def prepared(state: TrainState, rows: list[dict], seed: int = 7):
    """rollout -> collate -> old log-probs -> teacher log-probs, as ``rl_step`` does."""
    params = sampling_params(state.config, max_new_tokens=state.max_new_tokens)
    rollout = state.collector.collect(rows, params, group_size=state.config.rollout.group_size, seed=seed)
    episodes, _ = shape_rewards(state, rollout.episodes)
    batch = collate_episodes(episodes, state.tokenizer.pad_token_id)
    temperature = logprob_temperature(state.config)
    fill_old_ref_values(state, batch, temperature)
    metrics = fill_teacher_logprobs(state, batch, rows, temperature)
    return batch, metrics


def test_routing_sends_each_row_to_its_own_teacher(models):
    state, rows = make_state(models, "algorithm=distill", *two_experts(models))
    assert {row["domain"] for row in rows} == {"arithmetic", "countdown"}
    batch, metrics = prepared(state, rows)
    assert state.teachers is not None
    for i in range(len(batch)):
        row = batch.select([i])
        plan = ActionForward.plan(row.input_ids, row.attention_mask, row.loss_mask, share=False)
        own = rows[int(batch.group_ids[i])]["domain"]
        other = "countdown" if own == "arithmetic" else "arithmetic"
        by_own = plan.logprobs(state.teachers.models[own])[0] * row.loss_mask
        by_other = plan.logprobs(state.teachers.models[other])[0] * row.loss_mask
        width = row.input_ids.shape[1]
        torch.testing.assert_close(batch.teacher_logprobs[i : i + 1, :width], by_own, rtol=1e-5, atol=1e-5)
        assert (by_own - by_other).abs().max() > 0.1  # the two teachers are told apart
    assert metrics["distill/rows/arithmetic"] == metrics["distill/rows/countdown"] == 0.5
    # the arithmetic teacher is the student itself: no disagreement there; the other disagrees
    assert abs(metrics["distill/reverse_kl/arithmetic"]) < 1e-4
    assert metrics["distill/reverse_kl/countdown"] > 0.1
    mean_kl = (metrics["distill/reverse_kl/arithmetic"] + metrics["distill/reverse_kl/countdown"]) / 2
    assert metrics["distill/reverse_kl"] == pytest.approx(mean_kl, rel=0.5)  # token-weighted mean


def test_a_teacher_equal_to_the_student_gives_no_signal(models):
    """Zero up to float noise (a frozen copy's forward may round differently in the last bit), so the
    policy stays where it is (ratio 1 after the update); the estimator's exact 0 for identical
    log-probs is tested in tests/algorithms/test_distill.py."""
    state, rows = make_state(
        models, "algorithm=distill", teachers(same=models["student"]), "rollout.reuse_logprobs=false"
    )
    batch, metrics = prepared(state, rows)
    compute_advantages(state, batch)
    assert batch.advantages is not None
    assert batch.advantages.abs().max() < 1e-5 and abs(metrics["distill/reverse_kl"]) < 1e-6
    assert bool((batch.advantages[batch.loss_mask == 0] == 0).all())
    params = [p for p in state.policy.parameters() if p.requires_grad]
    state.actor.optimizer, state.actor.scheduler = torch.optim.SGD(params, lr=1.0), None
    before = [p.detach().clone() for p in params]
    result = update(state, batch, step_seed=0)
    assert result["clipfrac"] == 0.0 and result["grad_norm"] < 1e-5
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(params, before, strict=True)) < 1e-5
    plan = ActionForward.plan(batch.input_ids, batch.attention_mask, batch.loss_mask)
    with torch.no_grad():
        after = plan.logprobs(state.policy, temperature=logprob_temperature(state.config))[0]
    ratio = torch.exp((after - batch.old_logprobs) * batch.loss_mask)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_distillation_adds_coef_times_the_teachers_signal_to_the_rl_advantage(models):
    state, rows = make_state(models, *two_experts(models), "distill.coef=0.5", "distill.discount=0.9")
    batch, _ = prepared(state, rows)
    compute_advantages(state, batch)
    with_teachers = batch.advantages.clone()
    assert state.teachers is not None
    state.config.distill.coef = 0.0  # the RL advantage alone, from the same batch
    state.config.distill.discount = 0.0
    compute_advantages(state, batch)
    signal, _ = ADVANTAGES.call("reverse_kl", batch.as_dict(), {"gamma": 0.9})
    assert signal.abs().max() > 0.1
    torch.testing.assert_close(with_teachers, batch.advantages + 0.5 * signal, rtol=0, atol=1e-6)


def test_distillation_at_coef_zero_is_the_rl_run_bit_for_bit(models):
    plain, rows = make_state(models, "optim.lr=1e-2")
    watched, _ = make_state(models, "optim.lr=1e-2", *two_experts(models))
    assert plain.teachers is None and watched.teachers is not None
    for step in range(2):
        a, b = rl_step(plain, rows), rl_step(watched, rows)
        assert "distill/reverse_kl" in b and "distill/reverse_kl" not in a
        same = {k for k in a if not k.startswith("time/") and k != "tokens_per_s"}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}, step
    assert a["grad_norm"] > 0  # the steps did train
    for (name, x), (_, y) in zip(
        plain.policy.state_dict().items(), watched.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------------------------------------
# End to end


def first_token_kl(student, teacher, tokenizer, prompts: list[str]) -> float:
    """Mean over ``prompts`` of the exact KL(student || teacher) of the first completion token."""
    total = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            mine = torch.log_softmax(student(ids).logits[0, -1], dim=-1)
            theirs = torch.log_softmax(teacher(ids).logits[0, -1], dim=-1)
            total += float((mine.exp() * (mine - theirs)).sum())
    return total / len(prompts)


@pytest.mark.slow
def test_a_short_distillation_run_pulls_the_student_toward_its_teachers(models, tmp_path):
    """Six steps of distillation from a teacher with other weights: the run reports the reverse KL
    per teacher, and the exact KL to the teacher on the training prompts' first token goes down."""
    from posttrain.train.loop import train

    cfg = load_config(
        None,
        [
            *BASE,
            f"model.path={models['student']}",
            f"run.output_dir={tmp_path}",
            "algorithm=distill",
            teachers(arithmetic=models["other"], countdown=models["other"]),
            "distill.route_field=domain",
            "optim.steps=6",
            "optim.epochs=4",
            "optim.lr=1e-2",
            "optim.lr_schedule=constant",
            "rollout.prompts_per_step=6",
            "rollout.group_size=4",
        ],
    )
    result = train(cfg)
    steps = [row for row in result.history if "distill/reverse_kl" in row]
    assert len(steps) == 6
    assert {"distill/reverse_kl/arithmetic", "distill/reverse_kl/countdown"} <= set(steps[0])
    assert result.checkpoint is not None
    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["other"])
    prompts = [row["prompt"] for row in build_task(cfg).train]
    before = first_token_kl(
        AutoModelForCausalLM.from_pretrained(models["student"]), teacher, tokenizer, prompts
    )
    after = first_token_kl(
        AutoModelForCausalLM.from_pretrained(result.checkpoint / "policy"), teacher, tokenizer, prompts
    )
    assert after < 0.97 * before, (before, after)
