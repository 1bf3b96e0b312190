"""Rollouts on Ray actors: the ``RolloutEngine`` role played by N worker processes.

Each ``RolloutWorker`` actor holds its own copy of the policy and an ``HFRolloutEngine`` over it.
The trainer-side ``RayRolloutEngine`` cuts the prompts of a ``generate`` call into N contiguous
chunks (order kept), one per worker, and ``sync_weights`` broadcasts the trainer's weights: one
``ray.put`` of a CPU state dict that every worker loads (a LoRA policy sends its adapters only; the
workers are peft models with the same adapters). Calls to one actor run in the order they were
submitted, so a ``generate`` submitted after ``sync_weights`` samples from the new weights without
the trainer waiting for the load.

The engine counts its syncs (``version``): the weights a ``generate`` samples from are those of the
version current when it was submitted. ``scale/asynchronous.py`` uses this to bound the staleness of
rollouts prepared in the background.

``run_training_on_ray`` runs ``train.loop.train`` itself in a Ray task (one CPU), beside the workers.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn

from posttrain.models.load import is_peft_model
from posttrain.rollout.engine import Completion, SamplingParams

# local sessions: no dashboard, worker logs stay in Ray's session folder (not on the trainer's stderr)
LOCAL_INIT: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}


class RolloutWorkerError(RuntimeError):
    """A rollout worker died (its process crashed, was killed, or its node was lost)."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: the cluster at ``address``, or a local session with
    ``num_cpus`` logical CPUs (default: this machine's). Inside a Ray task or actor (where
    ``run_training_on_ray`` runs the trainer) the process is connected already."""
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **LOCAL_INIT)


def state_to_send(model: nn.Module, *, full: bool) -> dict[str, torch.Tensor]:
    """The weights a worker needs, detached on the CPU: the whole state dict, or for a peft model
    (unless ``full``) only its trainable tensors (the adapters: a small fraction of the model)."""
    if is_peft_model(model) and not full:
        return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().cpu() for name, t in model.state_dict().items()}


def chunk_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` spans cutting ``count`` items into at most ``parts`` non-empty
    chunks whose sizes differ by at most one (the first ones take the remainder)."""
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def chunk_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of chunk ``index``: chunk 0 keeps ``seed`` (so one worker samples exactly
    what the in-process engine does); the others get a 63-bit hash of (seed, index), which no
    neighbouring step's seed reproduces (``seed + index`` would be step ``seed + 1``'s chunk 0)."""
    if seed is None or index == 0:
        return seed
    return random.Random(f"posttrain-chunk/{seed}/{index}").getrandbits(63)


@ray.remote
class RolloutWorker:
    """One rollout process: a copy of the policy and an ``HFRolloutEngine`` sampling from it.

    The network comes from ``model_path`` (an HF folder readable by this worker), or, when None,
    from ``model_config`` with weights that arrive at the first ``load_weights``. ``lora`` (a peft
    ``LoraConfig``) wraps it with the trainer's adapters, so syncs send the adapters only.
    """

    def __init__(
        self,
        index: int,
        tokenizer: Any,
        *,
        model_path: str | None = None,
        model_config: Any = None,
        generation_config: Any = None,
        lora: Any = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        num_threads: int = 1,
    ) -> None:
        from transformers import AutoModelForCausalLM

        from posttrain.rollout.hf import HFRolloutEngine

        torch.set_num_threads(num_threads)  # workers share the machine's cores with the trainer
        self.index = index
        if model_path is not None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        if generation_config is not None:
            model.generation_config = generation_config
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        model.eval().requires_grad_(False)
        self.model = model
        self.engine = HFRolloutEngine(model, tokenizer, batch_size=batch_size)
        self.version = -1  # no trainer weights yet

    def ready(self) -> int:
        return self.index

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Copy ``state`` (a full state dict, or a peft model's adapters) into the network."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"rollout worker {self.index}: unknown weights {sorted(unexpected)[:5]}")
        if missing and not is_peft_model(self.model):
            raise ValueError(f"rollout worker {self.index}: missing weights {sorted(missing)[:5]}")
        self.version = version
        return version

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | None
    ) -> list[Completion]:
        return self.engine.generate(prompt_ids, params, seed=seed)

    def loaded_version(self) -> int:
        return self.version


@dataclass
class Submitted:
    """A ``generate`` in flight: the version of the weights it samples from, and per chunk the
    worker index and the result's object ref."""

    version: int
    parts: list[tuple[int, Any]]
    loads: list[tuple[int, Any]] = field(default_factory=list)  # weight loads queued before it


