from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2Model

from posttrain.models.critic import VALUE_HEAD_FILE, ValueModel, values_forward
from posttrain.models.forward import position_ids_from_mask


@pytest.fixture()
def critic(tiny_model_dir: Path) -> ValueModel:
    model = ValueModel.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    # A larger head than the near-zero init, so changes in the hidden states are clearly visible.
    torch.nn.init.normal_(model.value_head.weight, std=1.0)
    torch.nn.init.constant_(model.value_head.bias, 0.5)
    return model.eval()


def test_fresh_head_from_policy_path_and_backbone_equals_policy_body(tiny_model_dir: Path) -> None:
    critic = ValueModel.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert not hasattr(critic.backbone, "lm_head")
    assert torch.all(critic.value_head.bias == 0)
    assert 0 < critic.value_head.weight.abs().max() < 0.01


def test_value_at_t_is_head_of_hidden_state_before_t(critic: ValueModel) -> None:
    ids = torch.tensor([[5, 9, 12, 7, 20]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = values_forward(critic, ids, mask)
        hidden = critic.backbone(input_ids=ids).last_hidden_state[0]
        expected = torch.cat([torch.zeros(1), critic.value_head(hidden[:-1]).squeeze(-1)])
    assert values.shape == (1, 5) and values.dtype == torch.float32
    torch.testing.assert_close(values[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("changed", [1, 2, 4])
def test_value_at_t_depends_only_on_tokens_before_t(critic: ValueModel, changed: int) -> None:
    ids = torch.tensor([[5, 9, 12, 7, 20, 3]])
    other = ids.clone()
    other[0, changed] = 30
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before, after = critic(ids, mask), critic(other, mask)
    assert torch.equal(before[:, : changed + 1], after[:, : changed + 1])
    assert not torch.allclose(before[:, changed + 1 :], after[:, changed + 1 :])


def test_left_and_right_padding_agree_and_padding_is_zero(critic: ValueModel) -> None:
    rows = [[4, 8, 15, 16], [7, 3]]
    right = torch.tensor([[4, 8, 15, 16], [7, 3, 0, 0]])
    right_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[4, 8, 15, 16], [0, 0, 7, 3]])
    left_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(position_ids_from_mask(left_mask)[1, 2:], torch.tensor([0, 1]))
    with torch.no_grad():
        v_right, v_left = critic(right, right_mask), critic(left, left_mask)
    torch.testing.assert_close(v_right[1, : len(rows[1])], v_left[1, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(v_right[0], v_left[0])
    assert (v_right[right_mask == 0] == 0).all() and (v_left[left_mask == 0] == 0).all()
    assert v_left[1, 2] == 0  # first real token of a left-padded row has no preceding state


def test_gradients_reach_backbone_and_head(critic: ValueModel) -> None:
    ids = torch.tensor([[5, 9, 12, 7]])
    critic(ids, torch.ones_like(ids)).pow(2).sum().backward()
    assert critic.value_head.weight.grad is not None and critic.value_head.weight.grad.abs().sum() > 0
    layer_grad = critic.backbone.layers[0].self_attn.q_proj.weight.grad
    assert layer_grad is not None and layer_grad.abs().sum() > 0


def test_save_and_load_round_trip_restores_head(critic: ValueModel, tmp_path: Path) -> None:
    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / VALUE_HEAD_FILE).is_file()
    restored = ValueModel.from_pretrained(tmp_path / "critic").eval()
    ids = torch.tensor([[5, 9, 12, 7], [3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(restored(ids, mask), critic(ids, mask), atol=0, rtol=0)
    assert torch.equal(restored.value_head.bias, torch.tensor([0.5]))


def test_position_ids_follow_the_mask_for_absolute_position_backbones() -> None:
    torch.manual_seed(0)
    critic = ValueModel(GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)))
    torch.nn.init.normal_(critic.value_head.weight, std=1.0)
    critic.eval()
    right = torch.tensor([[4, 8, 15, 16], [7, 3, 9, 0]])
    left = torch.tensor([[4, 8, 15, 16], [0, 7, 3, 9]])
    right_mask, left_mask = (right > 0).long(), (left > 0).long()
    with torch.no_grad():
        v_right, v_left = critic(right, right_mask), critic(left, left_mask)
    torch.testing.assert_close(v_right[1, :3], v_left[1, 1:], atol=1e-5, rtol=0)
    assert v_right[1, 1] != 0
