"""Algorithm presets: an algorithm is a choice of advantage estimator, policy loss, KL estimator and
placement, and aggregation, plus default hyper-parameters.

PPO, GRPO and GSPO share one per-token clipped surrogate; the preset is where they differ.
Presets are plain data: ``preset.to_dict()`` is what a YAML config shows and overrides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

KLPlacement = Literal["reward", "loss", "none"]


@dataclass(frozen=True)
class AlgorithmPreset:
    """One algorithm, by name. ``kl_placement``: "reward" subtracts ``kl_coef * KL`` per token from
    the reward (InstructGPT), "loss" adds ``kl_coef * KL`` to the loss (GRPO), "none" uses no KL."""

    name: str
    advantage: str
    policy_loss: str
    aggregation: str
    paper: str
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    kl_estimator: str = "k3"
    kl_placement: KLPlacement = "none"
    kl_coef: float = 0.0
    # KL in the loss weighted by sg(pi_theta / pi_old): unbiased off-policy (DeepSeek-V3.2)
    kl_importance_ratio: bool = False
    uses_critic: bool = False
    dynamic_sampling: bool = False
    overlong_shaping: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> AlgorithmPreset:
        """A copy with fields replaced; ``*_kwargs`` dicts are merged into the preset's own, unless
        the override picks another function: the preset's hyper-parameters belong to its own function
        (GRPO's ``scale`` means nothing to ``rloo``), so another one starts from its defaults."""
        unknown = sorted(set(overrides) - set(asdict(self)))
        if unknown:
            raise KeyError(f"unknown preset field(s) {unknown}; allowed: {sorted(asdict(self))}")
        merged = dict(overrides)
        for key, function in (("advantage_kwargs", "advantage"), ("loss_kwargs", "policy_loss")):
            same_function = merged.get(function) in (None, getattr(self, function))
            merged[key] = {**(getattr(self, key) if same_function else {}), **(merged.get(key) or {})}
        return replace(self, **{k: v for k, v in merged.items() if v is not None})


_GROUP = {"scale": "group"}

PRESETS: dict[str, AlgorithmPreset] = {
    p.name: p
    for p in [
        AlgorithmPreset(
            name="ppo",
            advantage="gae",
            advantage_kwargs={"gamma": 1.0, "lam": 0.95, "whiten": True},
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            kl_estimator="k1",
            kl_placement="reward",
            kl_coef=0.01,
            aggregation="token-mean",
            uses_critic=True,
            paper="Schulman et al. 2017 (PPO); Ouyang et al. 2022 (InstructGPT: KL in the reward)",
        ),
        AlgorithmPreset(
            name="grpo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            kl_estimator="k3",
            kl_placement="loss",
            kl_coef=0.04,
            aggregation="seq-mean-token-mean",
            paper="Shao et al. 2024 (DeepSeekMath, GRPO)",
        ),
        AlgorithmPreset(
            name="dr_grpo",
            advantage="grpo",
            advantage_kwargs={"scale": "none"},
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            aggregation="seq-mean-token-sum-norm",
            paper="Liu et al. 2025 (Understanding R1-Zero-Like Training, Dr. GRPO)",
        ),
        AlgorithmPreset(
            name="dapo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.28},
            aggregation="token-mean",
            dynamic_sampling=True,
            overlong_shaping=True,
            paper="Yu et al. 2025 (DAPO: clip-higher, dynamic sampling, token-level loss, overlong shaping)",
        ),
        AlgorithmPreset(
            name="gspo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="gspo",
            loss_kwargs={"clip_low": 3e-4, "clip_high": 4e-4},
            aggregation="seq-mean-token-mean",
            paper="Zheng et al. 2025 (Group Sequence Policy Optimization)",
        ),
        AlgorithmPreset(
            name="cispo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="cispo",
            aggregation="token-mean",
            paper="MiniMax 2025 (MiniMax-M1, CISPO)",
        ),
        AlgorithmPreset(
            name="gmpo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="gmpo",
            loss_kwargs={"clip_low": 0.4, "clip_high": 0.4},
            aggregation="seq-mean-token-mean",
            paper="Zhao et al. 2025 (Geometric-Mean Policy Optimization)",
        ),
        AlgorithmPreset(
            name="sapo",
            advantage="grpo",
            advantage_kwargs=_GROUP,
            policy_loss="sapo",
            aggregation="token-mean",
            paper="Gao et al. 2025 (Soft Adaptive Policy Optimization)",
        ),
        AlgorithmPreset(
            name="rloo",
            advantage="rloo",
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            kl_estimator="k1",
            kl_placement="reward",
            kl_coef=0.01,
            aggregation="seq-mean-token-mean",
            paper="Ahmadian et al. 2024 (Back to Basics: REINFORCE leave-one-out)",
        ),
        AlgorithmPreset(
            name="reinforce_pp",
            advantage="reinforce_pp",
            advantage_kwargs={"gamma": 1.0},
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            kl_estimator="k2",
            kl_placement="reward",
            kl_coef=0.01,
            aggregation="token-mean",
            paper="Hu 2025 (REINFORCE++)",
        ),
        AlgorithmPreset(
            name="kimi",
            advantage="grpo",
            advantage_kwargs={"scale": "none"},
            policy_loss="kimi",
            aggregation="token-mean",
            paper="Kimi Team 2025 (Kimi k1.5: mean-baseline advantage, squared-penalty policy loss)",
        ),
        AlgorithmPreset(
            name="distill",
            advantage="reverse_kl",  # its discount (gamma) is the config's distill.discount
            policy_loss="ppo_clip",
            loss_kwargs={"clip_low": 0.2, "clip_high": 0.2},
            aggregation="token-mean",
            paper="Agarwal et al. 2024 (GKD, on-policy distillation); Gu et al. 2024 (MiniLLM, reverse KL); "
            "Thinking Machines 2025 (on-policy distillation: per-token reverse KL as the advantage)",
        ),
    ]
}


def get_preset(name: str) -> AlgorithmPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; choose one of {sorted(PRESETS)}") from None
