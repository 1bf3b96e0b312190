"""Early warnings that save a run: settings and signals that mean RL will learn nothing.

Each warning is printed once per run as a ``warning: ...`` line on stderr (as the CLI prints
``error: ...``) and kept in the run folder's ``warnings.txt``; each names the setting that fixes it.

- before any model work: RL at ``rollout.temperature`` 0 (``check_config``);
- before RL: prompts longer than the model's context (``check_context``; a prompt that alone does
  not fit is a ``ConfigError``);
- after each step (``StepWatch``): no group with any reward spread for ``ZERO_SPREAD_STEPS`` steps,
  and a reward function that scored every sample of the first step the same.

Any part of a run may add its own with ``warn_once(key, message)``; ``train`` scopes them to the run
(``run_warnings``), so a key is printed once per run, however often it is raised.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms.presets import AlgorithmPreset
from posttrain.algorithms.registry import ADVANTAGES
from posttrain.data.tasks import Task
from posttrain.rollout.collector import encode_prompt
from posttrain.train.config import ConfigError, TrainConfig
from posttrain.train.step import TrainState

WARNINGS_FILE = "warnings.txt"
# steps in a row without any reward spread before the run is called stuck: a few flat steps are
# normal early on (a hard task), five in a row at the start almost always mean a broken setup
ZERO_SPREAD_STEPS = 5


# ----------------------------------------------------------------------------------------------
# Printing and recording, once per run


def print_warning(message: str) -> None:
    """The one way a run warning is shown: ``warning: <message>`` on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class WarningLog:
    """The warnings of one run: each key is printed once, and written to ``warnings.txt`` once the
    run has a folder (``record_to``)."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.path: Path | None = None

    def warn_once(self, key: str, message: str) -> bool:
        """Print and record ``message`` unless ``key`` was warned about already; True if printed."""
        if key in self.messages:
            return False
        self.messages[key] = message
        print_warning(message)
        self._append(message)
        return True

    def record_to(self, run_dir: Path, *, resume: bool) -> None:
        """Keep this run's warnings (those so far and later ones) in ``run_dir/warnings.txt``;
        a fresh run starts the file empty, a resumed one adds to it."""
        self.path = Path(run_dir) / WARNINGS_FILE
        if not resume:
            self.path.unlink(missing_ok=True)
        for message in self.messages.values():
            self._append(message)

    def _append(self, message: str) -> None:
        if self.path is None:
            return
        line = f"warning: {message}\n"
        # a resumed run does not repeat what an earlier process of the same run wrote
        if self.path.is_file() and line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


_ACTIVE: ContextVar[WarningLog | None] = ContextVar("posttrain_run_warnings", default=None)


@contextmanager
def run_warnings() -> Iterator[WarningLog]:
    """Scope ``warn_once`` to one run (``train`` is decorated with it)."""
    log = WarningLog()
    token = _ACTIVE.set(log)
    try:
        yield log
    finally:
        _ACTIVE.reset(token)


def warn_once(key: str, message: str) -> bool:
    """Warn about ``key`` once in the current run; True if printed. Outside a run (a builder
    called on its own) there is nothing to repeat, so it always prints."""
    log = _ACTIVE.get()
    if log is None:
        print_warning(message)
        return True
    return log.warn_once(key, message)


def record_warnings(run_dir: Path, *, resume: bool) -> None:
    """Keep the current run's warnings in ``run_dir/warnings.txt`` (see ``WarningLog.record_to``)."""
    log = _ACTIVE.get()
    if log is not None:
        log.record_to(run_dir, resume=resume)


# ----------------------------------------------------------------------------------------------
# Settings: before any model work


def uses_group_baseline(preset: AlgorithmPreset) -> bool:
    """True when the preset's advantage compares samples within a group (GRPO, RLOO, ...): its
    estimator takes ``group_ids``. A critic (GAE) or a batch baseline (REINFORCE++) does not."""
    return "group_ids" in inspect.signature(ADVANTAGES.get(preset.advantage)).parameters


def greedy_message(preset: AlgorithmPreset) -> str:
    """Why RL at temperature 0 learns nothing (group baselines) or explores nothing (the rest)."""
    if uses_group_baseline(preset):
        why = (
            "every sample of a prompt is the same greedy completion, so no group has any reward spread "
            f"and {preset.name}'s group advantages are all 0: nothing is learned"
        )
    else:
        why = "rollouts are greedy, so the policy never tries anything but its current best answer"
    return f"rollout.temperature is 0: {why}; set rollout.temperature to about 1.0"


def check_config(cfg: TrainConfig) -> None:
    """Warn about settings that make RL pointless, before the warm-start and the models load."""
    if cfg.rollout.temperature == 0:
        warn_once("temperature", greedy_message(cfg.preset()))


# ----------------------------------------------------------------------------------------------
# Prompts against the model's context: before RL


@dataclass(frozen=True)
class LongestPrompt:
    """The longest tokenized prompt of a task: its split, its text and how many tokens it has."""

    split: str
    text: str
    tokens: int

    def where(self) -> str:
        """``train prompt '12+7=...'``: rows are shuffled and split, so the text finds it, not an index."""
        excerpt = self.text if len(self.text) <= 40 else self.text[:40] + "..."
        return f"{self.split} prompt {excerpt!r}"


