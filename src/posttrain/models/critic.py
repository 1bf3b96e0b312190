"""Critic for PPO: a transformer backbone with a scalar value head, aligned to actions.

``values[b, t]`` is V(s_t), the value of the state in which token t is chosen, i.e. of the prefix
``tokens[b, :t]``; it is read from the hidden state of token t-1 (Schulman et al. 2017, PPO;
Ouyang et al. 2022 for the LM setting). ``values[:, 0]`` and padding are 0, exactly where
``forward.token_logprobs`` is 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from posttrain.models.forward import position_ids_from_mask, shift_to_tokens
from posttrain.models.prefix import SharedPrompts, shared_prompt_outputs

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_INIT_STD = 1e-3  # near-zero start: early value loss is driven by the bias, not noise


class ValueModel(nn.Module):
    """``backbone`` (a HF base model without LM head) + ``value_head`` (``Linear(hidden, 1)``)."""

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden_size = int(backbone.config.get_text_config().hidden_size)
        if value_head is None:
            value_head = nn.Linear(hidden_size, 1)
            nn.init.normal_(value_head.weight, std=VALUE_HEAD_INIT_STD)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head.to(device=backbone.device, dtype=backbone.dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> ValueModel:
        """Load a critic from a policy folder (fresh head) or a saved critic folder (head restored).

        ``AutoModel`` drops the LM head of a causal-LM checkpoint and keeps the transformer body.
        """
        folder = Path(path)
        backbone = AutoModel.from_pretrained(folder, dtype=dtype)
        critic = cls(backbone)
        head_file = folder / VALUE_HEAD_FILE
        if head_file.is_file():
            critic.value_head.load_state_dict(load_file(str(head_file)))
        return critic

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Save the backbone with ``save_pretrained`` and the head as ``value_head.safetensors``."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        head_state = {
            name: tensor.detach().contiguous() for name, tensor in self.value_head.state_dict().items()
        }
        save_file(head_state, str(folder / VALUE_HEAD_FILE))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, shared: SharedPrompts | None = None
    ) -> Tensor:
        """Values ``[batch, time]`` (float32) for ``input_ids`` / ``attention_mask`` ``[batch, time]``;
        with ``shared`` (``models.prefix.share_prompts``) each distinct prompt runs once and the
        values before each row's first action are 0."""
        if shared is not None:
            hidden_before = shared_prompt_outputs(self.backbone, shared, lambda out: out.last_hidden_state)
            return shared.to_tokens(self.value_head(hidden_before).squeeze(-1).float())
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        per_position = self.value_head(hidden[:, :-1]).squeeze(-1).float()
        return shift_to_tokens(per_position, attention_mask)


def values_forward(critic: ValueModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``values[b, t] = head(hidden[b, t-1])``: V of the state in which token t is chosen; ``[batch, time]``.

    0 at t = 0 and wherever token t or t-1 is padding. Gradients flow; wrap in ``torch.no_grad()``
    when only the rollout values are needed.
    """
    return critic(input_ids, attention_mask)
