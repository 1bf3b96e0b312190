import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from posttrain.models.tiny import REQUIRED_FILES, build_tiny_model, is_complete_model_dir, train_tokenizer


def test_tokenizer_round_trip_spells_numbers_digit_by_digit(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("12+34=46").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "+", "3", "4", "=", "4", "6"]
    assert tokenizer.decode(ids) == "12+34=46"
    sentence = "What is 12 plus 3? The answer is 15."
    assert tokenizer.decode(tokenizer(sentence).input_ids) == sentence


def test_every_digit_is_its_own_token(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer("9081726354").input_ids) == 10
    for digit in "0123456789":
        assert len(tokenizer(digit).input_ids) == 1
    multi_digit = [tok for tok in tokenizer.get_vocab() if sum(ch.isdigit() for ch in tok) > 1]
    assert multi_digit == []


def test_special_tokens_and_small_vocab(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    specials = [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token]
    assert specials == ["<pad>", "<s>", "</s>", "<unk>"]
    assert len({tokenizer.convert_tokens_to_ids(tok) for tok in specials}) == 4
    assert len(tokenizer) <= 512
    assert tokenizer.chat_template is None
    # Characters never seen in the corpus but in printable ASCII still get a real token.
    assert tokenizer.unk_token_id not in tokenizer("#~|").input_ids


def test_model_is_tied_llama_matching_tokenizer(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)


def test_cached_build_is_a_no_op(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_be_read() -> Iterator[str]:
        raise AssertionError("corpus read although the model was cached")
        yield ""  # pragma: no cover

    assert (
        build_tiny_model(tiny_model_dir, must_not_be_read(), hidden_size=32, num_layers=2) == tiny_model_dir
    )
    assert weights.stat().st_mtime_ns == before


def test_loads_offline_in_a_fresh_process_with_transformers_only(tiny_model_dir: Path) -> None:
    script = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "print(type(m).__name__, t.decode(t('7+8=15').input_ids))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "LlamaForCausalLM 7+8=15"


def test_interrupted_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(tmp_path / "model", ["1+1=2"], hidden_size=16, num_layers=1, num_heads=2)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a complete model"):
        build_tiny_model(target, ["1+1=2"], hidden_size=16, num_layers=1, num_heads=2)
    assert not is_complete_model_dir(target)


def test_same_seed_same_weights_and_global_rng_untouched(tmp_path: Path) -> None:
    corpus = ["1+1=2", "2+2=4"]
    state = torch.get_rng_state()
    first = build_tiny_model(tmp_path / "a", corpus, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = build_tiny_model(tmp_path / "b", corpus, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    third = build_tiny_model(tmp_path / "c", corpus, hidden_size=16, num_layers=1, num_heads=2, seed=4)
    assert all((first / name).is_file() for name in REQUIRED_FILES)
    weights = [
        AutoModelForCausalLM.from_pretrained(p).model.embed_tokens.weight for p in (first, second, third)
    ]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_train_tokenizer_respects_vocab_limit() -> None:
    words = [f"word{chr(97 + i)}{chr(97 + j)} other{chr(97 + j)}" for i in range(26) for j in range(26)]
    tokenizer = train_tokenizer(words * 3, vocab_size=150)
    assert tokenizer.get_vocab_size() <= 150


def test_char_tokenizer_spells_every_word_letter_by_letter() -> None:
    corpus = ["reverse: hello -> olleh", "reverse: world -> dlrow", "caf\u00e9 \u00e9t\u00e9"] * 20
    bpe, char = train_tokenizer(corpus), train_tokenizer(corpus, kind="char")
    text = "reverse: hello -> olleh\ncaf\u00e9"
    assert "\u2581hello" in bpe.encode(text).tokens  # BPE merges a frequent word into one token
    tokens = char.encode(text).tokens
    assert all(len(token) == 1 for token in tokens) and len(tokens) == len(text)
    assert char.decode(char.encode(text).ids) == text
    assert "<unk>" not in tokens  # characters of the corpus beyond ASCII have tokens too
    with pytest.raises(ValueError, match=r"tokenizer kind must be one of \('bpe', 'char'\), got 'word'"):
        train_tokenizer(corpus, kind="word")


def test_build_with_a_char_tokenizer(tmp_path: Path) -> None:
    path = build_tiny_model(
        tmp_path / "char", ["abc cba"] * 5, hidden_size=16, num_layers=1, num_heads=2, tokenizer_kind="char"
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc cba").input_ids) == [
        "a",
        "b",
        "c",
        "\u2581",
        "c",
        "b",
        "a",
    ]
