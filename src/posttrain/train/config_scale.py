"""Config sections for scaling out: Ray rollout workers and asynchronous rollouts (``scale:``), the
sampler/trainer correction (``algo.rollout_correction``).

Kept apart from ``config.py`` (which imports it); the sections follow the same rules: unknown keys
and non-finite numbers are refused, and every setting must act.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    # as config.Section: unknown keys fail, assignments are validated, floats are finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ScaleConfig(Section):
    """Where rollouts run (docs/scaling.md). Several training processes: ``posttrain train --nproc N``."""

    ray: bool = Field(
        False,
        description="sample on Ray actors (rollout workers with their own copy of the policy, given the "
        "weights after every update) and train in a Ray task; posttrain train --ray",
    )
    ray_address: str | None = Field(
        None, description="an existing Ray cluster (ray.init(address=...)); None = a local Ray session"
    )
    rollout_workers: int = Field(
        1, ge=1, description="Ray rollout workers; each samples a share of the prompts"
    )
    max_policy_lag: int = Field(
        0,
        ge=0,
        description="asynchronous rollouts: the next steps' rollouts are sampled while a step trains, "
        "from weights at most this many updates old; 0 = synchronous",
    )

    @model_validator(mode="after")
    def _needs_ray(self) -> ScaleConfig:
        if not self.ray:
            for name, default in (("ray_address", None), ("rollout_workers", 1), ("max_policy_lag", 0)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} applies to Ray rollout workers; also set scale.ray=true")
        return self


class RolloutCorrectionConfig(Section):
    """Corrections for the sampler/trainer mismatch and stale rollouts (docs/scaling.md).

    The policy loss of each token is multiplied by an importance weight of the trainer's log-prob
    (before the update) over the sampler's, truncated or masked (Yao et al. 2025), and optionally by
    DeepSeek-V3.2's off-policy sequence mask. The trainer's log-probs are then always recomputed.
    """

    mode: Literal["truncate", "mask", "none"] = Field(
        "truncate",
        description="truncate: weight min(ratio, threshold); mask: weight 1, tokens whose ratio is outside "
        "[lower, threshold] dropped; none: no importance weight (sequence_mask_delta only)",
    )
    level: Literal["token", "sequence"] = Field(
        "token", description="one ratio per token, or the product over a row's tokens"
    )
    threshold: float = Field(2.0, gt=0.0, description="upper bound of the importance ratio")
    lower: float | None = Field(None, ge=0.0, description="mask mode's lower bound; None = 1 / threshold")
    sequence_mask_delta: float | None = Field(
        None,
        gt=0.0,
        description="DeepSeek-V3.2 off-policy sequence masking: negative-advantage tokens of a row whose "
        "mean log(pi_sampler / pi_theta) exceeds this are dropped; None = off",
    )

    @model_validator(mode="after")
    def _acts(self) -> RolloutCorrectionConfig:
        if self.lower is not None and self.mode != "mask":
            raise ValueError(f"lower is the mask mode's bound; with mode {self.mode!r} it does nothing")
        low = 1.0 / self.threshold if self.lower is None else self.lower
        if self.mode == "mask" and low > self.threshold:
            raise ValueError(f"need lower <= threshold, got lower={self.lower}, threshold={self.threshold}")
        if self.mode == "none" and self.sequence_mask_delta is None:
            raise ValueError(
                "mode none with no sequence_mask_delta corrects nothing; set mode truncate/mask or "
                "sequence_mask_delta, or leave algo.rollout_correction unset"
            )
        return self
