"""Faults and run identity: kill -9 at random points, SIGINT / SIGTERM, a damaged newest checkpoint;
one process per run folder, no silent reuse of a run's name, a resume acts on the folder it is given
and changes only what a resume may change, and code a run folder names is imported only when trusted.

The process-level tests fork their runs from one "zygote" interpreter that imported posttrain once
(importing torch and transformers takes ~6 s here; a fork takes milliseconds), so 24 real kill -9s
fit in well under a minute. Each run is a real process running ``posttrain.cli.main``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain.plugins
import posttrain.train.loop as loop
from posttrain.cli import main
from posttrain.train.checkpoint import CheckpointError, latest_checkpoint
from posttrain.train.config import ConfigError, load_config
from posttrain.train.interrupt import StopRequest, TrainingInterrupted, stop_on_signals
from posttrain.train.loop import resume_run, train
from posttrain.train.run_folder import LOCK_FILE, RunFolderError, RunLock
from posttrain.train.trust import UntrustedCodeError, code_in_config, untrusted_code

pytestmark = pytest.mark.slow

VOLATILE = ("time/", "tokens_per_s")
STEPS = 30  # more than the 10-15 steps the 24 kills let the run make

# The zygote: reads one JSON request per line. {"argv", "log"}: fork a child that runs
# `posttrain <argv>` with stdout and stderr in the log file, answer {"pid"}; {"wait", "timeout"}:
# reap that child, answer {"code"} (negative: killed by that signal; null: still running at the
# timeout, then killed).
ZYGOTE = r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import posttrain.train.loop  # the trainer, imported once for every run
from posttrain.cli import main
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        pid, deadline, code = request["wait"], time.monotonic() + request["timeout"], None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(json.dumps({"code": code}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = main(request["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Zygote:
    """Starts runs as forked processes of one pre-imported interpreter."""

    def __init__(self, log_dir: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", POSTTRAIN_DEBUG="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.log_dir = log_dir
        self.count = 0
        assert "ready" in self._answer()

    def _ask(self, request: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def start(self, argv: list[str]) -> tuple[int, Path]:
        """Start ``posttrain <argv>``; its pid and log file."""
        self.count += 1
        log = self.log_dir / f"run-{self.count:03d}.log"
        return self._ask({"argv": argv, "log": str(log)})["pid"], log

    def wait(self, pid: int, timeout: float = 120) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["code"]

    def run(self, argv: list[str]) -> tuple[int | None, str]:
        """Run ``posttrain <argv>`` to the end: exit code and output."""
        pid, log = self.start(argv)
        code = self.wait(pid)
        return code, log.read_text()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("logs"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def graded_reward(tmp_path_factory) -> Path:
    """A reward with spread inside every group, so every step changes the weights."""
    path = tmp_path_factory.mktemp("code") / "graded.py"
    path.write_text("def graded(prompt, completion, **row):\n    return sum(map(ord, completion)) % 7 / 6\n")
    return path


@pytest.fixture(scope="module")
def settings(tiny_model_dir, graded_reward) -> Callable[..., list[str]]:
    """``--set`` values of a fast PPO run (a critic, so its checkpoint parts are exercised too)."""

    def make(out: Path, name: str, *extra: str) -> list[str]:
        return [
            f"model.path={tiny_model_dir}",
            "algorithm=ppo",
            f"data.reward_fns=[{{fn: '{graded_reward}:graded'}}]",
            "data.num_train=64",
            "data.num_test=8",
            "eval.num_prompts=8",
            "eval.every=0",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2",
            "optim.micro_batch_size=8",
            f"optim.steps={STEPS}",
            "logging.tensorboard=false",
            "logging.progress=false",
            "logging.num_samples=2",
            f"run.output_dir={out}",
            f"run.name={name}",
            *extra,
        ]

    return make


def _argv(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _resume(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--trust-run-code"]


def _stable_rows(run: Path, file: str = "metrics.jsonl") -> list[dict]:
    rows = [json.loads(line) for line in (run / file).read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(checkpoint.glob("*/*.safetensors")):
        tensors |= {f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items()}
    return tensors


def assert_same_run(run: Path, reference: Path) -> None:
    """Metrics, samples and final weights (policy and critic) equal the uninterrupted run's."""
    assert _stable_rows(run) == _stable_rows(reference)
    assert _stable_rows(run, "samples.jsonl") == _stable_rows(reference, "samples.jsonl")
    final, expected = latest_checkpoint(run), latest_checkpoint(reference)
    assert final.name == expected.name == f"step_{STEPS:06d}"
    mine, theirs = _weights(final), _weights(expected)
    assert mine.keys() == theirs.keys() and any(k.startswith("critic/") for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not (run / LOCK_FILE).exists()


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run every interrupted one must equal, and this machine's pace on it."""

    run: Path
    setup_s: float  # from the start to the first step (set-up, initial eval)
    step_s: float  # one step with its checkpoint


@pytest.fixture(scope="module")
def reference(zygote, settings, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    run = out / "reference"
    start = time.monotonic()
    pid, log = zygote.start(["train", *_argv(*settings(out, "reference", "logging.checkpoint_every=1"))])
    seen: dict[str, float] = {}  # checkpoint -> when it appeared
    last = f"step_{STEPS - 1:06d}"
    while last not in seen and time.monotonic() - start < 300:
        seen |= {name: time.monotonic() for name in _checkpoint_names(run) - seen.keys()}
        time.sleep(0.001)
    assert zygote.wait(pid) == 0, log.read_text()[-3000:]
    step_s = (seen[last] - seen["step_000001"]) / (STEPS - 2)
    return Reference(run, seen["step_000001"] - start - step_s, step_s)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


def _checkpoint_names(run: Path) -> set[str]:
    root = run / "checkpoints"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _appears(run: Path, before: set[str], prefix: str) -> Callable[[], bool]:
    """A condition: a checkpoint folder named ``prefix...`` that was not in ``before`` exists."""
    return lambda: any(name.startswith(prefix) for name in _checkpoint_names(run) - before)


def _logged_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"reward_mean"' in line)


# ------------------------------------------------------------------------------ kill -9


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(
    zygote, settings, reference, tmp_path
):
    """24 kills at random points: 8 while the run sets up (model, optimizer and checkpoint loading,
    initial eval), 10 anywhere in the step after a new checkpoint appears, 6 just after a checkpoint
    write begins (the test watches for its ``.tmp-step_*`` folder: real timing, no hook in the
    library). The delays scale with this machine's pace on the reference run, so each kill costs
    about one step of progress. After each kill the next run resumes (or starts again with
    --overwrite when no checkpoint exists yet)."""
    rng = random.Random(20240613)
    modes = ["setup"] * 8 + ["step"] * 10 + ["write"] * 6
    rng.shuffle(modes)
    run = tmp_path / "killed"
    fresh = ["train", "--overwrite", *_argv(*settings(tmp_path, "killed", "logging.checkpoint_every=1"))]
    killed_in_writes = kills = 0
    for mode in modes:
        argv = _resume(run) if latest_checkpoint(run) is not None else fresh
        before = _checkpoint_names(run)
        pid, log = zygote.start(argv)
        if mode == "setup":
            time.sleep(rng.uniform(0.0, reference.setup_s))
        elif mode == "step":
            _wait_for(_appears(run, before, "step_"))
            time.sleep(rng.uniform(0.0, reference.step_s))
        else:
            _wait_for(_appears(run, before, ".tmp-step_"))
            time.sleep(rng.uniform(0.0, 0.004))
        writing = {n for n in _checkpoint_names(run) - before if n.startswith(".tmp-step_")}
        os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        assert code in (0, -signal.SIGKILL), log.read_text()[-3000:]  # every resume worked
        if code == 0:
            break  # the run finished before the kill
        kills += 1
        # a write cut short leaves its temporary folder (removed by the next save)
        killed_in_writes += bool(writing & _checkpoint_names(run))
    code, output = zygote.run(_resume(run))
    assert code == 0, output[-3000:]
    assert kills >= 20 and killed_in_writes >= 3, (kills, killed_in_writes)
    assert_same_run(run, reference.run)
    root = run / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]  # cleaned up


# ------------------------------------------------------------------------------ SIGINT / SIGTERM


def _start_and_signal(zygote, settings, out: Path, name: str, signals: list[int], *extra: str):
    """Start a run, send ``signals`` once its second step is logged; exit code and output."""
    pid, log = zygote.start(["train", *_argv(*settings(out, name, *extra))])
    assert _wait_for(lambda: _logged_steps(out / name) >= 2, timeout=60), log.read_text()[-3000:]
    for signum in signals:
        os.kill(pid, signum)
    return zygote.wait(pid), log.read_text()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_prints_the_resume_command_and_exits_128_plus_it(
    zygote, settings, reference, tmp_path, signum, code
):
    name = signal.Signals(signum).name.lower()
    run = tmp_path / name
    exit_code, output = _start_and_signal(zygote, settings, tmp_path, name, [signum])
    assert exit_code == code, output[-3000:]
    checkpoint = latest_checkpoint(run)  # logging.checkpoint_every is 0: this one is the signal's
    assert checkpoint is not None and "Traceback" not in output
    step = int(checkpoint.name.removeprefix("step_"))
    assert 2 <= step < STEPS
    assert f"{signal.Signals(signum).name}: stopped after step {step}, saved {checkpoint}" in output
    assert f"resume with: posttrain train --resume {run} --trust-run-code" in output
    assert _logged_steps(run) == step and not (run / LOCK_FILE).exists()
    resumed, output = zygote.run(_resume(run))
    assert resumed == 0, output[-3000:]
    assert_same_run(run, reference.run)


def test_a_second_sigint_stops_at_once_and_the_last_checkpoint_resumes(zygote, settings, tmp_path):
    """The second Ctrl-C is sent once the first one's notice is printed, inside the step it lets
    finish (steps of 64 completions, ~0.3 s, leave time for that)."""
    run = tmp_path / "twice"
    bigger = (
        "rollout.prompts_per_step=16",
        "rollout.group_size=4",
        "optim.steps=6",
        "logging.checkpoint_every=1",
    )
    pid, log = zygote.start(["train", *_argv(*settings(tmp_path, "twice", *bigger))])
    assert _wait_for(lambda: _logged_steps(run) >= 2, timeout=60), log.read_text()[-3000:]
    os.kill(pid, signal.SIGINT)
    assert _wait_for(lambda: "finishing the current step" in log.read_text())
    os.kill(pid, signal.SIGINT)
    code, output = zygote.wait(pid), log.read_text()
    assert code == 130, output[-3000:]
    checkpoint = latest_checkpoint(run)
    assert f"SIGINT: stopped at once; the newest checkpoint is {checkpoint}" in output
    assert "press Ctrl-C again to stop at once" in output and "Traceback" not in output
    assert not (run / LOCK_FILE).exists()
    resumed, output = zygote.run(_resume(run))
    assert resumed == 0, output[-3000:]
    # a save the second signal cut short may leave its temporary folder: the next save removes it
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-") and p.is_dir()]


def test_the_installed_command_exits_130_on_ctrl_c(settings, tmp_path):
    """The console script itself (not a fork): Ctrl-C before the first step ends stops at once."""
    command = [str(Path(sys.executable).parent / "posttrain"), "train", *_argv(*settings(tmp_path, "cli"))]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert _wait_for(lambda: (tmp_path / "cli" / LOCK_FILE).exists(), timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT: stopped at once; no checkpoint yet, so nothing to resume: start the run again" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cli" / LOCK_FILE).exists()


def test_a_signal_in_process_raises_training_interrupted_and_the_resume_is_exact(
    settings, tmp_path, monkeypatch
):
    """From Python: ``TrainingInterrupted`` with the signal, step and checkpoint; handlers restored."""

    def config(name: str):
        return load_config(None, settings(tmp_path, name, "optim.steps=4"))

    full = train(config("full"))
    rl_step = loop.rl_step

    def step_then_signal(state, rows):
        metrics = rl_step(state, rows)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(loop, "rl_step", step_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config("cut"))
    assert signal.getsignal(signal.SIGTERM) is previous
    error = stopped.value
    assert (error.signum, error.exit_code, error.step, error.at_once) == (signal.SIGTERM, 143, 2, False)
    assert error.checkpoint == tmp_path / "cut" / "checkpoints" / "step_000002"
    monkeypatch.setattr(loop, "rl_step", rl_step)
    resumed = resume_run(tmp_path / "cut", trust_run_code=True)

    def steps(result):
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in result.history]

    assert steps(resumed) == steps(full) and resumed.final_eval == full.final_eval


