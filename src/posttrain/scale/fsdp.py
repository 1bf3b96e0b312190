"""Training over several processes: FSDP2-sharded actor and critic, the step's rows split across ranks.

Launch with ``posttrain train --nproc N`` (or ``torchrun --nproc-per-node N -m posttrain.cli train``).
Every rank runs the same ``rl_step``; only its roles differ (``place_on_ranks``):

- the collector (``ShardedCollector``) samples the rank's share of the step's prompts, then every
  rank gathers every episode, so group baselines and batch statistics see the whole step;
- old / reference log-probs and values are computed on the whole batch by every rank alike;
- each rank trains its share of every mini-batch's rows (``DistributedRanks.micro_batches``): the
  aggregation weights span the whole mini-batch and the sharded modules *sum* their gradients over
  ranks, so N ranks take the optimizer step one process would;
- sampling runs on an unsharded copy of the policy on every rank, which receives the full weights
  after every update (``FullCopyEngine``); checkpoints hold those full weights in HF format and the
  full optimizer state, so a run resumes under any number of processes.

Gloo on CPU, NCCL on GPU. ``torch.distributed.fsdp.fully_shard`` (FSDP2) shards each decoder layer
and the root; the older ``FullyShardedDataParallel`` is not used (it crashes gathering a full state
dict with CPU offload on torch 2.13).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from posttrain.data.batch import micro_batches
from posttrain.models.prefix import ActionForward
from posttrain.rollout.collector import Collector, Rollout
from posttrain.rollout.engine import RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.train.roles import Actor, Critic, Ranks, TrainedRole
from posttrain.train.step import TrainState

_FULL = StateDictOptions(full_state_dict=True)


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistributedRanks:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL when this process has a GPU, else gloo."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistributedRanks()


class DistributedRanks(Ranks):
    """The ranks of the default process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def chunks(self, count: int) -> list[Tensor]:
        """``0 .. count - 1`` cut into one contiguous chunk per rank (sizes differ by at most one)."""
        return list(torch.arange(count).tensor_split(self.world_size))

    def micro_batches(self, attention_mask: Tensor, size: int) -> list[Tensor | None]:
        """The rank's contiguous chunk of the mini-batch's rows (a group's samples stay together),
        in length-grouped micro-batches, padded with None to the most any rank has."""
        chunks = self.chunks(int(attention_mask.shape[0]))
        counts = [len(micro_batches(attention_mask[c], size)) if len(c) else 0 for c in chunks]
        mine = chunks[self.rank]
        parts: list[Tensor | None] = (
            [mine[part] for part in micro_batches(attention_mask[mine], size)] if len(mine) else []
        )
        return parts + [None] * (max(counts) - len(parts))

    def sum_metrics(
        self, sums: dict[str, float], counts: dict[str, int]
    ) -> tuple[dict[str, float], dict[str, int]]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (sums, counts))
        total_sums: dict[str, float] = {}
        total_counts: dict[str, int] = {}
        for rank_sums, rank_counts in gathered:
            for key, value in rank_sums.items():
                total_sums[key] = total_sums.get(key, 0.0) + value
            for key, value in rank_counts.items():
                total_counts[key] = total_counts.get(key, 0) + value
        return total_sums, total_counts

    def all_finite(self, finite: bool) -> bool:
        flag = torch.tensor([1 if finite else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def any_rank(self, flag: bool) -> bool:
        return not self.all_finite(not flag)

    def barrier(self) -> None:
        dist.barrier()

    def place(self, state: Any) -> Any:
        return place_on_ranks(state, self)


def shard(module: nn.Module) -> nn.Module:
    """FSDP2 over ``module``: each decoder layer (the classes HF names in ``_no_split_modules``) and
    the root."""
    layer_classes = {
        name for sub in module.modules() for name in getattr(sub, "_no_split_modules", None) or ()
    }
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in layer_classes:
            fully_shard(sub)
    fully_shard(module)
    return module


class ShardedRole(TrainedRole):
    """A trained role over an FSDP2-sharded module; ``full_module()`` is an unsharded copy with the
    current full weights (for sampling and checkpoints)."""

    def __init__(self, role: TrainedRole) -> None:
        self.full_copy = copy.deepcopy(role.module)  # before sharding: plain tensors
        module = shard(role.module)
        # the same optimizer and schedule, over the sharded parameters (built before any step)
        old = role.optimizer
        accepted = inspect.signature(type(old)).parameters
        # torch's fused kernels take plain tensors, not DTensors
        settings = {k: v for k, v in old.defaults.items() if k in accepted and k not in ("fused", "foreach")}
        optimizer = type(old)([p for p in module.parameters() if p.requires_grad], **settings)
        scheduler = None
        if role.scheduler is not None:
            lambdas = getattr(role.scheduler, "lr_lambdas", None)
            if lambdas is None:
                raise ValueError(f"cannot shard a run whose schedule is {type(role.scheduler).__name__}")
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, list(lambdas))
        super().__init__(module, optimizer, scheduler)

    def backward(self, loss: Tensor) -> None:
        # FSDP averages gradients over ranks; the loss weights already span the whole mini-batch,
        # so the rank shares must add up: scale by the world size (gloo has no pre-scaled sum)
        (loss * dist.get_world_size()).backward()

    def full_module(self) -> nn.Module:
        """The unsharded copy, given the current weights (collective: every rank calls it)."""
        self.full_copy.load_state_dict(get_model_state_dict(self.module, options=_FULL))
        return self.full_copy

    def _trainable_names(self) -> list[str]:
        return [name for name, p in self.module.named_parameters() if p.requires_grad]

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state in ``Optimizer.state_dict``'s layout (parameters numbered in
        order), as one process saves it (collective)."""
        full = get_optimizer_state_dict(self.module, self.optimizer, options=_FULL)
        index = {name: i for i, name in enumerate(self._trainable_names())}
        groups = [dict(g, params=[index[name] for name in g["params"]]) for g in full["param_groups"]]
        return {
            "state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": groups,
        }

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a state in ``Optimizer.state_dict``'s layout (from any number of processes)."""
        names = self._trainable_names()
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
        by_name = {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(self.module, self.optimizer, by_name, options=_FULL)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        set_model_state_dict(
            self.module, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )


class ShardedActor(ShardedRole, Actor):
    def logprobs(
        self,
        plan: ActionForward,
        *,
        temperature: float,
        with_entropy: bool = False,
        entropy_grad: bool = False,
        keep_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        # one model call per micro-batch on every rank (prompt sharing would vary the count, and
        # every sharded forward is a collective)
        return super().logprobs(
            plan.unshared(),
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            keep_ids=keep_ids,
        )


class ShardedCritic(ShardedRole, Critic):
    def values(self, plan: ActionForward) -> Tensor:
        return super().values(plan.unshared())


class FullCopyEngine:
    """The HF engine on the actor's unsharded copy; ``sync_weights`` gathers the sharded weights
    into it (collective), so every rank samples from the policy just trained."""

    logprobs_match_policy = True  # the same weights and the same forward as the trainer's

    def __init__(self, actor: ShardedActor, tokenizer: Any) -> None:
        self.actor = actor
        self.engine = HFRolloutEngine(actor.full_copy, tokenizer)

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Any]:
        return self.engine.generate(prompt_ids, params, seed=seed)

    def sync_weights(self, model: nn.Module) -> None:
        self.engine.sync_weights(self.actor.full_module())


class ShardedCollector:
    """Collects this rank's contiguous share of a step's prompts, then gathers every rank's episodes
    in prompt order, renumbered as one process would number them."""

    def __init__(self, collector: Collector, ranks: DistributedRanks) -> None:
        self.collector = collector
        self.ranks = ranks
        self.max_episode_actions = collector.max_episode_actions
        self.max_row_actions = collector.max_row_actions

    def collect(
        self, rows: Sequence[dict[str, Any]], params: SamplingParams, *, group_size: int, seed: int
    ) -> Rollout:
        chunk = self.ranks.chunks(len(rows))[self.ranks.rank]
        mine = [rows[int(i)] for i in chunk]
        local = self.collector.collect(mine, params, group_size=group_size, seed=seed + self.ranks.rank)
        gathered: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, (int(chunk[0]) if len(chunk) else 0, local))
        episodes, samples, metrics = [], [], {}
        generated = 0
        total = sum(len(part.episodes) for _, part in gathered)
        episode_offset = 0
        for first_row, part in gathered:
            for episode in part.episodes:
                for trace in episode.traces:
                    trace.group_id += first_row
                    trace.episode_id += episode_offset
            episode_offset += len(part.episodes)
            episodes.extend(part.episodes)
            samples.extend(part.samples)
            generated += part.generated_tokens
            for key, value in part.metrics.items():  # episode-weighted means; times: the slowest rank
                if key.startswith("time/"):
                    metrics[key] = max(metrics.get(key, 0.0), value)
                elif math.isfinite(value):
                    metrics[key] = metrics.get(key, 0.0) + value * len(part.episodes) / total
        return Rollout(episodes=episodes, metrics=metrics, samples=samples, generated_tokens=generated)


def place_on_ranks(state: TrainState, ranks: DistributedRanks) -> TrainState:
    """``state`` (fresh from ``build_state``) with sharded actor and critic, the full-copy engine
    and the sharded collector. The reference stays a whole frozen copy on every rank (a LoRA
    policy's reference is the sharded policy itself with its adapters off)."""
    actor = ShardedActor(state.actor)
    state.actor = actor
    if state.critic is not None:
        state.critic = ShardedCritic(state.critic)
    engine: RolloutEngine = FullCopyEngine(actor, state.tokenizer)
    state.engine = engine
    collector: Any = state.collector
    collector.engine = engine  # the collector samples through the engine it was built with
    state.collector = ShardedCollector(collector, ranks)
    state.ranks = ranks
    return state
