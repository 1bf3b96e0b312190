"""The ``distill:`` section of a run's config: on-policy distillation from expert teachers.

Kept apart from ``config.py`` (which imports it); the sections follow the same rules: unknown keys
and non-finite numbers are refused, and every setting must act.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # as config.Section: unknown keys fail, assignments are validated, floats are finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _changed(section: BaseModel, name: str) -> bool:
    return getattr(section, name) != type(section).model_fields[name].get_default(call_default_factory=True)


_TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class TeacherConfig(Section):
    """One expert teacher for on-policy distillation (docs/distill.md)."""

    name: str = Field(
        description="what routing names (distill.route_field values, distill.routes, distill.route_fn) and "
        "the suffix of the teacher's distill/* metrics: letters, digits, '_', '-', '.'"
    )
    path: str = Field(
        description="a local HF model folder, a checkpoint folder (its policy/) or a run folder (its newest "
        "checkpoint); the teacher must share the student's tokenizer"
    )

    @field_validator("name")
    @classmethod
    def _a_name(cls, value: str) -> str:
        if not _TEACHER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} must be letters, digits, '_', '-' or '.' (it names metrics)")
        return value

    @field_validator("path")
    @classmethod
    def _a_model(cls, value: str) -> str:
        """A folder that holds no model fails here, at config load, not after the warm-start."""
        from posttrain.models.load import check_model_folder  # heavy imports, only when needed

        check_model_folder(teacher_folder(value))
        return value


def teacher_folder(path: str) -> str:
    """The model folder a teacher's ``path`` names: a run folder's newest checkpoint's policy, a
    checkpoint's policy, or the folder itself."""
    from posttrain.train.checkpoint import resolve_policy_dir

    try:
        return str(resolve_policy_dir(path)[0])
    except FileNotFoundError:  # not a run or a checkpoint: check_model_folder says what is missing
        return path


class DistillConfig(Section):
    """On-policy distillation: the student samples, each row's teacher scores every sampled token
    (per-token reverse KL), see docs/distill.md. Used by algorithm distill (the teacher's signal is
    the advantage) and, with coef, by any RL algorithm (added to its advantage)."""

    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="the expert teachers; empty = no distillation"
    )
    route_field: str | None = Field(
        None,
        description="the data row's field naming each row's teacher (e.g. domain), through routes when its "
        "value is a key there; one teacher needs no routing",
    )
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="route_field value -> teacher name, for values that are not teacher names themselves",
    )
    route_fn: str | None = Field(
        None,
        description="instead of route_field: 'package.module:function' or 'path/file.py:function', "
        "(row) -> teacher name",
    )
    coef: float = Field(
        0.0,
        ge=0.0,
        description="with an RL algorithm: advantage += coef * the teachers' reverse-KL advantage; 0 = the "
        "RL advantage alone (the teachers still report distill/reverse_kl); must stay 0 with algorithm distill",
    )
    discount: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the teacher signal's discount: a token's advantage sums the per-token terms after it "
        "weighted by discount^k; 0 = per-token only",
    )

    @model_validator(mode="after")
    def _routing_acts(self) -> DistillConfig:
        names = [teacher.name for teacher in self.teachers]
        if not names:
            given = [
                key
                for key in ("route_field", "routes", "route_fn", "coef", "discount")
                if _changed(self, key)
            ]
            if given:
                raise ValueError(f"distill.{given[0]} is set, but distill.teachers is empty; add teachers")
            return self
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"distill.teachers: the name {repeated[0]!r} is given twice; teacher names must differ"
            )
        if self.route_field is not None and self.route_fn is not None:
            raise ValueError("distill.route_field and distill.route_fn both route rows; set only one of them")
        if self.routes and self.route_field is None:
            raise ValueError("distill.routes maps values of distill.route_field, which is not set; set it")
        for value, name in self.routes.items():
            if name not in names:
                raise ValueError(f"distill.routes.{value}: unknown teacher {name!r}; teachers: {names}")
        if len(names) > 1 and self.route_field is None and self.route_fn is None:
            raise ValueError(
                f"distill.teachers: {len(names)} teachers need a routing; set distill.route_field (the data "
                "row's field naming its teacher, e.g. domain) or distill.route_fn"
            )
        if self.route_fn is not None and ":" not in self.route_fn:
            raise ValueError(
                f"distill.route_fn {self.route_fn!r}: give 'package.module:function' or 'path/file.py:function'"
            )
        return self