def test_a_second_signal_in_process_stops_at_once_and_the_newest_checkpoint_resumes(
    settings, tmp_path, monkeypatch
):
    def config(name: str):
        return load_config(None, settings(tmp_path, name, "optim.steps=4", "logging.checkpoint_every=1"))

    full = train(config("full"))
    rl_step = loop.rl_step

    def step_then_two_signals(state, rows):
        metrics = rl_step(state, rows)
        if state.step == 3:
            signal.raise_signal(signal.SIGINT)  # the step is done: this one waits for its end
            signal.raise_signal(signal.SIGINT)  # and this one does not
        return metrics

    monkeypatch.setattr(loop, "rl_step", step_then_two_signals)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config("cut"))
    run = tmp_path / "cut"
    assert stopped.value.at_once and stopped.value.checkpoint == run / "checkpoints" / "step_000002"
    assert _logged_steps(run) == 2  # step 3 was never logged
    monkeypatch.setattr(loop, "rl_step", rl_step)
    resume_run(run, trust_run_code=True)
    assert _stable_rows(run) == _stable_rows(full.run_dir)


def test_signal_handlers_stop_at_once_before_the_steps_and_after_a_second_signal():
    def custom(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, custom)
    try:
        with stop_on_signals() as stop:
            with pytest.raises(TrainingInterrupted) as early:
                signal.raise_signal(signal.SIGINT)
            assert early.value.at_once and not stop.requested
            stop.defer()
            signal.raise_signal(signal.SIGINT)  # recorded for the loop, nothing raised
            assert stop.requested and stop.signum == signal.SIGINT
            with pytest.raises(TrainingInterrupted) as second:
                signal.raise_signal(signal.SIGINT)
            assert second.value.at_once and second.value.exit_code == 130
        assert signal.getsignal(signal.SIGINT) is custom
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_signal_stays_ignored_and_other_threads_install_nothing():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert getattr(signal.getsignal(signal.SIGINT), "__self__", None) is stop
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen: list[object] = []

    def in_thread():
        with stop_on_signals() as stop:
            seen.append((signal.getsignal(signal.SIGINT), isinstance(stop, StopRequest)))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [(signal.getsignal(signal.SIGINT), True)]


