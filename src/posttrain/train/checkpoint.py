"""Atomic, resumable training checkpoints.

Layout of one checkpoint, ``run_dir/checkpoints/step_000042/``::

    policy/        the policy in Hugging Face format (``save_pretrained``) plus its tokenizer,
                   loadable by ``transformers`` alone
    critic/        the critic (PPO only), via its own ``save_pretrained``
    trainer.pt     optimizer and scheduler state dicts, the trainer state (step, data position,
                   KL controller, ...) and the RNG states (python, numpy, torch CPU, torch CUDA);
                   tensors, numbers, strings and containers only, so it loads with
                   ``torch.load(weights_only=True)``: a crafted file cannot run code
    extra/<name>.safetensors   optional named tensor dicts (e.g. the exact LoRA trainable params)
    COMPLETE       written last; a directory without it is never used

A checkpoint is first written into ``checkpoints/.tmp-step_000042-<random>/``; every file is fsynced,
the ``COMPLETE`` marker is written, and only then is the directory renamed (``os.replace``) to its
final name. A crash at any point therefore leaves either the previous checkpoints untouched plus a
``.tmp-*`` directory (ignored, and removed by the next successful save) or a complete new
checkpoint. ``checkpoints/latest`` names the newest checkpoint and is replaced atomically too.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim import Optimizer

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
COMPLETE_MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"
POLICY_SUBDIR = "policy"
CRITIC_SUBDIR = "critic"
EXTRA_SUBDIR = "extra"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1

_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_EXTRA_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Pretrained(Protocol):
    def save_pretrained(self, save_directory: Any) -> Any: ...


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``: ``step_{step:06d}``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:06d}"


def checkpoint_step(ckpt_dir: Path) -> int | None:
    """Step number encoded in a checkpoint directory name, or None if it is not a ``step_N`` dir."""
    match = _STEP_DIR_RE.match(Path(ckpt_dir).name)
    return int(match.group(1)) if match else None


def is_complete(ckpt_dir: Path) -> bool:
    """True when ``ckpt_dir`` is a finished checkpoint (its ``COMPLETE`` marker exists)."""
    return (Path(ckpt_dir) / COMPLETE_MARKER).is_file()


# ----------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG a training step draws from (python, numpy, torch CPU/CUDA).
    Tensors and plain Python values only (numpy's key array as a tensor), so it needs no pickle."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {
        **numpy_state["state"],
        "key": torch.from_numpy(numpy_state["state"]["key"].copy()),
    }
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only when CUDA is usable."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = dict(state["numpy"])
    key = numpy_state["state"]["key"]
    numpy_state["state"] = {**numpy_state["state"], "key": key.numpy() if torch.is_tensor(key) else key}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint holds CUDA RNG states for {len(cuda_states)} devices, "
                f"this process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# Filesystem helpers


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk; directories cannot be opened on some platforms."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temp file in the same directory and ``os.replace``:
    readers see the old or the new contents, never a part (the one atomic text write of a run)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave an empty temp file behind (e.g. disk full)
        raise
    _fsync_path(path.parent)


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete ``step_N`` checkpoint dirs under ``ckpt_root``, sorted by step."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and is_complete(child):
            found.append((step, child))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Save


def _write_contents(
    tmp_dir: Path,
    step: int,
    *,
    policy: _Pretrained | None,
    tokenizer: _Pretrained | None,
    critic: _Pretrained | None,
    optimizers: Mapping[str, Optimizer],
    schedulers: Mapping[str, _Stateful],
    trainer_state: Mapping[str, Any],
    save_policy: Callable[[Path], None] | None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None,
) -> None:
    policy_dir = tmp_dir / POLICY_SUBDIR
    policy_dir.mkdir()
    if save_policy is not None:
        save_policy(policy_dir)
    elif policy is not None:
        policy.save_pretrained(policy_dir)
    # The tokenizer always sits next to the weights so the folder loads with transformers alone.
    if tokenizer is not None:
        tokenizer.save_pretrained(policy_dir)
    if critic is not None:
        critic.save_pretrained(tmp_dir / CRITIC_SUBDIR)

    payload = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "trainer_state": dict(trainer_state),
        "rng": capture_rng_state(),
    }
    torch.save(payload, tmp_dir / TRAINER_FILE)

    if extra_tensors:
        extra_dir = tmp_dir / EXTRA_SUBDIR
        extra_dir.mkdir()
        for name, tensors in extra_tensors.items():
            if not _EXTRA_NAME_RE.match(name):
                raise ValueError(f"extra tensor group name {name!r} must match {_EXTRA_NAME_RE.pattern}")
            # clone: safetensors refuses tensors that share storage (e.g. tied weights).
            cpu_tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
            save_file(cpu_tensors, str(extra_dir / f"{name}.safetensors"))

    _fsync_tree(tmp_dir)
    (tmp_dir / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync_path(tmp_dir / COMPLETE_MARKER)
    _fsync_path(tmp_dir)


def _move_into_place(tmp_dir: Path, final_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``final_dir``; an existing ``final_dir`` (same step saved twice) is
    moved aside first because ``os.replace`` cannot overwrite a non-empty directory."""
    stale: Path | None = None
    if final_dir.exists():
        stale = final_dir.with_name(f"{TMP_PREFIX}old-{final_dir.name}-{secrets.token_hex(4)}")
        os.replace(final_dir, stale)
    os.replace(tmp_dir, final_dir)
    _fsync_path(final_dir.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def prune_checkpoints(ckpt_root: Path, *, keep_last: int | None, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (``protect`` always survives
    and counts as one of them) and leftover ``.tmp-*`` dirs of crashed saves. Returns deleted dirs."""
    removed: list[Path] = []
    if keep_last is not None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        others = [path for _step, path in reversed(_step_dirs(ckpt_root)) if path != protect]
        budget = keep_last - 1 if protect is not None else keep_last
        for path in others[budget:]:
            shutil.rmtree(path)
            removed.append(path)
    for child in ckpt_root.iterdir():
        if child.name.startswith(TMP_PREFIX):  # a crashed save's folder, or a crashed `latest` write
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    policy: _Pretrained | None,
    tokenizer: _Pretrained | None,
    critic: _Pretrained | None = None,
    optimizers: Mapping[str, Optimizer],
    schedulers: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    keep_last: int | None = 2,
    save_policy: Callable[[Path], None] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_{step:06d}/`` and return its path.

    ``save_policy(policy_dir)``, when given, replaces ``policy.save_pretrained`` (e.g. to merge LoRA
    adapters first); the tokenizer is saved into the same folder either way. ``schedulers`` values
    are anything with ``state_dict``/``load_state_dict`` (LR schedulers, KL controllers, ...).
    ``trainer_state`` must be picklable. ``extra_tensors`` maps a group name to a tensor dict, saved
    as ``extra/<name>.safetensors`` (e.g. ``{"policy_trainable": lora_state_dict}``).
    After the rename, ``checkpoints/latest`` is updated and older checkpoints beyond ``keep_last``
    are deleted (never the new one; ``keep_last=None`` keeps all).
    """
    run_dir = Path(run_dir)
    final_name = checkpoint_name(step)
    ckpt_root = run_dir / CHECKPOINTS_DIR
    tmp_dir = ckpt_root / f"{TMP_PREFIX}{final_name}-{secrets.token_hex(4)}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(ckpt_root, step, error) from error
    try:
        tmp_dir.mkdir()
        _write_contents(
            tmp_dir,
            step,
            policy=policy,
            tokenizer=tokenizer,
            critic=critic,
            optimizers=optimizers,
            schedulers=schedulers,
            trainer_state=trainer_state,
            save_policy=save_policy,
            extra_tensors=extra_tensors,
        )
        final_dir = ckpt_root / final_name
        _move_into_place(tmp_dir, final_dir)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if _is_write_failure(error):
            raise _write_error(ckpt_root, step, error) from error
        raise
    write_text_atomic(ckpt_root / LATEST_FILE, final_name + "\n")
    prune_checkpoints(ckpt_root, keep_last=keep_last, protect=final_dir)
    return final_dir


def _is_write_failure(error: BaseException) -> bool:
    """An OSError (disk full, read-only, quota), torch's RuntimeError for a failed file write, or
    safetensors' I/O error."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(error, RuntimeError) and ("write" in text or "unexpected pos" in text)


def _write_error(ckpt_root: Path, step: int, error: BaseException) -> CheckpointError:
    """One message for a checkpoint that could not be written: where, why, the free space left."""
    try:
        free = f"{shutil.disk_usage(ckpt_root if ckpt_root.exists() else ckpt_root.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointError(
        f"could not write checkpoint step {step} under {ckpt_root} ({free}): {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}; the disk may be full or read-only; "
        "earlier checkpoints are intact and no partial checkpoint was left behind"
    )


# ----------------------------------------------------------------------------------------------
# Load


def checkpoint_problems(ckpt_dir: Path) -> list[str]:
    """What makes a complete-looking checkpoint unusable (empty when it is sound): a missing or
    unreadable policy config, weights or tokenizer, a truncated safetensors file, a damaged
    ``trainer.pt``. Reads headers only, not the weights."""
    ckpt_dir = Path(ckpt_dir)
    problems: list[str] = []
    policy_dir = ckpt_dir / POLICY_SUBDIR
    try:
        json.loads((policy_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{policy_dir / 'config.json'}: {type(error).__name__}: {error}")
    if not any((policy_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append(f"{policy_dir}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    weights = sorted(policy_dir.glob("*.safetensors")) + sorted(policy_dir.glob("*.bin"))
    if not weights:
        problems.append(f"{policy_dir}: no weights (*.safetensors)")
    for path in [*weights, *sorted(ckpt_dir.glob(f"{CRITIC_SUBDIR}/*.safetensors"))]:
        problems += _safetensors_problem(path)
    problems += [
        p
        for path in sorted(ckpt_dir.glob(f"{EXTRA_SUBDIR}/*.safetensors"))
        for p in _safetensors_problem(path)
    ]
    try:
        read_trainer_file(ckpt_dir / TRAINER_FILE)
    except (CheckpointError, OSError) as error:
        problems.append(str(error))
    return problems


def _safetensors_problem(path: Path) -> list[str]:
    if path.suffix != ".safetensors":
        return []
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        return [f"{path}: {type(error).__name__}: {error}"]
    return []


def usable_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest complete checkpoint without problems, and the newer ones skipped, each with its
    problems (so a resume can say which file is damaged and what it fell back to)."""
    skipped: list[tuple[Path, list[str]]] = []
    candidates = [path for _step, path in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS_DIR))]
    newest = latest_checkpoint(run_dir)
    if newest is not None and newest in candidates:  # checkpoints/latest first, then by step
        candidates.remove(newest)
        candidates.insert(0, newest)
    for candidate in candidates:
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate, skipped
        skipped.append((candidate, problems))
    return None, skipped


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint of a run: the one named by ``checkpoints/latest`` if it is
    complete, else the highest-step complete ``step_N`` dir; ``.tmp-*`` dirs are never returned."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    latest_file = ckpt_root / LATEST_FILE
    if latest_file.is_file():
        name = latest_file.read_text(encoding="utf-8").strip()
        candidate = ckpt_root / name
        if _STEP_DIR_RE.match(name) and candidate.is_dir() and is_complete(candidate):
            return candidate
    found = _step_dirs(ckpt_root)
    return found[-1][1] if found else None


