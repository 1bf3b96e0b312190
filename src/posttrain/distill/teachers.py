"""The teacher role: frozen expert models, each row of a step routed to one of them.

A teacher is one more role beside the policy and the reference: it never trains, and it scores the
tokens the student sampled (``teacher_logprobs``), from which the ``reverse_kl`` estimator makes the
learning signal. Every teacher must share the student's tokenizer, since it scores the student's own
token ids; a teacher with another vocabulary is refused when it is loaded (cross-tokenizer
distillation is out of scope). Rows are routed by a field of the data row (``distill.route_field``,
optionally mapped by ``distill.routes``) or by a function of the row (``distill.route_fn``); the
rows of one teacher go through it together, in micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from posttrain.algorithms.distill import teacher_signal
from posttrain.algorithms.masked import masked_mean
from posttrain.data.batch import Batch
from posttrain.models.load import _from_pretrained, check_model_folder, load_frozen
from posttrain.models.prefix import planned_micro_batches
from posttrain.plugins import load_from_spec

Router = Callable[[Mapping[str, Any]], str]

_ROUTE_FN_HINT = (
    "give 'package.module:function' or 'path/to/file.py:function', a function (row) -> teacher name"
)


class TeacherError(ValueError):
    """A teacher that cannot serve this student, or a row that routes to no teacher."""


def _prompt_of(row: Mapping[str, Any]) -> str:
    return repr(str(row.get("prompt", ""))[:60])


def make_router(
    names: Sequence[str],
    *,
    route_field: str | None = None,
    routes: Mapping[str, str] | None = None,
    route_fn: str | Callable[[Mapping[str, Any]], str] | None = None,
) -> Router:
    """``row -> name of its teacher``, one of ``names``.

    ``route_fn``: a function of the row (or its spec ``module:fn`` / ``file.py:fn``, imported now);
    ``route_field``: the row's field whose value names the teacher, through ``routes`` (value ->
    teacher name) when the value is a key there; neither: the only teacher. A row that routes to no
    teacher raises ``TeacherError`` naming the setting, the row's prompt and the teachers.
    """
    known = list(names)
    if route_fn is not None:
        spec = route_fn if isinstance(route_fn, str) else getattr(route_fn, "__name__", repr(route_fn))
        fn = route_fn
        if isinstance(route_fn, str):
            _, fn = load_from_spec(route_fn, kind="distill.route_fn", error=TeacherError, hint=_ROUTE_FN_HINT)
            if not callable(fn):
                raise TeacherError(f"distill.route_fn {route_fn!r} is not callable; {_ROUTE_FN_HINT}")
        assert callable(fn)

        def by_function(row: Mapping[str, Any]) -> str:
            name = fn(row)
            if name not in known:
                raise TeacherError(
                    f"distill.route_fn {spec!r} returned {name!r} for the row with prompt {_prompt_of(row)}; "
                    f"it must return a teacher's name: {known}"
                )
            return str(name)

        return by_function
    if route_field is not None:
        mapping = dict(routes or {})

        def by_field(row: Mapping[str, Any]) -> str:
            if route_field not in row:
                raise TeacherError(
                    f"distill.route_field {route_field!r}: the row with prompt {_prompt_of(row)} has no field "
                    f"{route_field!r} (its fields: {sorted(row)})"
                )
            value = str(row[route_field])
            name = mapping.get(value, value)
            if name not in known:
                via = f" (distill.routes maps it to {name!r})" if value in mapping else ""
                raise TeacherError(
                    f"distill.route_field {route_field!r}: the row with prompt {_prompt_of(row)} has "
                    f"{route_field} {value!r}{via}, which names no teacher; teachers: {known}"
                    + ("" if via else "; map field values to teachers with distill.routes")
                )
            return name

        return by_field
    if len(known) != 1:
        raise TeacherError(
            f"{len(known)} teachers need a routing: set distill.route_field (a field of the data row naming "
            "the teacher) or distill.route_fn"
        )
    only = known[0]
    return lambda row: only


def tokenizer_mismatch(student: Any, teacher: Any) -> str | None:
    """Why ``teacher`` cannot score ``student``'s token ids (vocabularies differ), or None."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    if mine == theirs:
        return None
    differ = sorted(token for token in set(mine) | set(theirs) if mine.get(token) != theirs.get(token))
    return (
        f"{len(theirs)} tokens against the student's {len(mine)}, {len(differ)} with another id or missing "
        f"(e.g. {differ[0]!r})"
    )


class Teachers:
    """Frozen teacher models by name (config order) and the router that picks one per row."""

    def __init__(self, models: Mapping[str, nn.Module], route: Router) -> None:
        self.models = dict(models)
        self.route = route

    @classmethod
    def load(
        cls, folders: Mapping[str, str | Path], student_tokenizer: Any, route: Router, *, dtype: torch.dtype
    ) -> Teachers:
        """Load each teacher (a local HF model folder) frozen in ``dtype``; a teacher whose tokenizer
        differs from the student's is refused."""
        models: dict[str, nn.Module] = {}
        for name, folder in folders.items():
            check_model_folder(folder)
            tokenizer = _from_pretrained(AutoTokenizer, folder, local=True)
            reason = tokenizer_mismatch(student_tokenizer, tokenizer)
            if reason is not None:
                raise TeacherError(
                    f"distill.teachers: teacher {name!r} ({str(folder)!r}) does not share the student's "
                    f"tokenizer: {reason}. The teacher scores the student's own token ids, so both need one "
                    "tokenizer (cross-tokenizer distillation is not supported); the embedded tiny models "
                    "share one with model.tiny_tokenizer=char for the student and every teacher"
                )
            models[name] = load_frozen(folder, dtype=dtype)
        return cls(models, route)

    def route_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The teacher of each row (raises ``TeacherError`` for a row that routes to none)."""
        return [self.route(row) for row in rows]

    @torch.no_grad()
    def logprobs(
        self, batch: Batch, names: Sequence[str], *, micro_batch_size: int, share: bool, temperature: float
    ) -> Tensor:
        """log pi_teacher(token_t | tokens_<t) ``[batch, time]`` with row i scored by teacher
        ``names[i]``; each teacher runs over its own rows in micro-batches. 0 off the loss mask."""
        out = torch.zeros_like(batch.loss_mask)
        for name, model in self.models.items():
            mine = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
            if not len(mine):
                continue
            for rows, plan in planned_micro_batches(batch.select(mine), micro_batch_size, share=share):
                out[mine[rows], : plan.input_ids.shape[1]] = plan.logprobs(model, temperature=temperature)[0]
        return torch.where(batch.loss_mask > 0, out, torch.zeros_like(out))

    def metrics(self, batch: Batch, names: Sequence[str]) -> dict[str, float]:
        """``distill/reverse_kl``: mean over action tokens of log pi_student - log pi_teacher (the
        reverse KL estimate), overall and per teacher (``distill/reverse_kl/<name>``, teachers with
        rows this step), and each teacher's share of the rows (``distill/rows/<name>``)."""
        assert batch.old_logprobs is not None and batch.teacher_logprobs is not None
        kl = -teacher_signal(batch.old_logprobs, batch.teacher_logprobs, batch.loss_mask)
        metrics = {"distill/reverse_kl": float(masked_mean(kl, batch.loss_mask))}
        for name in self.models:
            mine = torch.tensor([n == name for n in names], dtype=batch.loss_mask.dtype).unsqueeze(1)
            metrics[f"distill/rows/{name}"] = float(mine.mean())
            if bool(mine.any()):
                metrics[f"distill/reverse_kl/{name}"] = float(masked_mean(kl, batch.loss_mask * mine))
        return metrics
