"""Loading the policy (optionally with LoRA), the frozen reference policy, and saving checkpoints."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.models.forward import token_logprobs


@dataclass
class LoraSettings:
    """Low-rank adapters on the attention projections (Hu et al. 2021, LoRA)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def to_peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token if it has none, by reusing its EOS token (with a warning).

    Padding positions are always masked out, so reusing EOS is harmless; raises ``ValueError``
    when there is no EOS token either, because then neither padding nor stopping is defined.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad token nor an EOS "
            "token: set both, e.g. tokenizer.add_special_tokens("
            "{'pad_token': '<pad>', 'eos_token': '</s>'}), resize the model's embeddings "
            "and save the tokenizer with the model"
        )
    warnings.warn(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token; using its EOS token "
        f"{tokenizer.eos_token!r} as pad (padding is always masked). To silence this, set "
        "tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token) and save the tokenizer.",
        UserWarning,
        stacklevel=2,
    )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    path: str | Path, *, lora: LoraSettings | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder; wrap with LoRA adapters if asked.

    With ``lora`` only the adapter weights are trainable. The tokenizer gets a pad token
    (``ensure_pad_token``) and the model's generation config is told about it.
    """
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(path))
    base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    model: nn.Module = base
    if lora is not None:
        with warnings.catch_warnings():
            # peft still calls a transformers API that 5.x deprecates; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora.to_peft_config())
    return model, tokenizer


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


class ReferencePolicy:
    """The frozen reference pi_ref for the KL term.

    For a LoRA policy the reference is the same network with adapters disabled (no second copy);
    otherwise it is a separate frozen copy loaded from the policy's initial weights.
    """

    def __init__(self, model: nn.Module, *, shares_policy: bool) -> None:
        self.model = model
        self.shares_policy = shares_policy

    @classmethod
    def create(cls, path: str | Path, policy_model: nn.Module) -> ReferencePolicy:
        if is_peft_model(policy_model):
            return cls(policy_model, shares_policy=True)
        dtype = next(policy_model.parameters()).dtype
        reference: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        reference.eval()
        reference.requires_grad_(False)
        return cls(reference, shares_policy=False)

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0) -> Tensor:
        """log pi_ref(token_t | tokens_<t), ``[batch, time]``, aligned like ``token_logprobs``."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.shares_policy:
                assert isinstance(self.model, PeftModel)
                with self.model.disable_adapter():
                    logprobs, _ = token_logprobs(
                        self.model, input_ids, attention_mask, temperature=temperature
                    )
            else:
                logprobs, _ = token_logprobs(self.model, input_ids, attention_mask, temperature=temperature)
        finally:
            self.model.train(was_training)
        return logprobs


def save_policy(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> None:
    """Save a checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads without peft.

    LoRA adapters are merged into a copy of the weights (W + alpha/r * B A), so the policy being
    trained keeps its adapters. Writes into ``out_dir`` directly: callers wanting atomicity pass a
    temporary folder and rename it.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    to_save: Any = model
    if is_peft_model(model):
        to_save = cast(PeftModel, copy.deepcopy(model)).merge_and_unload()
    to_save.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