def resolve_policy_dir(path: str | Path) -> tuple[Path, Path | None]:
    """Where the policy is, for what a user points at: a run folder (its newest complete checkpoint),
    a checkpoint (its ``policy/``), or any HF model folder. Returns the model folder and, when it
    belongs to a run, the run folder (so evaluation can use the run's task and split)."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"{path} is a run folder without a complete checkpoint")
        path = checkpoint
    if (path / "policy" / "config.json").is_file():
        path = path / "policy"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a model folder (no config.json), a checkpoint (no policy/) or a run folder "
            f"(no {CHECKPOINTS_DIR}/)"
        )
    # runs/<name>/checkpoints/step_N/policy belongs to runs/<name>
    is_run_policy = path.name == "policy" and path.parent.parent.name == CHECKPOINTS_DIR
    return path, path.parent.parent.parent if is_run_policy else None


def _require_complete(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return ckpt_dir


def _check_names(kind: str, saved: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    if set(saved) != set(given):
        raise ValueError(
            f"checkpoint has {kind} {sorted(saved)} but the trainer passed {sorted(given)}; "
            "resume with the same configuration"
        )


def load_trainer_state(
    ckpt_dir: Path,
    *,
    optimizers: Mapping[str, Optimizer],
    schedulers: Mapping[str, Any],
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load optimizer and scheduler states in place, restore the RNGs, return the trainer state.

    The names in ``optimizers``/``schedulers`` must equal those saved. ``trainer.pt`` is read with
    ``weights_only=True``: anything but tensors, numbers, strings and containers (e.g. a crafted
    pickle that would run code) is refused with a ``CheckpointError``.
    """
    ckpt_dir = _require_complete(ckpt_dir)
    payload = read_trainer_file(ckpt_dir / TRAINER_FILE)
    _check_names("optimizers", payload["optimizers"], optimizers)
    _check_names("schedulers", payload["schedulers"], schedulers)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(payload["schedulers"][name])
    if restore_rng:
        restore_rng_state(payload["rng"])
    return dict(payload["trainer_state"])


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, truncated, or not what posttrain writes."""


def read_trainer_file(path: Path) -> dict[str, Any]:
    """``trainer.pt`` as a dict, loaded without executing any pickled code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded "
            f"(a damaged or crafted file; posttrain never writes such objects): {str(error).splitlines()[0]}"
        ) from error
    except (EOFError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{path} is damaged or truncated: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or "trainer_state" not in payload:
        raise CheckpointError(f"{path} is not a posttrain trainer file (no trainer_state)")
    return payload


def load_extra_tensors(
    ckpt_dir: Path, *, device: str | torch.device = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """The ``extra_tensors`` groups saved with a checkpoint (empty dict when none were saved)."""
    extra_dir = _require_complete(ckpt_dir) / EXTRA_SUBDIR
    if not extra_dir.is_dir():
        return {}
    return {
        path.name.removesuffix(".safetensors"): load_file(str(path), device=str(device))
        for path in sorted(extra_dir.glob("*.safetensors"))
    }
