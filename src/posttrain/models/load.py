"""Loading the policy (optionally with LoRA), the frozen reference policy, and saving checkpoints."""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.models.prefix import ActionForward

# what save_pretrained writes: any one of these names a folder's tokenizer / weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the path and the fix."""


def _missing_folder_message(path: str) -> str:
    """The error for a path that is not on disk, with a Hub hint when it looks like ``org/name``."""
    message = f"model folder {path!r} does not exist (relative paths are resolved from {str(Path.cwd())!r})"
    if _HUB_NAME.fullmatch(path) and not Path(path.split("/")[0]).exists():
        return message + f"; to download the Hugging Face Hub model {path!r}, set model.hub: true"
    return message + "; point it at a folder written by save_pretrained"


def check_model_folder(path: str | Path, *, hub: bool = False, tokenizer: bool = True) -> bool:
    """Check that ``path`` is a loadable model folder before transformers sees it.

    transformers treats any path that is not a folder as a Hub name (network retries, then an error
    about the Hub), and a folder without tokenizer files as a request for a slow tokenizer ("install
    sentencepiece"); these checks say what is missing instead. With ``hub``, a path that is not on
    disk is left to ``from_pretrained`` to download. Returns True for a local folder, False for a
    Hub name; raises ``ModelLoadError``.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        if hub:
            return False
        raise ModelLoadError(_missing_folder_message(str(path)))
    if not folder.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a file, not a model folder; point to the folder holding it")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {str(path)!r} has no config.json (not a saved Hugging Face model); "
            f"save one with model.save_pretrained({str(path)!r})"
        )
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"model folder {str(path)!r} has a config.json but no weights (model.safetensors / "
            f"pytorch_model.bin); save them with model.save_pretrained({str(path)!r})"
        )
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {str(path)!r} has no tokenizer files (tokenizer.json / tokenizer_config.json "
            f"/ tokenizer.model); save one next to the weights with tokenizer.save_pretrained({str(path)!r})"
        )
    return True


def _from_pretrained(auto_class: Any, path: str | Path, *, local: bool, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` offline unless ``local`` is False (a Hub name the user allowed);
    transformers' OSError (no such Hub model, no network, unreadable files) becomes a ModelLoadError."""
    try:
        return auto_class.from_pretrained(path, local_files_only=local, **kwargs)
    except OSError as error:
        where = "from the Hugging Face Hub" if not local else "from the local folder"
        raise ModelLoadError(f"could not load {str(path)!r} {where}: {error}") from error


def load_frozen(path: str | Path, *, dtype: torch.dtype, hub: bool = False) -> PreTrainedModel:
    """A causal LM that only scores (a reference, a teacher): eval mode, no gradients, in ``dtype``."""
    local = check_model_folder(path, hub=hub, tokenizer=False)
    model: PreTrainedModel = _from_pretrained(AutoModelForCausalLM, path, local=local, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


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
    path: str | Path,
    *,
    lora: LoraSettings | None = None,
    dtype: torch.dtype = torch.float32,
    hub: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder; wrap with LoRA adapters if asked.

    Offline: nothing is asked of a model hub unless ``hub`` is True, in which case ``path`` may be a
    Hub name (downloaded unless cached). A missing folder, config, weights or tokenizer raises
    ``ModelLoadError`` at once. With ``lora`` only the adapter weights are trainable. The tokenizer
    gets a pad token (``ensure_pad_token``) and the model's generation config is told about it.
    """
    local = check_model_folder(path, hub=hub)
    tokenizer = ensure_pad_token(_from_pretrained(AutoTokenizer, path, local=local))
    base: PreTrainedModel = _from_pretrained(AutoModelForCausalLM, path, local=local, dtype=dtype)
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
    def create(cls, path: str | Path, policy_model: nn.Module, *, hub: bool = False) -> ReferencePolicy:
        """The reference for ``policy_model``, whose starting weights are at ``path`` (a Hub name only
        with ``hub``, as in ``load_policy``)."""
        if is_peft_model(policy_model):
            return cls(policy_model, shares_policy=True)
        dtype = next(policy_model.parameters()).dtype
        return cls(load_frozen(path, dtype=dtype, hub=hub), shares_policy=False)

    @torch.no_grad()
    def logprobs(self, plan: ActionForward, temperature: float = 1.0) -> Tensor:
        """log pi_ref(token_t | tokens_<t), ``[batch, time]``, of the micro-batch ``plan`` runs
        (aligned like ``token_logprobs``; 0 before each row's first action)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.shares_policy:
                assert isinstance(self.model, PeftModel)
                with self.model.disable_adapter():
                    logprobs, _ = plan.logprobs(self.model, temperature=temperature)
            else:
                logprobs, _ = plan.logprobs(self.model, temperature=temperature)
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