def test_interrupted_messages_say_what_to_do_next(tmp_path):
    stopped = TrainingInterrupted(signal.SIGTERM, at_once=False, step=7)
    checkpoint = tmp_path / "checkpoints" / "step_000007"
    stopped.describe(tmp_path, checkpoint, f"posttrain train --resume {tmp_path}", holds_run=True)
    assert str(stopped) == (
        f"SIGTERM: stopped after step 7, saved {checkpoint}\nresume with: posttrain train --resume {tmp_path}"
    )
    early = TrainingInterrupted(signal.SIGINT, at_once=True)
    early.describe(tmp_path, None, "unused", holds_run=True)
    assert str(early).endswith("nothing to resume: start the run again with --overwrite")
    assert early.exit_code == 130 and isinstance(early, KeyboardInterrupt)


# ------------------------------------------------------------------------------ damaged checkpoints


def test_a_damaged_newest_checkpoint_is_named_and_the_resume_falls_back(settings, tmp_path, capsys):
    overrides = ("optim.steps=3", "logging.checkpoint_every=1", "logging.keep_last=3")
    full = train(load_config(None, settings(tmp_path, "whole", *overrides)))
    train(load_config(None, settings(tmp_path, "damaged", *overrides)))
    run = tmp_path / "damaged"
    weights = run / "checkpoints" / "step_000003" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    capsys.readouterr()
    resumed = resume_run(run, trust_run_code=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: checkpoint {run / 'checkpoints' / 'step_000003'} is damaged ({weights}: " in err
    assert "resuming from step_000002 instead" in err
    assert _stable_rows(run) == _stable_rows(full.run_dir)  # step 3 and the final eval run again
    assert resumed.final_eval == full.final_eval

    for step in (1, 2, 3):
        trainer = run / "checkpoints" / f"step_{step:06d}" / "trainer.pt"
        trainer.write_bytes(trainer.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match="no usable checkpoint under .*start the run again with --overwrite"
    ):
        resume_run(run, trust_run_code=True)
    assert "trainer.pt is damaged" in capsys.readouterr().err


# ------------------------------------------------------------------------------ one process per folder


def test_the_lock_names_its_owner_and_a_dead_owners_lock_is_taken_over(tmp_path):
    run = tmp_path / "locked"
    with RunLock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()} on "):
            RunLock(run).acquire()
    assert not run.exists()  # created for the lock, left empty: removed
    run.mkdir()
    (run / LOCK_FILE).write_text("999999999 some-host\n")  # left by a process killed with -9
    with RunLock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert run.is_dir() and not (run / LOCK_FILE).exists()


def test_a_second_process_on_a_running_run_refuses_naming_the_pid_then_takes_over_when_it_died(
    zygote, settings, reference, tmp_path
):
    run = tmp_path / "busy"
    pid, log = zygote.start(["train", *_argv(*settings(tmp_path, "busy", "logging.checkpoint_every=1"))])
    assert _wait_for(lambda: latest_checkpoint(run) is not None, timeout=60), log.read_text()[-3000:]
    os.kill(pid, signal.SIGSTOP)  # alive and holding the lock however long the checks below take
    code, output = zygote.run(_resume(run))
    assert code == 2 and f"{run} is in use by process {pid} on " in " ".join(output.split())
    with pytest.raises(RunFolderError, match=f"in use by process {pid}"):
        train(load_config(None, settings(tmp_path, "busy")), overwrite=True)  # never deletes a live run
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid) == -signal.SIGKILL
    assert (run / LOCK_FILE).read_text().split()[0] == str(pid)  # stale: its owner is dead
    code, output = zygote.run(_resume(run))
    assert code == 0, output[-3000:]
    assert_same_run(run, reference.run)


