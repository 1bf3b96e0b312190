import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.forward import token_logprobs
from posttrain.models.load import (
    LoraSettings,
    ModelLoadError,
    ReferencePolicy,
    check_model_folder,
    ensure_pad_token,
    load_policy,
    save_policy,
)
from posttrain.models.prefix import ActionForward
from posttrain.train.config import ConfigError, load_config

IDS = torch.tensor([[5, 9, 12, 7, 20, 3], [8, 6, 11, 2, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def policy_step(model: torch.nn.Module) -> None:
    """One optimizer step that raises the logprob of IDS (so trainable weights surely move)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logprobs, _ = token_logprobs(model, IDS, MASK)
    (-logprobs.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_pad_token_fix_warns_and_reuses_eos(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match=r"no pad token.*tokenizer\.pad_token"):
        fixed = ensure_pad_token(tokenizer)
    assert fixed.pad_token == "</s>" and fixed.pad_token_id == fixed.eos_token_id


def test_pad_token_left_alone_when_present(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_pad_token(tokenizer).pad_token == "<pad>"


def test_no_pad_and_no_eos_is_an_error(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        ensure_pad_token(tokenizer)


def test_full_policy_all_trainable_reference_is_frozen_copy(tiny_model_dir: Path) -> None:
    policy, tokenizer = load_policy(tiny_model_dir)
    assert tokenizer.pad_token_id is not None
    assert all(p.requires_grad for p in policy.parameters())
    reference = ReferencePolicy.create(tiny_model_dir, policy)
    assert reference.model is not policy
    assert not any(p.requires_grad for p in reference.model.parameters())
    before = reference.logprobs(ActionForward.plan(IDS, MASK, MASK, share=False))
    policy.train()
    policy_step(policy)
    assert policy.training
    torch.testing.assert_close(
        reference.logprobs(ActionForward.plan(IDS, MASK, MASK, share=False)), before, atol=0, rtol=0
    )
    with torch.no_grad():
        after, _ = token_logprobs(policy.eval(), IDS, MASK)
    assert not torch.allclose(after, before, atol=1e-4)


def test_lora_only_adapters_train_and_reference_is_the_base(tiny_model_dir: Path) -> None:
    policy, _ = load_policy(tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    assert isinstance(policy, PeftModel)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and any("o_proj" in name for name in trainable)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logprobs, _ = token_logprobs(base, IDS, MASK, temperature=0.8)
    reference = ReferencePolicy.create(tiny_model_dir, policy)
    assert reference.model is policy  # no second copy
    torch.testing.assert_close(
        reference.logprobs(ActionForward.plan(IDS, MASK, MASK, share=False), temperature=0.8),
        base_logprobs,
        atol=1e-6,
        rtol=0,
    )

    policy.train()
    policy_step(policy)
    assert policy.training
    torch.testing.assert_close(
        reference.logprobs(ActionForward.plan(IDS, MASK, MASK, share=False), temperature=0.8),
        base_logprobs,
        atol=1e-6,
        rtol=0,
    )
    assert policy.training  # reference pass restored the mode
    with torch.no_grad():
        policy_logprobs, _ = token_logprobs(policy, IDS, MASK, temperature=0.8)
    assert not torch.allclose(policy_logprobs, base_logprobs, atol=1e-4)


def test_merged_lora_save_loads_with_plain_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy, tokenizer = load_policy(tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    policy_step(policy)
    policy.eval()
    save_policy(policy, tokenizer, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not isinstance(loaded, PeftModel)
    with torch.no_grad():
        expected = policy(input_ids=IDS, attention_mask=MASK).logits
        got = loaded(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The policy being trained keeps its adapters.
    assert isinstance(policy, PeftModel)
    assert any("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").decode([tokenizer.eos_token_id]) == "</s>"


def test_full_policy_save_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy, tokenizer = load_policy(tiny_model_dir)
    policy_step(policy)
    save_policy(policy, tokenizer, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for (name, expected), (_, got) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(got, expected), name


# ------------------------------------------------------------------------------ checks before transformers


def _copy_without(source: Path, target: Path, *prefixes: str) -> Path:
    """``source`` copied to ``target`` without the files whose names start with ``prefixes``."""
    target.mkdir()
    for file in source.iterdir():
        if not file.name.startswith(prefixes):
            shutil.copy(file, target / file.name)
    return target


def test_a_missing_folder_fails_at_once_without_the_hub(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"model folder .*nothing_here.* does not exist"):
        load_policy(tmp_path / "nothing_here")
    with pytest.raises(ModelLoadError, match=r"Hub model 'org/model', set model\.hub: true"):
        load_policy("org/model")
    assert time.perf_counter() - start < 1.0  # no Hub requests, no retries


def test_a_folder_without_a_tokenizer_says_how_to_save_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_model_dir, tmp_path / "weights_only", "tokenizer", "special_tokens")
    with pytest.raises(ModelLoadError) as caught:
        load_policy(folder)
    message = str(caught.value)
    assert "has no tokenizer files (tokenizer.json / tokenizer_config.json" in message
    assert f"tokenizer.save_pretrained({str(folder)!r})" in message and "sentencepiece" not in message
    # a critic or a reference needs no tokenizer
    assert check_model_folder(folder, tokenizer=False)
    policy, _ = load_policy(tiny_model_dir)
    assert ReferencePolicy.create(folder, policy).model is not policy


def test_a_folder_without_config_or_weights_says_which(tiny_model_dir: Path, tmp_path: Path) -> None:
    no_config = _copy_without(tiny_model_dir, tmp_path / "no_config", "config.json")
    with pytest.raises(ModelLoadError, match=r"has no config\.json .*model\.save_pretrained"):
        load_policy(no_config)
    no_weights = _copy_without(tiny_model_dir, tmp_path / "no_weights", "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"has a config\.json but no weights"):
        load_policy(no_weights)
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_policy(tiny_model_dir / "config.json")
    with pytest.raises(ModelLoadError, match="does not exist"):
        ReferencePolicy.create(tmp_path / "gone", load_policy(tiny_model_dir)[0])


def test_hub_names_only_when_asked(tiny_model_dir: Path) -> None:
    # a local folder loads the same with hub=True; a Hub name is tried (offline in tests: an error
    # that says so, from transformers' OSError)
    model, tokenizer = load_policy(tiny_model_dir, hub=True)
    assert tokenizer.pad_token is not None and sum(p.numel() for p in model.parameters()) > 0
    assert check_model_folder("org/model", hub=True) is False
    with pytest.raises(ModelLoadError, match="could not load 'org/model' from the Hugging Face Hub"):
        load_policy("org/model", hub=True)


def test_model_paths_are_checked_at_config_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path: .*Hub model 'org/model', set model\.hub: true"):
        load_config(None, ["model.path=org/model"])
    assert load_config(None, ["model.path=org/model", "model.hub=true"]).model.path == "org/model"
    critic = _copy_without(tiny_model_dir, tmp_path / "critic", "tokenizer", "special_tokens")
    with pytest.raises(ConfigError, match=r"model\.path: .*has no tokenizer files"):
        load_config(None, [f"model.path={critic}"])
    config = load_config(None, [f"model.path={tiny_model_dir}", f"model.critic_path={critic}"])
    assert config.model.critic_path == str(critic)  # a critic folder needs no tokenizer
    with pytest.raises(ConfigError, match=r"model\.critic_path: model folder .*gone.* does not exist"):
        load_config(None, [f"model.critic_path={tmp_path / 'gone'}"])
