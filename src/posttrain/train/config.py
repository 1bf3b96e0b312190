"""TrainConfig: every setting of a run, validated before any work starts.

Configs are YAML files and ``--set key.sub=value`` overrides; an unknown key or a bad value fails
with a message naming the key and the allowed values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from posttrain.algorithms.presets import PRESETS, AlgorithmPreset, get_preset
from posttrain.plugins import spec_of
from posttrain.train.config_distill import DistillConfig
from posttrain.train.config_input import (
    ConfigError,
    format_validation_error,
    merge_trees,
    parse_overrides,
    read_yaml_file,
)
from posttrain.train.config_scale import RolloutCorrectionConfig, ScaleConfig
from posttrain.train.hyperparameters import check_hyperparameters


class Section(BaseModel):
    # every float setting is a finite number: an inf learning rate or a NaN weight would only show
    # up as NaN weights after the run started
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunSettings(Section):
    name: str = Field(
        "demo",
        description="the run's folder inside output_dir: one folder name (no '/', '..' or leading '.')",
    )
    output_dir: str = "runs"
    seed: int = 0
    num_threads: int = Field(1, ge=0, description="torch threads; 0 = torch's default")

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        """The run folder is ``output_dir/name`` and ``--overwrite`` deletes it: a name that is a path
        (absolute, with separators or ``..``) would reach outside ``output_dir``, and a leading dot
        names hidden folders such as ``output_dir/.cache`` (the embedded models)."""
        if not value.strip() or "/" in value or "\\" in value or "\0" in value or value.startswith("."):
            raise ValueError(
                f"{value!r} must be one folder name inside run.output_dir: not empty, no '/' or "
                "'\\', not starting with '.' (so no '..' or absolute path); put the folder in run.output_dir"
            )
        return value


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, description="must be 0: RL trains with dropout off")
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError(
                f"got {value}; RL trains with dropout off, so the first update of every step is "
                "on-policy (ratio 1 against the sampler's log-probs): remove model.lora.dropout"
            )
        return value


class ModelConfig(Section):
    """The policy to train (and the critic's start): a local folder, a Hub model, or the embedded tiny one."""

    # declared before the paths: their check reads it
    hub: bool = Field(
        False,
        description="true: path / critic_path may name a Hugging Face Hub model, downloaded unless cached; "
        "false: local folders only, nothing is asked of the Hub",
    )
    path: str | None = Field(
        None,
        description="HF causal LM folder (config.json, weights, tokenizer), or a Hub name with hub: true; "
        "None = the embedded tiny model",
    )
    lora: LoraConfig | None = Field(None, description="low-rank adapters; None = full fine-tune")
    critic_path: str | None = Field(None, description="critic init; None = initialise from the policy")
    tiny_hidden_size: int = Field(128, ge=1, description="the embedded tiny model's width (path unset)")
    tiny_layers: int = Field(4, ge=1, description="the embedded tiny model's depth (path unset)")
    tiny_tokenizer: Literal["bpe", "char"] = Field(
        "bpe",
        description="the embedded tiny model's tokenizer (path unset), trained on the task's prompts, "
        "solutions and answers: bpe = up to 512 tokens, every digit and punctuation mark its own token, "
        "frequent letter runs merged into word pieces; char = one token per character, which short string "
        "tasks (reversing, spelling, counting letters) need",
    )

    @field_validator("path", "critic_path")
    @classmethod
    def _loadable_folder(cls, value: str | None, info: Any) -> str | None:
        """A folder that does not exist (or lacks weights or a tokenizer) fails here, at config load,
        not after minutes of set-up or seconds of Hub requests."""
        if value is not None:
            from posttrain.models.load import check_model_folder  # heavy imports, only when needed

            check_model_folder(value, hub=info.data.get("hub", False), tokenizer=info.field_name == "path")
        return value


class RewardFnConfig(Section):
    fn: str | Callable[..., Any] = Field(
        description="a built-in name, 'package.module:function', 'path/to/file.py:function', "
        "or (from Python) the function itself: (prompt, completion, **row) -> float"
    )
    weight: float = 1.0

    @field_validator("fn")
    @classmethod
    def _known_builtin(cls, fn: str | Callable[..., Any]) -> str | Callable[..., Any]:
        """A name without ':' must be a built-in reward: checked now, as it imports nothing (an import
        path is imported, and checked, when the run builds its task)."""
        if isinstance(fn, str) and ":" not in fn:
            from posttrain.rewards.functions import resolve_reward_fn

            resolve_reward_fn(fn)  # a RewardSpecError (a ValueError) listing the built-in names
        return fn

    @field_serializer("fn")
    def _fn_as_spec(self, fn: str | Callable[..., Any]) -> str:
        # a saved config names a callable by import path, so the run can be resumed and evaluated
        return fn if isinstance(fn, str) else spec_of(fn)


def _changed(section: BaseModel, name: str) -> bool:
    """True when ``section.name`` differs from its default (a saved config repeats every default,
    so this, not "was it written", tells a setting the user changed)."""
    return getattr(section, name) != type(section).model_fields[name].default


class DataConfig(Section):
    """The rows to train and test on: a built-in task, or your dataset with its reward functions."""

    task: str | None = Field(
        "arithmetic",
        description="built-in task; a dataset given by `path` replaces it (task then reads null)",
    )
    task_options: dict[str, Any] = Field(default_factory=dict, description="the built-in task's settings")
    path: str | None = Field(
        None,
        description="your dataset: a JSONL / JSON / Parquet / CSV file or a saved HF dataset folder, one "
        "row per prompt; every row is used unless num_train / num_test limit them",
    )
    test_path: str | None = Field(
        None,
        description="the test split from a file (path only); None = hold out test_fraction of path's rows",
    )
    test_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="share of path's rows held out as the test split, never trained on (seeded by run.seed); "
        "used without test_path and num_test",
    )
    prompt_field: str = Field("prompt", description="the field holding a row's prompt (path only)")
    solution_field: str = Field(
        "solution",
        description="the field holding a row's demonstration, the ideal completion the embedded model's "
        "warm-start imitates (path only); rows without it are not imitated",
    )
    demonstrations_path: str | None = Field(
        None,
        description="the warm-start's demonstrations from a file of their own (rows with prompt_field and "
        "solution_field; path only); RL then trains on every training row",
    )
    num_train: int | None = Field(
        None,
        ge=1,
        description="training rows (warm-start and RL together); None = every row of path left after the "
        "test split, or the built-in task's default (680)",
    )
    num_test: int | None = Field(
        None,
        ge=1,
        description="test rows; None = every row of test_path, test_fraction of path's rows, or the "
        "built-in task's default (200)",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="None = the task's default")
    reward_fns: list[RewardFnConfig] = Field(default_factory=list, description="empty = task default")
    reward_timeout_s: float | None = Field(
        60.0,
        gt=0.0,
        description="seconds one reward call may take (a batched function: one batch) before the run "
        "stops naming the function and sample; None = no limit",
    )

    @model_validator(mode="after")
    def _dataset_settings_act(self) -> DataConfig:
        """A dataset replaces the built-in task (so a saved config names only what was used), and
        settings of a dataset's split are refused where they would be ignored."""
        if self.path is not None and self.task is not None:
            if "task" in self.model_fields_set:
                raise ValueError(
                    f"data.task ({self.task!r}) and data.path are both set: a dataset given by data.path "
                    "replaces the built-in task; drop data.task (or data.path)"
                )
            self.task = None
        if self.path is None:
            stray = [name for name in ("test_path", "demonstrations_path") if getattr(self, name) is not None]
            stray += [n for n in ("test_fraction", "prompt_field", "solution_field") if _changed(self, n)]
            if stray:
                raise ValueError(
                    f"data.{stray[0]} applies to a dataset given by data.path, but the run uses the built-in "
                    f"task {self.task!r}; set data.path or drop data.{stray[0]}"
                )
        if _changed(self, "test_fraction") and (self.test_path is not None or self.num_test is not None):
            other = "data.test_path" if self.test_path is not None else "data.num_test"
            raise ValueError(f"data.test_fraction and {other} both size the test split; set only one of them")
        self._check_builtin_task()
        return self

    def _check_builtin_task(self) -> None:
        """The built-in task and its options exist (a misspelt name fails here, not when the run
        builds its rows); a dataset has no task options to give."""
        if self.path is not None:
            if self.task_options:
                raise ValueError(
                    "data.task_options applies to a built-in task, but data.path gives a dataset; drop "
                    "data.task_options"
                )
            return
        if self.task is None:  # neither a task nor a dataset: the whole config's check says so
            return
        from posttrain.data.tasks import available_tasks, get_task

        # the run passes these to get_task itself: as task options they would clash at build time
        owned = {
            "name": "data.task",
            "seed": "run.seed",
            "num_train": "data.num_train",
            "num_test": "data.num_test",
        }
        clash = sorted(set(owned) & set(self.task_options))
        if clash:
            raise ValueError(
                f"data.task_options.{clash[0]} is not a task option; set {owned[clash[0]]} instead"
            )
        try:
            get_task(self.task, num_train=0, num_test=0, **self.task_options)  # no rows: instant
        except (ValueError, TypeError) as error:
            key = "data.task_options" if self.task in available_tasks() else "data.task"
            raise ValueError(f"{key}: {error}") from None


