"""The single-process roles: what the step asks of an actor, a critic and the ranks."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data.batch import micro_batches
from posttrain.train.roles import Actor, Ranks, TrainedRole, weights_are_finite


def _role(lr: float = 0.1) -> TrainedRole:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return Actor(module, optimizer, scheduler)


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips() -> None:
    role = _role()
    for p in role.module.parameters():
        p.grad = torch.full_like(p, 2.0)
    count = sum(p.numel() for p in role.module.parameters())
    assert role.clip_grad_norm(1.0) == pytest.approx(2.0 * math.sqrt(count))
    clipped = torch.cat([p.grad.flatten() for p in role.module.parameters()])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)


def test_apply_gradients_steps_only_when_told_and_always_clears() -> None:
    role = _role(lr=0.5)
    before = [p.detach().clone() for p in role.module.parameters()]
    for p in role.module.parameters():
        p.grad = torch.ones_like(p)
    role.apply_gradients(False)
    assert all(torch.equal(a, b) for a, b in zip(before, role.module.parameters()))
    assert all(p.grad is None for p in role.module.parameters())
    for p in role.module.parameters():
        p.grad = torch.ones_like(p)
    role.apply_gradients(True)
    for a, b in zip(before, role.module.parameters()):
        torch.testing.assert_close(b.detach(), a - 0.5)


def test_advance_schedule_moves_the_learning_rate() -> None:
    role = _role(lr=0.2)
    assert role.lr == pytest.approx(0.2)
    role.apply_gradients(True)  # a step first, as the trainer does (no gradients: nothing moves)
    role.advance_schedule()
    assert role.lr == pytest.approx(0.1)


def test_dropout_off_makes_forward_passes_repeatable_with_gradients() -> None:
    role = _role()
    role.module.train()
    role.dropout_off()
    x = torch.randn(8, 3)
    first = role.module(x)
    assert torch.equal(first, role.module(x))
    first.sum().backward()
    assert all(p.grad is not None for p in role.module.parameters())


def test_weights_are_finite_sees_one_bad_weight() -> None:
    role = _role()
    assert weights_are_finite(role.module, None) and role.weights_are_finite()
    with torch.no_grad():
        role.module[0].weight[1, 2] = float("nan")
    assert not weights_are_finite(role.module)
    assert weights_are_finite()  # nothing to check


def test_a_single_process_trains_every_micro_batch_itself() -> None:
    ranks = Ranks()
    assert ranks.is_main and ranks.world_size == 1
    attention = torch.ones(5, 3, dtype=torch.long)
    parts = micro_batches(attention, 2)
    shared = ranks.micro_batches(attention, 2)
    assert len(shared) == len(parts) and all(torch.equal(a, b) for a, b in zip(shared, parts))
    assert ranks.sum_metrics({"a": 1.0}, {"a": 2}) == ({"a": 1.0}, {"a": 2})
    assert ranks.all_finite(True) and not ranks.all_finite(False)
