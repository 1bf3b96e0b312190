"""Build (once, cached) a tiny Llama-architecture causal LM and a tokenizer trained locally.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on a corpus the
caller provides, and the model is randomly initialised from a ``LlamaConfig``. The result is a
plain Hugging Face folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load offline.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
SPACE_MARKER = "\u2581"  # Metaspace's visible space, so decoding restores spaces exactly
TOKENIZER_VERSION = 2  # bump when train_tokenizer changes, so cached tiny models are rebuilt
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete_model_dir(path: str | Path) -> bool:
    """True when ``path`` holds a saved model and tokenizer (what ``build_tiny_model`` writes)."""
    folder = Path(path)
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


TOKENIZER_KINDS = ("bpe", "char")


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int = 512, kind: str = "bpe") -> Tokenizer:
    """Train a small BPE tokenizer in which every digit is its own token.

    Pre-tokenisation: a newline is always a token of its own (a turn ends there, so a token never
    straddles two turns), spaces become a visible marker attached to the next word (so ``decode``
    restores the text), digits are split one by one, punctuation is split off. BPE merges then
    only join letters, so numbers are always spelled digit by digit. Printable ASCII and newline
    are in the alphabet even if the corpus lacks them, and so is every other character of the
    corpus; anything else maps to ``<unk>``.

    ``kind="char"``: no merges at all, one token per character (the same alphabet), so a word is
    spelled letter by letter; string tasks (reverse, sort or count letters) need it, since a word
    piece hides its letters from the model.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never")
    alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + [SPACE_MARKER]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if kind == "bpe" else 0,  # the alphabet alone leaves no room for merges
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with bos/eos/pad/unk set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
    )


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
) -> LlamaConfig:
    """A ``LlamaConfig`` sized for CPU experiments, with tied input/output embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
    vocab_size: int = 512,
    tokenizer_kind: str = "bpe",
) -> Path:
    """Build a tiny Llama + tokenizer into ``out_dir`` unless it already holds one; return ``out_dir``.

    Cached: a complete ``out_dir`` is returned untouched (the corpus is not even read). Atomic: the
    model is written to a temporary folder beside ``out_dir`` and renamed into place, so an
    interrupted build leaves no half-written ``out_dir``. Weight init is seeded by ``seed`` without
    disturbing the caller's global RNG. ``tokenizer_kind`` is ``train_tokenizer``'s ``kind``: "bpe"
    or "char" (one token per character).
    """
    target = Path(out_dir)
    if is_complete_model_dir(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but is not a complete model folder (missing one of {REQUIRED_FILES}); "
            "remove it or choose another out_dir"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        tokenizer = wrap_tokenizer(
            train_tokenizer(corpus, vocab_size=vocab_size, kind=tokenizer_kind),
            model_max_length=max_position_embeddings,
        )
        config = tiny_llama_config(
            tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            if target.exists():
                target.rmdir()  # empty (checked above); os.replace cannot overwrite a directory
            os.replace(staging, target)
        except OSError:
            # Another process finished the same build first (its rename landed between our check
            # and our rmdir or rename): keep its result.
            if not is_complete_model_dir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
