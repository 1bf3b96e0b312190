"""The roles a training step talks to: the actor (the policy being trained), the critic, the frozen
reference and the rollout engine (``rollout.engine.RolloutEngine``), plus the ranks that share a step.

``rl_step`` reaches none of their modules or optimizers directly: it asks an actor for log-probs on
a micro-batch's ``ActionForward`` plan, hands back a loss, and tells it when to step. These are the
single-process implementations; ``scale/fsdp.py`` implements the same interfaces over FSDP2-sharded
modules and several processes, so the step is the same function in both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from posttrain.data.batch import micro_batches
from posttrain.models.critic import ValueModel
from posttrain.models.prefix import ActionForward


class TrainedRole:
    """A module trained by one optimizer with one learning-rate schedule (the actor, the critic)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler

    def dropout_off(self) -> None:
        """Eval mode for the update (gradients still flow): dropout off, so the first update of a
        model with dropout is on-policy (ratio 1 against the sampler's log-probs)."""
        self.module.eval()

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of this process's share of a mini-batch's loss."""
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the accumulated gradients to ``max_norm``; returns the norm before clipping (NaN/inf
        when a gradient is)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # sharded parameters: a DTensor over all ranks
        return float(full() if callable(full) else norm)

    def apply_gradients(self, apply: bool) -> None:
        """One optimizer step with the accumulated gradients when ``apply`` (else they are dropped),
        then zero them."""
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def advance_schedule(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def weights_are_finite(self) -> bool:
        return weights_are_finite(self.module)

    # checkpoints: the same single-process format whatever the number of processes (every rank
    # calls these; a sharded role gathers)
    def full_module(self) -> nn.Module:
        """The module with its full weights, for saving."""
        return self.module

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's full state, as ``torch.optim.Optimizer.state_dict`` gives it."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Load full tensors for some of the module's weights (a LoRA run's trainable ones)."""
        self.module.load_state_dict(weights, strict=False)


class SavedOptimizer:
    """A role's optimizer as checkpoints see it (``state_dict`` / ``load_state_dict``), its state
    gathered up front: saving happens on one rank only, gathering on all of them."""

    def __init__(self, role: TrainedRole, *, gather: bool = True) -> None:
        self.role = role
        self.state = role.optimizer_state() if gather else None

    def state_dict(self) -> dict[str, Any]:
        assert self.state is not None
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.role.load_optimizer_state(state)


class Actor(TrainedRole):
    """The policy being trained."""

    def logprobs(
        self,
        plan: ActionForward,
        *,
        temperature: float,
        with_entropy: bool = False,
        entropy_grad: bool = False,
        keep_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """log pi(token_t | tokens_<t) ``[batch, time]`` of ``plan``'s micro-batch, with gradients
        unless called under ``torch.no_grad``; and the entropy ``[batch, time]`` when asked. With
        ``keep_ids`` ``[batch, time, K]``, pi is truncated to the sampler's kept tokens."""
        return plan.logprobs(
            self.module,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            keep_ids=keep_ids,
        )

    def truncated_logprobs(
        self, plan: ActionForward, *, temperature: float, top_k: int, top_p: float
    ) -> tuple[Tensor, Tensor]:
        """The log-probs ``[batch, time]`` of the top-k / top-p truncated distribution the sampler
        draws from, and its kept ids ``[batch, time, K]`` (no gradients wanted: old log-probs)."""
        return plan.truncated_logprobs(self.module, temperature=temperature, top_k=top_k, top_p=top_p)


class Critic(TrainedRole):
    """The learned value function V(s_t) of PPO."""

    module: ValueModel

    def values(self, plan: ActionForward) -> Tensor:
        """V at every position ``[batch, time]`` of ``plan``'s micro-batch (with gradients unless
        called under ``torch.no_grad``)."""
        return self.module(plan.input_ids, plan.attention_mask, shared=plan.shared)


class Ranks:
    """The processes that share one step: here one. Each row of a mini-batch is trained by exactly
    one rank; every rank runs the same number of micro-batches (collective forwards must match)."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batches(self, attention_mask: Tensor, size: int) -> list[Tensor | None]:
        """This rank's micro-batches (row indices, length-grouped) of a mini-batch whose
        ``attention_mask`` is ``[rows, time]``; None pads a rank that has fewer than another (it runs
        a forward/backward whose loss weighs nothing)."""
        return list(micro_batches(attention_mask, size))

    def sum_metrics(
        self, sums: dict[str, float], counts: dict[str, int]
    ) -> tuple[dict[str, float], dict[str, int]]:
        """Metric sums and counts over all ranks."""
        return sums, counts

    def all_finite(self, finite: bool) -> bool:
        """True when ``finite`` holds on every rank."""
        return finite

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` holds on some rank (e.g. a stop signal, so that all stop together)."""
        return flag

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def place(self, state: Any) -> Any:
        """The run's ``TrainState`` with roles for these ranks (one process: as built)."""
        return state


def weights_are_finite(*modules: nn.Module | None) -> bool:
    """True when every parameter of ``modules`` is finite (None entries are skipped).

    One sum per parameter: NaN or inf anywhere makes it non-finite, at a tenth of the cost of an
    elementwise ``isfinite`` (a sum of finite weights overflowing float32 is itself a broken run).
    """
    sums = [_local(p).detach().sum() for module in modules if module is not None for p in module.parameters()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _local(param: Tensor) -> Tensor:
    """This process's shard of a (possibly sharded, DTensor) parameter."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param
