"""CPU rollout engine on Hugging Face ``generate`` (KV cache, left padding, micro-batches of prompts).

Behaviour logprobs come from the sampler itself: a logits processor placed before generate's
temperature / top-k / top-p warpers reads each step's raw logits, so no second forward pass is
needed after sampling. They are log-probabilities of the full tempered distribution (top-k / top-p
truncation is a sampling device and is not part of pi) and equal the training forward's
(``models.forward.token_logprobs``, same weights, same position ids) to float tolerance: the KV
cache only changes the order of float additions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from posttrain.rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """Pad token-id lists to ``(input_ids [batch, time], attention_mask [batch, time])`` int64."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def cut_at_eos(generated: list[int], eos_token_ids: set[int], *, stop_on_eos: bool) -> tuple[list[int], str]:
    """Completion tokens up to and including the first EOS, and the finish reason."""
    if stop_on_eos:
        for index, token in enumerate(generated):
            if token in eos_token_ids:
                return generated[: index + 1], FINISH_STOP
    return generated, FINISH_LENGTH


def cut_at_stop_string(
    ids: list[int], reason: str, stop: Sequence[str], decode: Any
) -> tuple[list[int], str]:
    """The shortest prefix of ``ids`` whose text contains one of the ``stop`` strings (finish "stop");
    ``(ids, reason)`` unchanged when none occurs. ``decode`` maps token ids to text.

    A prefix that contains a stop string stays containing it as it grows, so the shortest one is
    found by bisection: O(log n) decodes instead of one per prefix.
    """

    def stops(end: int) -> bool:
        text = decode(ids[:end])
        return any(s in text for s in stop)

    if not stop or not stops(len(ids)):
        return ids, reason
    low, high = 0, len(ids)  # stops(high) holds; stops(low) does not (the empty prefix)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if stops(middle) else (middle, high)
    return ids[:high], FINISH_STOP


def eos_ids_of(model: nn.Module, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (some models have several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(token) for token in configured)
    return ids


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block with ``seed`` without touching the caller's global RNG (no-op when None)."""
    if seed is None:
        yield
        return
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then restore the model's previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class BehaviourLogprobRecorder(LogitsProcessor):
    """Records log pi(sampled token) at every decoding step, from the logits generate already has.

    Called with ``(input_ids [batch, time], scores [batch, vocab])`` before the warpers, it keeps
    ``log_softmax(scores / temperature)`` of the current step; on the next call the token sampled
    from it is ``input_ids[:, -1]``, whose log-prob is then recorded. ``logprobs(sequences, n)``
    finishes the last step. Memory is one ``[batch, vocab]`` distribution, whatever the length.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.recorded: list[Tensor] = []  # [batch] per generated token
        self.pending: Tensor | None = None  # [batch, vocab] log-probs of the latest step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self.recorded.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def logprobs(self, sequences: Tensor, num_generated: int) -> Tensor:
        """``[batch, num_generated]`` log-probs of the last ``num_generated`` tokens of ``sequences``
        (generate may have run, then undone, extra steps; those are dropped)."""
        if len(self.recorded) < num_generated:
            assert self.pending is not None and len(self.recorded) == num_generated - 1
            self.recorded.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
        if num_generated == 0:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.recorded[:num_generated], dim=1).cpu()


class HFRolloutEngine:
    """``RolloutEngine`` backed by ``model.generate``; shares the policy object, so no weight copy."""

    # its log-probs come from the training forward on the very weights being trained
    logprobs_match_policy = True

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 64) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: call models.load.ensure_pad_token(tokenizer) first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_ids = eos_ids_of(model, tokenizer)
        if not self.eos_token_ids:
            raise ValueError("no EOS token id in the tokenizer or the model's generation config")

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to copy: the engine samples from the very module being trained."""
        self.model = model

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """A complete config, so none of the checkpoint's own sampling defaults leak in."""
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=params.logprob_temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            # Greedy ignores top-k; 50 is generate's own default, the one value it does not warn about.
            top_k=params.top_k if not params.greedy else 50,
            # An empty list (not None, which generate would fill from the model) disables stopping.
            eos_token_id=sorted(self.eos_token_ids) if params.stop_on_eos else [],
            stop_strings=list(params.stop) or None,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            num_beams=1,
        )

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        """Sample one completion per prompt (order kept) in micro-batches of ``batch_size`` prompts."""
        if any(len(prompt) == 0 for prompt in prompt_ids):
            raise ValueError("every prompt needs at least one token (e.g. a BOS token)")
        completions: list[Completion] = []
        with seeded(seed), eval_mode(self.model), torch.no_grad():
            for start in range(0, len(prompt_ids), self.batch_size):
                completions.extend(self._generate_batch(prompt_ids[start : start + self.batch_size], params))
        return completions

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = pad_batch(prompts, self.pad_token_id, left=True)
        policy: Any = self.model  # nn.Module's stubs do not know generate()
        recorder = BehaviourLogprobRecorder(params.logprob_temperature)
        sequences = policy.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self.generation_config(params),
            logits_processor=LogitsProcessorList([recorder]),
            tokenizer=self.tokenizer if params.stop else None,  # generate's stop-string criterion needs it
        )
        num_generated = sequences.shape[1] - input_ids.shape[1]
        logprobs = recorder.logprobs(sequences, num_generated).tolist()
        generated = sequences[:, input_ids.shape[1] :].tolist()
        cut = [
            cut_at_stop_string(
                *cut_at_eos(row, self.eos_token_ids, stop_on_eos=params.stop_on_eos),
                params.stop,
                self._decode,
            )
            for row in generated
        ]
        return [
            Completion(
                prompt_ids=list(prompt),
                completion_ids=ids,
                logprobs=row_logprobs[: len(ids)],
                finish_reason=reason,
                text=self._decode(ids),
            )
            for prompt, (ids, reason), row_logprobs in zip(prompts, cut, logprobs)
        ]

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
