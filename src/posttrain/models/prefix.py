"""Shared prompts: the samples of one prompt run that prompt through the model once.

A GRPO batch holds G completions of every prompt, and a plain forward pass computes each prompt G
times. Here each distinct prompt (the tokens before a row's first action) runs once, with
gradients; its keys and values are copied to the rows that start with it through the KV cache
(``Cache.reorder_cache``: an ``index_select``, whose backward sums the rows' gradients into the one
prompt pass), and only the tokens from the first action on run per row. Log-probs, values and
gradients equal the plain forward's to float tolerance (tests/models/test_prefix.py); the prompt's
cost is paid once per group instead of G times.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.data.batch import Batch, micro_batches
from posttrain.models.forward import (
    position_ids_from_mask,
    prediction_logprobs,
    token_logprobs,
    truncated_token_logprobs,
)


@dataclass
class SharedPrompts:
    """A right-padded ``[batch, time]`` batch split into distinct prompts and per-row suffixes.

    ``prompt_ids`` / ``prompt_mask``: ``[prompts, prompt_time]``, left-padded so every prompt ends
    in the last column; ``prompt_of_row``: ``[batch]`` index into them; ``prompt_lengths``:
    ``[batch]`` the row's prompt length, i.e. the position of its first action; ``suffix_ids`` /
    ``suffix_mask``: ``[batch, suffix_time]`` the row's tokens from that position on, right-padded;
    ``time``: the width of the batch they came from.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    prompt_of_row: Tensor
    prompt_lengths: Tensor
    suffix_ids: Tensor
    suffix_mask: Tensor
    time: int

    def to_tokens(self, per_suffix_token: Tensor) -> Tensor:
        """Place ``[batch, suffix_time]`` values (one per suffix token) at their token positions
        in ``[batch, time]``; 0 at the prompt and at padding."""
        rows, width = per_suffix_token.shape
        positions = self.prompt_lengths.unsqueeze(1) + torch.arange(width, device=per_suffix_token.device)
        values = torch.where(self.suffix_mask.bool(), per_suffix_token, torch.zeros_like(per_suffix_token))
        placed = per_suffix_token.new_zeros(rows, self.time + width)
        return placed.scatter(1, positions, values)[:, : self.time]