def model_context(model: Any) -> int | None:
    """The positions the model was built for (``config.max_position_embeddings``); None if unknown."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def longest_prompt(tokenizer: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> LongestPrompt | None:
    """The longest prompt of the rows of every split, tokenized as the collector encodes it."""
    longest: LongestPrompt | None = None
    for split, rows in splits.items():
        for row in rows:
            prompt = row.get("prompt")
            if not isinstance(prompt, str):
                continue
            tokens = len(encode_prompt(tokenizer, prompt))
            if longest is None or tokens > longest.tokens:
                longest = LongestPrompt(split, prompt, tokens)
    return longest


def context_message(longest: LongestPrompt, max_new_tokens: int, context: int) -> str | None:
    """None when the longest prompt and a full completion fit the model's context; a warning when
    only the completion overflows. Raises ``ConfigError`` when the prompt alone does not fit."""
    fix = "shorten or drop the long prompts, or use a model with a longer context (model.path)"
    if longest.tokens >= context:
        raise ConfigError(
            f"the {longest.where()} is {longest.tokens} tokens, and the model's context is "
            f"{context} positions: no room to answer; {fix}"
        )
    total = longest.tokens + max_new_tokens
    if total <= context:
        return None
    return (
        f"the longest prompt ({longest.where()}, {longest.tokens} tokens) plus data.max_new_tokens "
        f"({max_new_tokens}) is {total} tokens, more than the model's context ({context} positions): "
        f"completions run past the positions the model knows; lower data.max_new_tokens to "
        f"{context - longest.tokens} or less, or {fix}"
    )


def budget_message(context_budget: int, context: int) -> str | None:
    """A multi-turn run's sub-traces hold up to ``env.context_budget`` tokens: warn when that is
    more than the model's context."""
    if context_budget <= context:
        return None
    return (
        f"env.context_budget ({context_budget}) is more than the model's context ({context} positions): "
        f"long sub-traces run past the positions the model knows; set env.context_budget to {context} "
        "or less (compaction keeps episodes going)"
    )


def check_context(state: TrainState, task: Task) -> None:
    """Warn (or fail) when the task's prompts, or its sub-traces, do not fit the policy's context."""
    context = model_context(state.policy)
    if context is None:
        return
    if state.config.uses_env():
        message = budget_message(state.config.env.context_budget, context)
    else:
        longest = longest_prompt(state.tokenizer, {"train": task.train, "test": task.test})
        message = context_message(longest, state.max_new_tokens, context) if longest else None
    if message:
        warn_once("context", message)


# ----------------------------------------------------------------------------------------------
# Step metrics: after each step


def all_groups_flat(metrics: Mapping[str, float]) -> bool:
    """True when every group's rewards were all equal (``zero_variance_groups`` is 1)."""
    return metrics.get("zero_variance_groups") == 1.0


def constant_reward_terms(metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(name, value)`` of each reward function that scored every sample the same, from the
    collector's ``reward/<name>`` (mean) and ``reward_std/<name>`` metrics."""
    constant = []
    for key, spread in metrics.items():
        if not key.startswith("reward_std/"):
            continue
        name = key.removeprefix("reward_std/")
        value = metrics.get(f"reward/{name}")
        # the mean of equal floats can differ from them in the last bit, so the std is not exactly 0
        if value is not None and math.isfinite(value) and spread <= 1e-9 * max(1.0, abs(value)):
            constant.append((name, value))
    return constant


def zero_spread_message(steps: int, last_step: int) -> str:
    span = f"step {last_step}" if steps == 1 else f"steps {last_step - steps + 1}-{last_step}"
    return (
        f"no group had any reward spread for {steps} step{'s' if steps > 1 else ''} ({span}): group "
        "advantages are all 0 and nothing is learned; check the reward function (it may always return "
        "the same value), raise rollout.temperature, or start from a better model (model.path, or a "
        "warm-start: warmstart.steps)"
    )


def constant_term_message(name: str, value: float, samples: int, step: int) -> str:
    return (
        f"reward function {name!r} returned {round(value, 6)!r} for all {samples} samples at step {step}: a reward "
        "that never varies teaches nothing; check it by hand on a few rows (does it read fields your "
        "rows have?) and fix data.reward_fns, or, if it is right, start from a model that sometimes "
        "succeeds (model.path, or a warm-start: warmstart.steps)"
    )


class StepWatch:
    """Watches each step's metrics for a run that cannot learn; each warning once per run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.patience = min(ZERO_SPREAD_STEPS, cfg.optim.steps)  # a shorter run is judged whole
        self.samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        self.group_baseline = uses_group_baseline(cfg.preset())
        self.flat_steps = 0
        # pure distillation (reverse_kl) learns from its teachers, not from the reward
        self.terms_checked = cfg.preset().advantage == "reverse_kl"

    def after_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Check the metrics of ``step`` (the number of steps done)."""
        # only a group baseline turns zero spread into zero advantage; a critic still has values
        if self.group_baseline:
            self.flat_steps = self.flat_steps + 1 if all_groups_flat(metrics) else 0
            if self.flat_steps == self.patience:
                warn_once("zero_spread", zero_spread_message(self.flat_steps, step))
        # the first step only: later, a term may rightly saturate (every answer well formatted)
        if not self.terms_checked:
            self.terms_checked = True
            for name, value in constant_reward_terms(metrics):
                warn_once(f"constant_reward/{name}", constant_term_message(name, value, self.samples, step))