@dataclass
class VersionRecord:
    """What ``RayRolloutEngine.recording`` collects in one thread: the version of every generate
    submitted there, and an event set at the first submission."""

    versions: list[int] = field(default_factory=list)
    submitted: threading.Event = field(default_factory=threading.Event)


class RayRolloutEngine:
    """``RolloutEngine`` over N ``RolloutWorker`` actors; thread-safe (a background collection
    may generate while the trainer syncs).

    ``logprobs_match_policy`` is True while rollouts are synchronous: every worker runs the
    in-process engine's forward (``HFRolloutEngine``, whose log-probs already serve as old log-probs)
    on a bit-exact copy of the trainer's weights, loaded before any later ``generate`` runs (actor
    calls keep their submission order), so the behaviour log-probs equal the trainer's to float
    tolerance (tested at 1e-5). Several workers batch the prompts differently from the trainer's
    micro-batches, which changes padding only, as the in-process engine's own batches do. The
    asynchronous collector sets it to False: its rollouts may come from older weights.
    """

    def __init__(self, workers: Sequence[Any], *, peft: bool = False, full_first_sync: bool = True) -> None:
        if not workers:
            raise ValueError("a RayRolloutEngine needs at least one worker")
        self.workers = list(workers)
        self.logprobs_match_policy = True
        self.version = 0  # syncs so far; the workers hold version-0 weights until the first
        self.peft = peft
        self._full_next = full_first_sync or not peft  # the first sync of a config-built worker is whole
        self._lock = threading.Lock()
        self._local = threading.local()
        self._loads: list[tuple[int, Any]] = []
        self._weights_ref: Any = None

    # ---------------------------------------------------------------- RolloutEngine

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order: worker i samples the i-th contiguous chunk with
        ``chunk_seed(seed, i)``."""
        return self.gather(self.submit(prompt_ids, params, seed=seed))

    def sync_weights(self, model: nn.Module) -> None:
        """Queue ``model``'s current weights on every worker (one ``ray.put``), without waiting for
        the load: the workers' next ``generate`` runs after it. Bumps ``version``."""
        with self._lock:
            self._check_loads(block=False)
            state = state_to_send(model, full=self._full_next)
            self._full_next = False
            self._weights_ref = ray.put(state)  # kept until the next sync: one copy in the object store
            self.version += 1
            self._loads += [
                (index, worker.load_weights.remote(self._weights_ref, self.version))
                for index, worker in enumerate(self.workers)
            ]

    # ---------------------------------------------------------------- the parts

    def submit(self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None) -> Submitted:
        """Start a ``generate`` on the workers; ``gather`` waits for it."""
        if not self.workers:
            raise RuntimeError("this Ray rollout engine is closed: its workers were killed")
        with self._lock:
            parts = [
                (
                    index,
                    self.workers[index].generate.remote(
                        prompt_ids[start:end], params, chunk_seed(seed, index)
                    ),
                )
                for index, (start, end) in enumerate(chunk_bounds(len(prompt_ids), len(self.workers)))
            ]
            submitted = Submitted(self.version, parts, list(self._loads))
        record: VersionRecord | None = getattr(self._local, "record", None)
        if record is not None:
            record.versions.append(submitted.version)
            record.submitted.set()
        return submitted

    def gather(self, submitted: Submitted) -> list[Completion]:
        for index, ref in submitted.loads:  # done before the generate on each actor: no extra wait
            self._get(index, ref, "loading weights")
        completions: list[Completion] = []
        for index, ref in submitted.parts:
            completions.extend(self._get(index, ref, "generating"))
        return completions

    @contextmanager
    def recording(self, record: VersionRecord | None = None) -> Iterator[VersionRecord]:
        """Record into ``record`` (a new one by default) the versions of the generates this thread
        submits inside the block."""
        record = VersionRecord() if record is None else record
        self._local.record = record
        try:
            yield record
        finally:
            self._local.record = None

    def wait_synced(self) -> None:
        """Block until every queued weight load has finished (raising a worker's error)."""
        with self._lock:
            self._check_loads(block=True)

    def loaded_versions(self) -> list[int]:
        return [self._get(i, w.loaded_version.remote(), "reporting") for i, w in enumerate(self.workers)]

    def close(self) -> None:
        """Kill the workers (their processes and copies of the model)."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def _check_loads(self, *, block: bool) -> None:
        """Raise the error of a finished load; keep the unfinished ones (caller holds the lock)."""
        if not self._loads:
            return
        refs = [ref for _, ref in self._loads]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        ready_set = set(ready)
        for index, ref in self._loads:
            if ref in ready_set:
                self._get(index, ref, "loading weights")
        self._loads = [(i, ref) for i, ref in self._loads if ref not in ready_set]

    def _get(self, index: int, ref: Any, doing: str) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as error:
            actor = self.workers[index]._actor_id.hex() if index < len(self.workers) else "?"
            raise RolloutWorkerError(
                f"rollout worker {index} of {len(self.workers)} (Ray actor {actor}) died while {doing}: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from error


def ray_engine(
    policy: nn.Module,
    tokenizer: Any,
    model_path: str | Path | None,
    *,
    num_workers: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_worker: float = 1,
    threads_per_worker: int = 1,
    batch_size: int = 64,
) -> RayRolloutEngine:
    """``num_workers`` rollout actors sampling from ``policy``'s weights, already synced.

    Connects to the Ray cluster at ``address``, or starts a local session (``num_cpus`` logical CPUs)
    when none is running. Each worker builds the network from ``model_path`` (a folder it can read;
    the policy's starting weights), or, when None, from the policy's config, all weights then coming
    with the first sync. A peft policy gives the workers its adapters' config, and later syncs send
    the adapters only.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    ensure_ray(address, num_cpus=num_cpus)
    if address is None:  # a local session cannot grow: fail now rather than wait for CPUs forever
        total = ray.cluster_resources().get("CPU", 0)
        held = _cpus_held_here()
        if total < num_workers * cpus_per_worker + held:
            raise ValueError(
                f"{num_workers} rollout workers of {cpus_per_worker:g} CPU each do not fit the local Ray "
                f"session's {total:g} CPUs" + (f", {held:g} of them held by the trainer" if held else "")
            )
    peft = is_peft_model(policy)
    base: Any = policy.get_base_model() if peft else policy  # type: ignore[operator]
    lora = policy.peft_config["default"] if peft else None  # type: ignore[index]
    options: dict[str, Any] = {
        "model_path": str(model_path) if model_path is not None else None,
        "model_config": base.config if model_path is None else None,
        "generation_config": getattr(base, "generation_config", None),
        "lora": lora,
        "dtype": next(policy.parameters()).dtype,
        "batch_size": batch_size,
        "num_threads": threads_per_worker,
    }
    workers = [
        RolloutWorker.options(num_cpus=cpus_per_worker).remote(index, tokenizer, **options)  # type: ignore[attr-defined]
        for index in range(num_workers)
    ]
    # a worker built from the folder holds the starting weights: a LoRA policy's first sync sends adapters only
    engine = RayRolloutEngine(workers, peft=peft, full_first_sync=model_path is None)
    for index, worker in enumerate(workers):
        engine._get(index, worker.ready.remote(), "starting")
    engine.sync_weights(policy)
    engine.wait_synced()
    return engine


def _cpus_held_here() -> float:
    """The CPUs this process's Ray task holds (the trainer's, under ``run_training_on_ray``); 0 in
    the driver."""
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return 0.0
    return float(context.get_assigned_resources().get("CPU", 0))


def _train_in_ray(config: Any, cwd: str, train_kwargs: dict[str, Any]) -> Any:
    from posttrain.train.loop import train

    if os.path.isdir(cwd):  # relative paths of the config mean the caller's folder (same machine)
        os.chdir(cwd)
    return train(config, **train_kwargs)


def run_training_on_ray(
    config: Any, *, address: str | None = None, num_cpus: int | None = None, **train_kwargs: Any
) -> Any:
    """``train.loop.train(config, **train_kwargs)`` run in a Ray task with one CPU; returns its
    ``TrainResult``. The rollout workers the run creates are the other actors of the session."""
    ensure_ray(address, num_cpus=num_cpus)
    task = ray.remote(num_cpus=1, max_retries=0)(_train_in_ray)
    return ray.get(task.remote(config, os.getcwd(), train_kwargs))
