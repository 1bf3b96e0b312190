"""Checkpoints: exact resume of optimizer/scheduler/RNG state, atomicity, pruning."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from posttrain.train.checkpoint import (
    COMPLETE_MARKER,
    CRITIC_SUBDIR,
    LATEST_FILE,
    POLICY_SUBDIR,
    TRAINER_FILE,
    CheckpointError,
    checkpoint_name,
    checkpoint_problems,
    latest_checkpoint,
    load_extra_tensors,
    load_trainer_state,
    resolve_policy_dir,
    save_checkpoint,
    usable_checkpoint,
)

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [str(i) for i in range(10)] + ["+", "-", "=", "?"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=32
    )
    return LlamaForCausalLM(config)


def make_optim(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def train_steps(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, scheduler, n: int) -> None:
    tokens = torch.tensor([[3, 4, 13, 5, 15, 2], [6, 7, 14, 8, 15, 2]])
    for _ in range(n):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, **kwargs) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        policy=model,
        tokenizer=tokenizer,
        optimizers={"policy": optimizer},
        schedulers={"policy": scheduler},
        trainer_state={"step": step, "data_position": 10 * step, "kl": {"coef": 0.05}},
        **kwargs,
    )


def test_round_trip_restores_optimizer_scheduler_and_state(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    train_steps(model, optimizer, scheduler, 3)
    ckpt = save(tmp_path, 3, model, tokenizer, optimizer, scheduler)
    assert ckpt == tmp_path / "checkpoints" / "step_000003"
    assert (ckpt / COMPLETE_MARKER).is_file()

    restored = AutoModelForCausalLM.from_pretrained(ckpt / POLICY_SUBDIR)
    for (name, p), (_, q) in zip(model.named_parameters(), restored.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(ckpt / POLICY_SUBDIR)("1 + 2 =")["input_ids"] == [4, 13, 5, 15]

    new_optimizer, new_scheduler = make_optim(restored)
    state = load_trainer_state(
        ckpt, optimizers={"policy": new_optimizer}, schedulers={"policy": new_scheduler}
    )
    assert state == {"step": 3, "data_position": 30, "kl": {"coef": 0.05}}
    assert new_scheduler.last_epoch == 3
    assert new_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    old_states = list(optimizer.state.values())
    new_states = list(new_optimizer.state.values())
    assert len(new_states) == len(old_states) > 0
    for old, new in zip(old_states, new_states, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(old[key], new[key], rtol=0, atol=0)

    # One more identical step from both must give identical weights: the resume is exact.
    train_steps(model, optimizer, scheduler, 1)
    train_steps(restored, new_optimizer, new_scheduler, 1)
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_streams_continue_identically(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt = save(tmp_path, 1, model, tokenizer, optimizer, scheduler)
    expected = [draw() for _ in range(3)]

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_trainer_state(ckpt, optimizers={"policy": optimizer}, schedulers={"policy": scheduler})
    assert [draw() for _ in range(3)] == expected

    torch.manual_seed(99)
    load_trainer_state(
        ckpt, optimizers={"policy": optimizer}, schedulers={"policy": scheduler}, restore_rng=False
    )
    assert draw()[2] != expected[0][2]


def test_pruning_keeps_last_two_and_latest_points_to_newest(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    for step in range(1, 5):
        save(tmp_path, step, model, tokenizer, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step_000003", "step_000004"]
    assert (root / LATEST_FILE).read_text().strip() == "step_000004"
    assert latest_checkpoint(tmp_path) == root / "step_000004"

    save(tmp_path, 5, model, tokenizer, optimizer, scheduler, keep_last=None)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000003", "step_000004", "step_000005"]


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path: Path, tokenizer, monkeypatch) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    first = save(tmp_path, 1, model, tokenizer, optimizer, scheduler)

    def exploding_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", exploding_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save(tmp_path, 2, model, tokenizer, optimizer, scheduler)

    root = tmp_path / "checkpoints"
    assert not (root / "step_000002").exists()
    assert not list(root.glob(".tmp-*"))
    assert (root / LATEST_FILE).read_text().strip() == "step_000001"
    assert latest_checkpoint(tmp_path) == first


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path: Path, tokenizer) -> None:
    assert latest_checkpoint(tmp_path) is None
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    first = save(tmp_path, 1, model, tokenizer, optimizer, scheduler)
    root = tmp_path / "checkpoints"

    # What a killed process leaves behind: a temp dir (even with its marker) and a marker-less dir.
    crashed_tmp = root / ".tmp-step_000009-deadbeef"
    crashed_tmp.mkdir()
    (crashed_tmp / COMPLETE_MARKER).write_text("9\n")
    (root / "step_000008").mkdir()
    assert latest_checkpoint(tmp_path) == first

    # A stale `latest` naming a missing dir falls back to the highest complete step.
    (root / LATEST_FILE).write_text("step_000007\n")
    assert latest_checkpoint(tmp_path) == first
    (root / LATEST_FILE).unlink()
    assert latest_checkpoint(tmp_path) == first

    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_trainer_state(root / "step_000008", optimizers={}, schedulers={})

    second = save(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    assert latest_checkpoint(tmp_path) == second
    assert not crashed_tmp.exists()  # the next successful save cleans up crash leftovers


def test_extra_tensors_critic_and_custom_policy_saver(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    critic = tiny_llama(seed=1)
    optimizer, scheduler = make_optim(model)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    shared = torch.arange(6.0)
    extra = {"policy_trainable": {"a": shared, "b": shared, "c": torch.ones(2, 3)}}
    saved_to: list[Path] = []

    def save_policy(path: Path) -> None:
        saved_to.append(path)
        model.save_pretrained(path)

    ckpt = save_checkpoint(
        tmp_path,
        4,
        policy=None,
        tokenizer=tokenizer,
        critic=critic,
        optimizers={"policy": optimizer, "critic": critic_optimizer},
        schedulers={"policy": scheduler},
        trainer_state={"step": 4},
        save_policy=save_policy,
        extra_tensors=extra,
    )
    assert len(saved_to) == 1 and saved_to[0].name == POLICY_SUBDIR
    assert (ckpt / POLICY_SUBDIR / "tokenizer.json").is_file()
    loaded_critic = AutoModelForCausalLM.from_pretrained(ckpt / CRITIC_SUBDIR)
    torch.testing.assert_close(loaded_critic.lm_head.weight, critic.lm_head.weight)

    loaded = load_extra_tensors(ckpt)
    assert set(loaded) == {"policy_trainable"}
    for key, value in extra["policy_trainable"].items():
        torch.testing.assert_close(loaded["policy_trainable"][key], value)
    assert load_extra_tensors(save(tmp_path, 5, model, tokenizer, optimizer, scheduler)) == {}

    with pytest.raises(ValueError, match="optimizers"):
        load_trainer_state(ckpt, optimizers={"policy": optimizer}, schedulers={"policy": scheduler})
    with pytest.raises(ValueError, match="must match"):
        save(tmp_path, 6, model, tokenizer, optimizer, scheduler, extra_tensors={"../evil": {}})
    assert not (tmp_path / "checkpoints" / checkpoint_name(6)).exists()


def test_saving_the_same_step_twice_replaces_it(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    save(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    ckpt = save(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    restored = AutoModelForCausalLM.from_pretrained(ckpt / POLICY_SUBDIR)
    torch.testing.assert_close(restored.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST_FILE, "step_000002"]


def test_resolve_policy_dir_takes_a_model_folder_as_it_is(tiny_model_dir: Path) -> None:
    assert resolve_policy_dir(tiny_model_dir) == (tiny_model_dir, None)


def test_resolve_policy_dir_rejects_a_run_without_a_complete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints" / ".tmp-step_000001").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run folder without a complete checkpoint"):
        resolve_policy_dir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_policy_dir(tmp_path)


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: stands for any code a crafted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_trainer_file_does_not_execute(tmp_path: Path, tokenizer) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    ckpt = save(tmp_path / "run", 1, model, tokenizer, optimizer, scheduler)
    marker = tmp_path / "pwned"
    payload = torch.load(ckpt / TRAINER_FILE, weights_only=True)  # what posttrain writes loads safely
    payload["trainer_state"]["evil"] = _RunsCode(marker)
    torch.save(payload, ckpt / TRAINER_FILE)
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        load_trainer_state(ckpt, optimizers={"policy": optimizer}, schedulers={"policy": scheduler})
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_dict"])
def test_a_damaged_trainer_file_is_named(tmp_path: Path, tokenizer, damage: str) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    ckpt = save(tmp_path / "run", 1, model, tokenizer, optimizer, scheduler)
    path = ckpt / TRAINER_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=str(path).replace("\\", "\\\\")):
        load_trainer_state(ckpt, optimizers={"policy": optimizer}, schedulers={"policy": scheduler})


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("truncate_weights", "model.safetensors"),
        ("delete_weights", "no weights"),
        ("delete_tokenizer", "no tokenizer"),
        ("truncate_trainer", "trainer.pt is damaged"),
        ("corrupt_config", "config.json"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path: Path, tokenizer, damage, named) -> None:
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    run = tmp_path / "run"
    older = save(run, 1, model, tokenizer, optimizer, scheduler)
    newest = save(run, 2, model, tokenizer, optimizer, scheduler)
    assert checkpoint_problems(newest) == [] and usable_checkpoint(run) == (newest, [])
    policy = newest / POLICY_SUBDIR
    if damage == "truncate_weights":
        data = (policy / "model.safetensors").read_bytes()
        (policy / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete_weights":
        (policy / "model.safetensors").unlink()
    elif damage == "delete_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (policy / name).unlink(missing_ok=True)
    elif damage == "truncate_trainer":
        (newest / TRAINER_FILE).write_bytes((newest / TRAINER_FILE).read_bytes()[:64])
    else:
        (policy / "config.json").write_text("{not json")
    found, skipped = usable_checkpoint(run)
    assert found == older
    [(path, problems)] = skipped
    assert path == newest and any(named in problem for problem in problems), problems
    (older / TRAINER_FILE).unlink()
    assert usable_checkpoint(run)[0] is None  # nothing usable left: the caller stops clearly


DISK_FULL_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint

run = Path(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=64))
optimizer = torch.optim.AdamW(model.parameters())
kwargs = dict(policy=model, tokenizer=None, optimizers={"policy": optimizer}, schedulers={}, trainer_state={})
save_checkpoint(run, 1, **kwargs)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint(run, 2, **kwargs)
except CheckpointError as error:
    print("ERROR", error)
print("LATEST", latest_checkpoint(run).name)
"""


def test_a_full_disk_gives_a_clear_message_and_loses_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(run)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR could not write checkpoint step 2 under" in done.stdout
    assert "the disk may be full or read-only" in done.stdout
    assert "LATEST step_000001" in done.stdout
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    problems = checkpoint_problems(run / "checkpoints" / "step_000001")
    assert all("no tokenizer" in problem for problem in problems)  # the script saved none; the rest is sound