# ------------------------------------------------------------------------------ names and collisions


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/abs", "a/b", "a\\b", "..", ".", "", ".cache"])
def test_run_name_cannot_leave_the_output_dir(name):
    with pytest.raises(ConfigError, match=r"run\.name: .* must be one folder name inside run\.output_dir"):
        load_config(None, [f"run.name={name!r}"])


def test_a_taken_run_name_is_refused_unless_overwritten(settings, tmp_path, capsys):
    overrides = settings(tmp_path, "taken", "optim.steps=1")
    first = train(load_config(None, overrides))
    metrics = (first.run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run .*--resume .*--overwrite"):
        train(load_config(None, overrides))
    assert (first.run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing truncated
    assert main(["train", *_argv(*overrides)]) == 2
    assert "already holds a run (metrics.jsonl, checkpoints/)" in " ".join(capsys.readouterr().err.split())
    (first.run_dir / "stray.txt").write_text("from the old run")
    assert main(["train", "--overwrite", *_argv(*overrides)]) == 0
    assert not (first.run_dir / "stray.txt").exists()
    with pytest.raises(ValueError, match="pick one"):
        train(load_config(None, overrides), resume=True, overwrite=True)


def test_cli_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    cases = {
        ("--resume", str(tmp_path), "--config", "x.yaml"): "drop --config",
        ("--resume", str(tmp_path), "--overwrite"): "drop --overwrite",
        ("--trust-run-code",): "--trust-run-code applies to --resume",
        ("--resume", str(tmp_path), "--print-config"): "the run's own is in its config.yaml",
    }
    for argv, expected in cases.items():
        assert main(["train", *argv]) == 2
        assert expected in capsys.readouterr().err


# ------------------------------------------------------------------------------ what a resume acts on


def test_resume_acts_on_the_folder_it_is_given(settings, tmp_path):
    original = train(load_config(None, settings(tmp_path, "original", "optim.steps=1")))
    metrics = (original.run_dir / "metrics.jsonl").read_text()
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original.run_dir, moved)
    resumed = resume_run(moved, ["optim.steps=2"], trust_run_code=True)
    assert resumed.run_dir == moved and resumed.checkpoint == moved / "checkpoints" / "step_000002"
    assert (original.run_dir / "metrics.jsonl").read_text() == metrics  # the original is untouched
    saved = load_config(moved / "config.yaml")
    assert (saved.run.output_dir, saved.run.name, saved.optim.steps) == (str(moved.parent), "copy", 2)


def test_resume_overrides_may_extend_the_run_and_change_logging_not_what_is_learned(settings, tmp_path):
    run = train(load_config(None, settings(tmp_path, "extend", "optim.steps=2"))).run_dir
    refused = {
        "optim.lr=0.5": "optim.lr",
        "algorithm=grpo": "algorithm",
        "data.num_train=32": "data.num_train",
        "model.lora={r: 4}": "model.lora",
        "run.seed=1": "run.seed",
    }
    for item, key in refused.items():
        with pytest.raises(ConfigError, match=f"settings would change {key} .*start a new run"):
            resume_run(run, [item], trust_run_code=True)
    with pytest.raises(ConfigError, match="--set run.name cannot move a run"):
        resume_run(run, ["run.name=other"], trust_run_code=True)
    with pytest.raises(ConfigError, match=r"optim.steps \(1\) is below the step of the checkpoint .* \(2\)"):
        resume_run(run, ["optim.steps=1"], trust_run_code=True)
    allowed = [
        "optim.steps=3",
        "eval.num_prompts=4",
        "logging.num_samples=1",
        "algorithm=ppo",
    ]  # ppo: as saved
    result = resume_run(run, allowed, trust_run_code=True)
    assert [row["step"] for row in result.history if "reward_mean" in row] == [1, 2, 3]
    saved = load_config(run / "config.yaml")  # says what is in effect
    assert (saved.optim.steps, saved.eval.num_prompts, saved.logging.num_samples) == (3, 4, 1)


# ------------------------------------------------------------------------------ code a run folder names


def test_code_a_config_names_is_listed_with_what_importing_it_runs(tmp_path):
    tree = {
        "data": {"reward_fns": [{"fn": "arithmetic_exact"}, {"fn": "rewards/mine.py:score"}, "pkg.mod:fn"]},
        "env": {"name": "my_envs:Chain", "guard": {"judge": {"kind": "callable", "fn": "judges.py:judge"}}},
    }
    refs = [(ref.key, ref.target) for ref in code_in_config(tree)]
    assert refs == [
        ("data.reward_fns[1].fn", f"file {Path('rewards/mine.py').resolve()}"),
        ("data.reward_fns[2].fn", "module pkg.mod"),
        ("env.name", "module my_envs"),
        ("env.guard.judge.fn", f"file {Path('judges.py').resolve()}"),
    ]
    assert code_in_config({"data": {"reward_fns": [{"fn": "countdown"}]}, "env": {"name": "key_chain"}}) == []
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  reward_fns:\n  - fn: theirs.py:f\n")
    assert [ref.spec for ref in untrusted_code(config)] == ["theirs.py:f"]
    assert untrusted_code(config, ["data.reward_fns=[{fn: mine.py:g}]"]) == []  # yours, not the run's


def test_resume_imports_a_runs_code_only_when_trusted(settings, graded_reward, tmp_path, monkeypatch, capsys):
    run = train(load_config(None, settings(tmp_path, "theirs", "optim.steps=1"))).run_dir
    imported: list[str] = []
    real = posttrain.plugins._import_file

    def watched(path_text, *args):
        imported.append(path_text)
        return real(path_text, *args)

    monkeypatch.setattr(posttrain.plugins, "_import_file", watched)
    assert main(["train", "--resume", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: --resume {run} would import and run code named by {run / 'config.yaml'}: " in err
    assert f"data.reward_fns[0].fn '{graded_reward}:graded' (file {graded_reward})" in err
    with pytest.raises(UntrustedCodeError, match="trust_run_code=True"):
        resume_run(run)
    assert imported == []
    assert main(["train", "--resume", str(run), "--trust-run-code"]) == 0  # a finished run: reported
    assert imported == [str(graded_reward)]


def test_an_output_folder_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(
        RunFolderError, match="cannot create or lock the run folder .*: Not a directory; set run"
    ):
        RunLock(tmp_path / "a-file" / "run").acquire()
