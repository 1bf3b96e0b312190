"""Hugging Face models: tiny local model builder, policy / reference / critic loading, logprob forward."""

from posttrain.models.critic import ValueModel, values_forward
from posttrain.models.forward import position_ids_from_mask, token_logprobs
from posttrain.models.load import LoraSettings, ReferencePolicy, ensure_pad_token, load_policy, save_policy
from posttrain.models.tiny import build_tiny_model

__all__ = [
    "LoraSettings",
    "ReferencePolicy",
    "ValueModel",
    "build_tiny_model",
    "ensure_pad_token",
    "load_policy",
    "position_ids_from_mask",
    "save_policy",
    "token_logprobs",
    "values_forward",
]