def row_first_actions(attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """``[batch]``: the position of each row's first action, or its length when it has none."""
    lengths = attention_mask.long().sum(dim=1)
    has_action = loss_mask.bool().any(dim=1)
    return torch.where(has_action, loss_mask.bool().long().argmax(dim=1), lengths)


def share_prompts(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> SharedPrompts | None:
    """Split a right-padded batch at each row's first action (``loss_mask``), or None when no two
    rows share a prompt or no row has an action (the plain forward costs the same then).

    All three inputs are ``[batch, time]``. A row without actions keeps its whole length as prompt.
    """
    lengths = attention_mask.long().sum(dim=1)
    prompt_lengths = row_first_actions(attention_mask, loss_mask).clamp(min=1)
    keys = [tuple(row[:n].tolist()) for row, n in zip(input_ids, prompt_lengths.tolist(), strict=True)]
    distinct = list(dict.fromkeys(keys))
    suffix_width = int((lengths - prompt_lengths).max())
    if len(distinct) == len(keys) or suffix_width < 1:
        return None
    index = {key: i for i, key in enumerate(distinct)}
    prompt_width = max(len(key) for key in distinct)
    prompt_ids = input_ids.new_zeros(len(distinct), prompt_width)
    prompt_mask = attention_mask.new_zeros(len(distinct), prompt_width)
    for i, key in enumerate(distinct):
        prompt_ids[i, prompt_width - len(key) :] = torch.tensor(key, dtype=input_ids.dtype)
        prompt_mask[i, prompt_width - len(key) :] = 1
    columns = prompt_lengths.unsqueeze(1) + torch.arange(suffix_width, device=input_ids.device)
    suffix_mask = (columns < lengths.unsqueeze(1)).to(attention_mask.dtype)
    in_range = columns.clamp(max=input_ids.shape[1] - 1)
    suffix_ids = torch.where(suffix_mask.bool(), input_ids.gather(1, in_range), torch.zeros_like(in_range))
    return SharedPrompts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_of_row=torch.tensor([index[key] for key in keys], device=input_ids.device),
        prompt_lengths=prompt_lengths,
        suffix_ids=suffix_ids,
        suffix_mask=suffix_mask,
        time=int(input_ids.shape[1]),
    )


def _cache_argument(model: nn.Module) -> str:
    """The keyword a HF model takes its KV cache by (``cache`` in transformers 5.2x, formerly
    ``past_key_values``); PEFT wrappers forward it to their base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_of(outputs: Any) -> Any:
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def shared_prompt_outputs(
    model: nn.Module, shared: SharedPrompts, read: Callable[[Any], Tensor], **prompt_kwargs: Any
) -> Tensor:
    """Per-prediction outputs for the suffix tokens: ``[batch, suffix_time, ...]``, entry ``j``
    computed from the position just before suffix token ``j`` (the prompt's last token for
    ``j = 0``). ``read`` takes a HF model output to ``[rows, time, ...]`` (logits, or hidden
    states); ``prompt_kwargs`` go to the prompt pass only (e.g. ``logits_to_keep=1``).
    """
    cache_argument = _cache_argument(model)
    prompt_out = model(
        input_ids=shared.prompt_ids,
        attention_mask=shared.prompt_mask,
        position_ids=position_ids_from_mask(shared.prompt_mask),
        use_cache=True,
        **prompt_kwargs,
    )
    last_of_prompt = read(prompt_out)[:, -1]  # left padding: the last column is the last token
    cache = _cache_of(prompt_out)
    cache.reorder_cache(shared.prompt_of_row)  # one copy per row; the backward sums them
    full_mask = torch.cat([shared.prompt_mask[shared.prompt_of_row], shared.suffix_mask], dim=1)
    suffix_out = model(
        input_ids=shared.suffix_ids,
        attention_mask=full_mask,
        position_ids=position_ids_from_mask(full_mask)[:, shared.prompt_ids.shape[1] :],
        use_cache=True,
        **{cache_argument: cache},
    )
    before_suffix = read(suffix_out)[:, :-1]
    return torch.cat([last_of_prompt[shared.prompt_of_row].unsqueeze(1), before_suffix], dim=1)


@dataclass
class ActionForward:
    """How to run one micro-batch when only values from each row's first action on are used.

    ``shared`` when rows share prompts (``share_prompts``); otherwise one plain pass whose LM head
    starts at the batch's first action. Either way the log-probs are 0 before each row's own first
    action. Built once per micro-batch and used for
    the policy, the reference and the critic alike. Tensors are ``[batch, time]``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    row_starts: Tensor  # [batch] each row's first action (its length when it has none)
    shared: SharedPrompts | None = None

    @classmethod
    def plan(
        cls, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, *, share: bool = True
    ) -> ActionForward:
        shared = share_prompts(input_ids, attention_mask, loss_mask) if share else None
        return cls(input_ids, attention_mask, row_first_actions(attention_mask, loss_mask), shared)

    def unshared(self) -> ActionForward:
        """The same micro-batch, every row run in full (one model call)."""
        return ActionForward(self.input_ids, self.attention_mask, self.row_starts, None)

    def truncated_logprobs(
        self, model: nn.Module, *, temperature: float, top_k: int, top_p: float
    ) -> tuple[Tensor, Tensor]:
        """``truncated_token_logprobs`` of ``model``: the log-probs ``[batch, time]`` (0 before each
        row's first action) of the sampler's truncated distribution, and its kept ids
        ``[batch, time, K]``."""
        logprobs, keep_ids = truncated_token_logprobs(
            model,
            self.input_ids,
            self.attention_mask,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            from_position=self._first_action(),
        )
        return self._from_row_starts(logprobs), keep_ids

    def _first_action(self) -> int:
        return int(self.row_starts.min()) if len(self.row_starts) else 0

    def _from_row_starts(self, values: Tensor) -> Tensor:
        kept = torch.arange(values.shape[1], device=values.device).unsqueeze(0) >= self.row_starts.unsqueeze(
            1
        )
        return torch.where(kept, values, torch.zeros_like(values))

    def logprobs(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        entropy_grad: bool = True,
        keep_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``token_logprobs`` of ``model`` (``[batch, time]``, 0 before each row's first action);
        with ``keep_ids`` ``[batch, time, K]``, of the distribution truncated to them (every row in
        full: the kept sets are laid out by token)."""
        if self.shared is None or keep_ids is not None:
            logprobs, entropy = token_logprobs(
                model,
                self.input_ids,
                self.attention_mask,
                temperature=temperature,
                with_entropy=with_entropy,
                entropy_grad=entropy_grad,
                from_position=self._first_action(),
                keep_ids=keep_ids,
            )
            return self._from_row_starts(logprobs), None if entropy is None else self._from_row_starts(
                entropy
            )
        shared = self.shared
        logits = shared_prompt_outputs(model, shared, lambda out: out.logits, logits_to_keep=1)
        logprobs, entropy = prediction_logprobs(
            logits,
            shared.suffix_ids,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
        return shared.to_tokens(logprobs), None if entropy is None else shared.to_tokens(entropy)


def planned_micro_batches(
    batch: Batch, micro_batch_size: int, *, share: bool
) -> Iterator[tuple[Tensor, ActionForward]]:
    """``(rows, plan)`` for each length-grouped micro-batch of ``batch`` (``data.batch.micro_batches``):
    ``rows`` index ``batch``; ``plan`` runs those rows, trimmed to their own width
    (``plan.input_ids.shape[1]``), sharing prompts when ``share``."""
    for rows in micro_batches(batch.attention_mask, micro_batch_size):
        part = batch.select(rows)
        yield rows, ActionForward.plan(part.input_ids, part.attention_mask, part.loss_mask, share=share)