class RolloutConfig(Section):
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(8, ge=1, description="completions per prompt")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="completions per step (TRL's generation batch size); when set, "
        "prompts_per_step = batch_size / group_size",
    )
    temperature: float = Field(
        1.0,
        ge=0.0,
        description="sampling temperature; 0 = greedy, warned about: no exploration, group advantages all 0",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings ending a completion (or a turn, besides the environment's own)",
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers generate on the policy itself; vllm: a vLLM engine (pip install "
        "posttrain[vllm], or scripts/vllm_venv.sh on CPU) that receives the weights after every update",
    )
    keep_sampling_mask: bool = Field(
        False,
        description="train on the distribution the sampler drew from: the tokens top_k / top_p kept for "
        "each prediction are found from the old policy's logits, and old and new log-probs are both "
        "renormalised over them (DeepSeek-V3.2's keep sampling mask); needs top_k or top_p",
    )
    reuse_logprobs: bool = Field(
        True,
        description="use the engine's log-probs as old_logprobs when they match the training forward "
        "on the current weights to float tolerance (the HF engine reads them from its sampling "
        "logits); False recomputes them with one more forward pass",
    )


class GuardRuleConfig(Section):
    """One guard rule: a regex over a tool call's argument values."""

    name: str
    pattern: str = Field(
        description="regular expression searched (case-insensitive) in the call's argument values"
    )
    action: Literal["deny", "suspect"] = Field(
        "deny",
        description="deny: the call never runs; suspect: the judge decides (see guard.suspect_without_judge)",
    )
    tools: list[str] = Field(
        default_factory=list, description="tool names (globs) the rule applies to; empty = all"
    )

    @field_validator("pattern")
    @classmethod
    def _a_regex(cls, pattern: str) -> str:
        """Named by its key here; the guard would only name the rule, and only once it is built."""
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as error:
            raise ValueError(
                f"{pattern!r} is not a regular expression ({error}); escape a literal ( [ . * + ? with \\"
            ) from None
        return pattern


class JudgeConfig(Section):
    """The guard's judge, asked only about calls a rule marked suspect."""

    kind: Literal["callable", "hf", "http"] = Field(
        description="callable: your function 'module:fn' or 'file.py:fn' (JudgeQuery -> JudgeVerdict | bool | "
        "(bool, reason)); hf: a local HF chat model; http: an OpenAI-compatible endpoint"
    )
    fn: str | None = Field(None, description="kind callable: 'package.module:fn' or 'path/file.py:fn'")
    model_path: str | None = Field(None, description="kind hf: a local model folder")
    url: str | None = Field(None, description="kind http: the API base, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="kind http: the model name sent with each request")
    api_key_env: str | None = Field(None, description="kind http: environment variable holding the API key")
    timeout_s: float = Field(10.0, gt=0.0, description="kind http: seconds per request")
    max_new_tokens: int = Field(16, ge=1, description="kind hf/http: length of the judge's reply")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> JudgeConfig:
        needed = {"callable": ("fn",), "hf": ("model_path",), "http": ("url", "model")}[self.kind]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"env.guard.judge.{missing[0]} is required for judge kind {self.kind!r}")
        unused = {"fn", "model_path", "url", "model", "api_key_env"} - set(needed)
        if self.kind == "http":
            unused.discard("api_key_env")
        stray = sorted(name for name in unused if getattr(self, name) is not None)
        if stray:
            raise ValueError(f"env.guard.judge.{stray[0]} is not used by judge kind {self.kind!r}; drop it")
        return self


class GuardConfig(Section):
    """The reward-hacking guard on tool calls: rules, then a judge for suspect calls, decoys for denied ones."""

    default_rules: bool = Field(
        True,
        description="use the built-in rules (network fetches, hidden answers/graders, searching for them: deny; "
        "test files, paths outside the working area: suspect)",
    )
    rules: list[GuardRuleConfig] = Field(
        default_factory=list, description="your rules, checked with the defaults"
    )
    judge: JudgeConfig | None = Field(None, description="None = no judge")
    suspect_without_judge: Literal["deny", "allow"] = Field(
        "deny", description="what happens to a suspect call when there is no judge"
    )
    decoy: Literal["not_found", "empty", "error", "text"] = Field(
        "not_found",
        description="what a denied call shows: a plausible 'no such file', an empty result, a generic error, "
        "or decoy_text",
    )
    decoy_text: str | None = Field(None, description="the observation of a denied call, with decoy: text")
    penalty: float = Field(
        0.0,
        ge=0.0,
        description="subtracted from the reward of a turn whose call was denied",
    )
    enforce: bool = Field(
        True, description="false = audit only: verdicts are logged and counted but every call runs"
    )

    def build(self) -> Any:
        """The ``posttrain.envs.guard.Guard`` these settings describe (a model judge loads lazily)."""
        from posttrain.envs.guard import DEFAULT_RULES, Guard, GuardRule

        rules = [GuardRule(r.name, r.pattern, r.action, tuple(r.tools)) for r in self.rules]
        if self.default_rules:
            rules += list(DEFAULT_RULES)
        if not rules:
            raise ValueError(
                "env.guard has no rules: set env.guard.default_rules: true or add env.guard.rules"
            )
        return Guard(
            rules,
            judge=self.judge and _build_judge(self.judge),
            suspect_without_judge=self.suspect_without_judge,
            decoy=self.decoy,
            decoy_text=self.decoy_text,
            penalty=self.penalty,
            enforce=self.enforce,
        )


def _build_judge(judge: JudgeConfig) -> Any:
    from posttrain.envs.guard import ModelJudge

    if judge.kind == "callable":
        from posttrain.plugins import load_from_spec

        _, fn = load_from_spec(
            str(judge.fn),
            kind="env.guard.judge.fn",
            error=ValueError,
            hint="give 'package.module:function' or 'path/to/file.py:function'",
        )
        if not callable(fn):
            raise ValueError(f"env.guard.judge.fn: {judge.fn!r} is a {type(fn).__name__}, not a callable")
        return fn
    from posttrain.rewards.judge import HTTPChatClient, LocalHFChatClient

    if judge.kind == "hf":
        return ModelJudge(LocalHFChatClient(judge.model_path, max_new_tokens=judge.max_new_tokens))
    assert judge.url is not None and judge.model is not None
    return ModelJudge(
        HTTPChatClient(
            judge.url,
            judge.model,
            timeout_s=judge.timeout_s,
            api_key_env=judge.api_key_env,
            max_tokens=judge.max_new_tokens,
        )
    )


class EnvConfig(Section):
    """Multi-turn agent tasks: the environment and the limits of its episodes."""

    name: str | None = Field(
        None,
        description="built-in environment (key_chain) or 'module:Class' / 'path/file.py:Class' (a TextEnv); "
        "None = the task's own environment if it has one, else the task is single-turn",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the environment")
    max_turns: int = Field(64, ge=1, description="turns per episode; more ends it as truncated")
    max_episode_tokens: int = Field(1024, ge=1, description="policy-written tokens per episode, all turns")
    max_tool_output_tokens: int = Field(32, ge=1, description="longer observations are cut, with a marker")
    context_budget: int = Field(
        160,
        ge=8,
        description="tokens one sub-trace may hold; when the next observation and turn would not fit, "
        "the context is compacted into a new sub-trace",
    )
    compaction: Literal["rule", "policy", "none"] = Field(
        "rule",
        description="rule: restart from the task, the environment's summary and the last keep_turns turns; "
        "policy: the same with a summary the policy writes when asked (trainable actions); "
        "none: end the episode (truncated) when its context is full",
    )
    keep_turns: int = Field(1, ge=0, description="turns kept verbatim after a rule compaction")
    guard: GuardConfig | None = Field(
        None,
        description="the reward-hacking guard on tool calls (see docs/agents.md); None = calls run unchecked",
    )


class AlgorithmOverrides(Section):
    """Any field left None keeps the preset's value."""

    advantage: str | None = None
    advantage_kwargs: dict[str, Any] | None = None
    policy_loss: str | None = None
    loss_kwargs: dict[str, Any] | None = None
    kl_estimator: str | None = None
    kl_placement: Literal["reward", "loss", "none"] | None = None
    kl_coef: float | None = Field(None, ge=0.0)
    kl_importance_ratio: bool | None = Field(
        None, description="weight the KL in the loss by sg(pi_theta / pi_old), unbiased off-policy"
    )
    aggregation: str | None = None
    dynamic_sampling: bool | None = None
    overlong_shaping: bool | None = None
    rollout_correction: RolloutCorrectionConfig | None = Field(
        None,
        description="importance weights / masks for the sampler/trainer mismatch and stale rollouts; "
        "None = off (docs/scaling.md)",
    )


class OptimConfig(Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0.0, description="1e-4 suits the embedded 1M-parameter model; ~1e-6 for LLMs")
    critic_lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up from 0")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="after warm-up: decay to 0 at the last step (linear or cosine), or hold"
    )
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")
    num_mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch")
    micro_batch_size: int = Field(
        64,
        ge=1,
        description="rows per forward/backward (accumulated); rows of similar length go together",
    )
    share_prompts: bool = Field(
        True,
        description="rows of a micro-batch that start with the same prompt (a group's samples) run it "
        "through the model once, sharing its KV cache (same values and gradients to float "
        "tolerance); false runs every row in full",
    )
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        description="an update whose loss or gradient is NaN/inf is skipped (logged as skipped_updates); "
        "this many RL steps in a row with every update skipped stop the run",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    entropy_coef: float = Field(0.0, ge=0.0)
    vf_coef: float = Field(0.5, ge=0.0)
    cliprange_value: float | None = Field(0.2, gt=0.0)
    critic_warmup_steps: int = Field(0, ge=0)
    adaptive_kl_target: float | None = Field(None, gt=0.0, description="None = fixed KL coefficient")
    overlong_buffer: int = Field(4, ge=1)


class WarmStartConfig(Section):
    """Supervised warm-start on the task's solutions (used for the embedded tiny model)."""

    steps: int = Field(1500, ge=0, description="0 = no warm-start; ignored when model.path is set")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW's decoupled weight decay")
    batch_size: int = Field(64, ge=1)
    flawed_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description=(
            "share of demonstrations taken from a row's `flawed_solution` when it has one (arithmetic: "
            "a negative answer without its minus sign), so the warm-started model has a systematic error for RL to fix; "
            "0 = imitate only correct solutions"
        ),
    )
    rows: Literal["split", "all"] | None = Field(
        None,
        description="the training rows the warm-start imitates. split: a share split_fraction of the rows "
        "with a demonstration, and RL trains on the other rows, so RL learns on prompts the warm-start never "
        "saw; all: every row with a demonstration, the same rows RL then trains on (it may memorise them); "
        "None = split for a dataset (data.path), all for the built-in tasks (their demo's numbers). "
        "A data.demonstrations_path file is a split of its own",
    )
    split_fraction: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="with rows: split, the warm-start's share of the rows with a demonstration",
    )


class EvalConfig(Section):
    every: int = Field(10, ge=0, description="evaluate every N steps; 0 = only at start and end")
    num_prompts: int = Field(200, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")


class LoggingConfig(Section):
    tensorboard: bool = True
    progress: bool = True
    checkpoint_every: int = Field(0, ge=0, description="0 = only the final checkpoint")
    keep_last: int = Field(2, ge=1)
    num_samples: int = Field(8, ge=0, description="samples per step written to samples.jsonl")


class TrainConfig(Section):
    algorithm: str = "grpo"
    run: RunSettings = RunSettings()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    env: EnvConfig = EnvConfig()
    algo: AlgorithmOverrides = AlgorithmOverrides()
    optim: OptimConfig = OptimConfig()
    warmstart: WarmStartConfig = WarmStartConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    distill: DistillConfig = DistillConfig()
    scale: ScaleConfig = ScaleConfig()

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown algorithm {value!r}; allowed: {sorted(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.data.path is None and self.data.task is None:
            raise ValueError("set data.task (a built-in task) or data.path (your dataset)")
        preset = self.preset()  # raises on unknown registry names
        from posttrain.algorithms import registry

        checks = [
            (registry.ADVANTAGES, preset.advantage, "algo.advantage"),
            (registry.POLICY_LOSSES, preset.policy_loss, "algo.policy_loss"),
            (registry.KL_ESTIMATORS, preset.kl_estimator, "algo.kl_estimator"),
            (registry.AGGREGATIONS, preset.aggregation, "algo.aggregation"),
        ]
        for reg, name, key in checks:
            if name not in reg:
                raise ValueError(f"{key}: unknown {reg.kind} {name!r}; allowed: {reg.names()}")
        check_hyperparameters(preset)  # not at the first RL step, after the model load and first eval
        self._check_kl_acts(preset)
        if preset.kl_importance_ratio and preset.kl_placement != "loss":
            raise ValueError(
                f"algo.kl_importance_ratio weights the KL in the loss, but {self.algorithm!r} places it "
                f"in {preset.kl_placement!r}; also set algo.kl_placement=loss"
            )
        if preset.uses_critic and self.optim.critic_warmup_steps >= self.optim.steps:
            raise ValueError(
                f"optim.critic_warmup_steps ({self.optim.critic_warmup_steps}) must be below optim.steps "
                f"({self.optim.steps}), or the policy never trains"
            )
        self._check_distill(preset)
        # the teacher's per-token signal needs no group baseline
        if not preset.uses_critic and preset.advantage != "reverse_kl" and self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2 for {self.algorithm!r} (a group baseline needs "
                "several samples per prompt); got 1"
            )
        self._check_env()
        self._check_scale()
        self._resolve_batch_size()
        rows = self.rollout.prompts_per_step * self.rollout.group_size
        if self.optim.num_mini_batches > rows:
            raise ValueError(
                f"optim.num_mini_batches ({self.optim.num_mini_batches}) exceeds the rows per step "
                f"(rollout.prompts_per_step * rollout.group_size = {rows})"
            )
        return self

    def _check_scale(self) -> None:
        import importlib.util

        if self.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "rollout.engine: vllm is not installed in this Python; pip install 'posttrain[vllm]' "
                "(GPU), or build the CPU engine's venv with scripts/vllm_venv.sh and run from it"
            )
        rollout = self.rollout
        if rollout.keep_sampling_mask:
            if rollout.temperature == 0 or (rollout.top_k == 0 and rollout.top_p == 1.0):
                raise ValueError(
                    "rollout.keep_sampling_mask applies the sampler's top_k / top_p truncation in training; "
                    "with rollout.top_k=0, rollout.top_p=1 (or greedy) nothing is truncated: set one of them"
                )
            if self.algo.rollout_correction is not None and rollout.engine == "hf":
                raise ValueError(
                    "rollout.keep_sampling_mask with algo.rollout_correction: the HF engine's log-probs are "
                    "of the full distribution, so the correction would compare truncated with untruncated "
                    "probabilities; drop one of them"
                )
        scale = self.scale
        if not scale.ray:
            return
        if importlib.util.find_spec("ray") is None:
            raise ValueError(
                "scale.ray: Ray is not installed in this Python; pip install 'posttrain[distributed]'"
            )
        if self.rollout.engine != "hf":
            raise ValueError(
                f"scale.ray runs HF-engine rollout workers; rollout.engine={self.rollout.engine} is not "
                "available on them yet"
            )
        if scale.max_policy_lag > 0 and self.env_name() is not None:
            raise ValueError(
                "scale.max_policy_lag: asynchronous rollouts are single-turn only so far; set it to 0 for "
                "agent (multi-turn) runs"
            )

    def env_name(self) -> str | None:
        """The environment the run collects episodes from: ``env.name``, else the built-in task's
        own (a dataset given by ``data.path`` has none), else None (single-turn)."""
        from posttrain.data.tasks import task_env

        return self.env.name or (task_env(self.data.task) if self.data.path is None else None)

    def uses_env(self) -> bool:
        """True when the run collects multi-turn episodes from an environment."""
        return self.env_name() is not None

    def warmstart_split(self) -> bool:
        """True when the warm-start takes its own share of the training rows and RL the others:
        ``warmstart.rows``, which defaults to split for a dataset and to all for a built-in task. A
        ``data.demonstrations_path`` file is the warm-start's own already."""
        rows = self.warmstart.rows or ("split" if self.data.path is not None else "all")
        return rows == "split" and self.data.demonstrations_path is None

    @model_validator(mode="after")
    def _warmstart_rows_act(self) -> TrainConfig:
        """The warm-start's row settings must act: refuse them where they would be ignored."""
        if self.data.demonstrations_path is not None:
            if self.warmstart.rows is not None:
                raise ValueError(
                    "warmstart.rows: the warm-start imitates the data.demonstrations_path file and RL trains "
                    "on every training row; drop warmstart.rows (or data.demonstrations_path)"
                )
            if self.env_name() is not None:
                raise ValueError(
                    f"data.demonstrations_path: the environment {self.env_name()!r} writes the warm-start's "
                    "demonstrations itself; drop data.demonstrations_path"
                )
        if _changed(self.warmstart, "split_fraction") and not self.warmstart_split():
            raise ValueError(
                "warmstart.split_fraction applies when the warm-start has its own rows (warmstart.rows: split, "
                "the default for data.path); set warmstart.rows=split or drop warmstart.split_fraction"
            )
        return self

    def _check_distill(self, preset: AlgorithmPreset) -> None:
        """The teachers' signal is the advantage (reverse_kl, algorithm distill) or added to an RL
        advantage by distill.coef; each distill setting must act in the mode the run is in."""
        distill = self.distill
        if preset.advantage == "reverse_kl":
            if not distill.teachers:
                raise ValueError(
                    f"{self.algorithm!r} learns from teachers (advantage reverse_kl); add distill.teachers"
                )
            if distill.coef:
                raise ValueError(
                    f"distill.coef adds the teachers' signal to an RL advantage, but {self.algorithm!r}'s "
                    "advantage is that signal already (reverse_kl); drop distill.coef"
                )
            if self.algo.advantage_kwargs and "gamma" in self.algo.advantage_kwargs:
                raise ValueError(
                    "algo.advantage_kwargs.gamma: the reverse_kl discount is distill.discount; set that instead"
                )
        elif distill.teachers and not distill.coef and _changed(distill, "discount"):
            raise ValueError(
                "distill.discount shapes the teachers' signal, which distill.coef 0 leaves out of the "
                f"advantage of {self.algorithm!r}; set distill.coef > 0 or drop distill.discount"
            )

    def _check_kl_acts(self, preset: AlgorithmPreset) -> None:
        """KL settings must act: refuse them when the run applies no KL term (placement none or
        coefficient 0), instead of ignoring them."""
        if preset.kl_placement != "none" and preset.kl_coef > 0:
            return
        if preset.kl_placement == "none":
            why, fix = (
                f"{self.algorithm!r} applies no KL (kl_placement none)",
                "also set algo.kl_placement=loss",
            )
        else:
            why, fix = f"the KL coefficient of {self.algorithm!r} is 0", "also set algo.kl_coef > 0"
        given = {
            "algo.kl_coef": bool(self.algo.kl_coef),
            "algo.kl_placement": self.algo.kl_placement not in (None, "none"),
            "algo.kl_estimator": self.algo.kl_estimator is not None,
            "optim.adaptive_kl_target": self.optim.adaptive_kl_target is not None,
        }
        ignored = [key for key, is_set in given.items() if is_set]
        if ignored:
            raise ValueError(
                f"{ignored[0]} is set, but {why}, so it would be ignored; {fix} or drop {ignored[0]}"
            )

    def _check_env(self) -> None:
        """env.* settings must act: refuse them for a single-turn run instead of ignoring them; an
        environment that does not resolve or rejects its options fails here, before any model."""
        name = self.env_name()
        if name is not None:
            from posttrain.envs.registry import env_factory

            # raises EnvSpecError (a ValueError) naming the key; a bad guard rule or judge fails here too
            env_factory(name, self.env.options, self.env.guard and self.env.guard.build())
            if self.data.reward_fns:
                raise ValueError(
                    f"data.reward_fns: the environment {name!r} scores its own episodes, so reward "
                    "functions would be ignored; drop data.reward_fns (or give the environment a reward)"
                )
            return
        defaults, current = EnvConfig().model_dump(), self.env.model_dump()
        changed = sorted(key for key in current if current[key] != defaults[key])
        if changed:
            raise ValueError(
                f"env.{changed[0]} is set, but the task {self.data.task or self.data.path!r} is single-turn; "
                "set env.name to an environment (e.g. key_chain) or drop the env settings"
            )

    def _resolve_batch_size(self) -> None:
        rollout = self.rollout
        if rollout.batch_size is None:
            return
        size, group = rollout.batch_size, rollout.group_size
        if size % group:
            nearest = sorted({max(group, size - size % group), size - size % group + group})
            raise ValueError(
                f"rollout.batch_size ({size}) must be a multiple of rollout.group_size ({group}) so "
                f"that every prompt gets a full group; use {' or '.join(map(str, nearest))}, or change "
                "group_size"
            )
        if "prompts_per_step" in rollout.model_fields_set and rollout.prompts_per_step != size // group:
            raise ValueError(
                f"rollout.prompts_per_step ({rollout.prompts_per_step}) disagrees with rollout.batch_size "
                f"/ rollout.group_size ({size} / {group}); set only one of prompts_per_step and batch_size"
            )
        rollout.prompts_per_step = size // group

    def preset(self) -> AlgorithmPreset:
        """The algorithm preset with this config's overrides applied."""
        import posttrain.algorithms  # noqa: F401  (registers every function)

        algo = self.algo.model_dump(exclude={"rollout_correction"})  # a setting of the step, not the preset
        overrides = {k: v for k, v in algo.items() if v is not None}
        preset = get_preset(self.algorithm).with_overrides(**overrides)
        if preset.advantage == "reverse_kl":  # the teacher signal's discount is one setting
            preset = preset.with_overrides(advantage_kwargs={"gamma": self.distill.discount})
        return preset


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml_file(path)
        if loaded is None:  # an empty file, or comments only
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level (`key: value` lines), got a YAML "
                f"{type(loaded).__name__}"
            )
        tree = loaded
    tree = merge_trees(tree, parse_overrides(overrides or []))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, TrainConfig)) from None
