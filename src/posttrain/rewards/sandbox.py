"""Run model-written Python in a separate process with limits: for code rewards and a Python tool.

``run_python(code)`` runs ``sys.executable -I -S`` (no site, no user environment) in a fresh
temporary working directory and returns a ``SandboxResult`` saying how it ended. The isolation is
layered from the standard library's own process and resource controls (Linux: it relies on
``waitid``, rlimits and namespaces), applied in the child:

1. **rlimits**: CPU seconds (SIGXCPU), address space (``MemoryError``), file size (files written in
   the working directory are capped like the output), no core dumps. The parent adds the wall
   clock (the child leads its own session; the whole process group is killed) and the output cap
   (pipes are read as they fill, and the group is killed once stdout + stderr pass the cap).
2. **netns**, best effort, when ``network`` is off: new user + network namespaces (``unshare(2)``
   through ctypes, then ``exec`` of a fresh interpreter, so ctypes is never loaded where the code
   runs); the only interface is a loopback that is down. Where the kernel refuses, ``isolation``
   lacks ``"netns"`` and layer 3 alone blocks sockets.
3. **audit**: a ``sys.addaudithook`` installed before the code runs raises ``PermissionError`` on any
   socket operation; on opening, listing or changing paths outside the working directory (reading
   is also allowed in the interpreter's import path, so the standard library imports); on starting
   processes, changing rlimits, signalling processes outside the sandbox, and importing ``ctypes``
   or ``cffi`` (they call C without audit events). A denial that ends the run is ``"denied"``.

The code (and any ``tests``) reach the child in a job file in a second temporary directory, which
the child reads and deletes before the hook is installed: the tests are never on disk where the
code can read them. Both directories are always removed.

``max_processes``: 0 denies every way of starting a process (``import subprocess`` included: its
``_posixsubprocess`` starts processes unaudited). With ``n > 0`` each sandboxed interpreter may start
``n``; children keep the rlimits, namespaces and session, but not the hook. ``RLIMIT_NPROC`` is not
set: it counts every process and thread of the real user (the trainer too) and never binds root.

This contains a small model's mistakes and reward hacks (network calls, reading hidden tests or
other files, runaway loops, memory or output, exiting before the asserts run). It is *not* a
security boundary against a determined adversary: code sharing an interpreter with an audit hook
can defeat it (introspection, objects equal to everything). Use a container or a VM for that.
"""

from __future__ import annotations

import errno
import marshal
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, NamedTuple

from posttrain.rewards.verifiers import _require

__all__ = [
    "DEFAULT_LIMITS",
    "SandboxLimits",
    "SandboxResult",
    "SandboxStatus",
    "extract_python_code",
    "python_tests",
    "python_tool",
    "run_python",
]

SandboxStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "denied"]

# The hook's PermissionError message starts with this; the parent finds it in stderr.
_DENIED = "[sandbox] denied: "
_DENIED_PATTERN = re.compile(re.escape(_DENIED) + r"([^\r\n]*)")
_READ_CHUNK = 65536
_STATUS_CAP = 4096  # the status pipe carries two short lines; anything the code adds is dropped
_POLL_SECONDS = 0.05


_INTEGER_MINIMUMS = {"cpu_seconds": 1, "memory_mb": 1, "max_processes": 0, "max_output_bytes": 1}


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. ``cpu_seconds`` is whole seconds (``RLIMIT_CPU`` has no finer grain);
    ``max_output_bytes`` caps stdout + stderr together and the size of any file written."""

    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_mb: int = 512
    max_processes: int = 0
    max_output_bytes: int = 64 * 1024
    network: bool = False

    def __post_init__(self) -> None:
        for field, minimum in _INTEGER_MINIMUMS.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"SandboxLimits.{field} must be an integer >= {minimum}, got {value!r}")
        wall = self.wall_seconds
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not 0 < wall < float("inf"):
            raise ValueError(f"SandboxLimits.wall_seconds must be a positive finite number, got {wall!r}")
        if not isinstance(self.network, bool):
            raise ValueError(f"SandboxLimits.network must be True or False, got {self.network!r}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. ``stdout``/``stderr`` hold at most ``max_output_bytes`` together; ``detail``
    is one line (the denied operation, the limit hit, the last line of a traceback); ``isolation``
    names the layers that were in place (``"rlimits"``, ``"netns"``, ``"audit"``)."""

    status: SandboxStatus
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""
    isolation: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Runs in the child as ``python -I -S -B -u -X utf8 -c _BOOTSTRAP <job file> <status fd> <stage>``.
# Stage "unshare" enters the namespaces and re-executes itself as stage "netns" (or "plain").
_BOOTSTRAP = r"""
import os, sys

def unshare_then_exec():
    try:
        import ctypes
        entered = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0  # USER|NET
    except Exception:  # no ctypes, no libc symbol: run without the namespaces
        entered = False
    argv = list(sys.orig_argv)
    argv[-1] = "netns" if entered else "plain"
    os.execv(sys.executable, argv)

def set_limits(job):
    import resource

    def cap(which, soft, hard):
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))

    cap(resource.RLIMIT_CPU, job["cpu_seconds"], job["cpu_seconds"] + 1)  # SIGXCPU, then SIGKILL
    cap(resource.RLIMIT_AS, job["memory_mb"] << 20, job["memory_mb"] << 20)
    cap(resource.RLIMIT_FSIZE, job["max_output_bytes"], job["max_output_bytes"])
    cap(resource.RLIMIT_CORE, 0, 0)

def install_guard(workdir, job):
    realpath, fspath, fsdecode, sep = os.path.realpath, os.fspath, os.fsdecode, os.sep
    getpgid, getpgrp = os.getpgid, os.getpgrp
    marker, network, max_processes = job["marker"], job["network"], job["max_processes"]
    readable = tuple({realpath(p) for p in sys.path if p})  # the import path, workdir included
    writable = (workdir,)
    devices = frozenset({"/dev/null", "/dev/urandom"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = dict.fromkeys(("ctypes", "_ctypes", "cffi", "_cffi_backend"), "it calls C unaudited")
    if max_processes == 0:  # _posixsubprocess.fork_exec starts processes without an audit event
        blocked["_posixsubprocess"] = "starting processes is off"
    spawns = {"os.fork", "os.forkpty", "os.posix_spawn", "os.system", "subprocess.Popen", "os.exec"}
    # Events that change the file system: their first two path arguments must lie in the workdir.
    changes = {"os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.link", "os.mkdir", "os.remove",
               "os.removexattr", "os.rename", "os.rmdir", "os.setxattr", "os.symlink", "os.truncate",
               "os.utime", "shutil.rmtree", "shutil.chown"}
    listings = {"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"}
    state = {"started": 0, "previous": ""}

    def inside(path, roots):
        if isinstance(path, int):
            return True  # a descriptor that is already open
        path = fsdecode(realpath(fspath("." if path is None else path)))  # None: the current directory
        return path in devices or any(path == root or path.startswith(root + sep) for root in roots)

    def deny(what):
        raise PermissionError(marker + what)

    def group_of(pid):
        try:
            return getpgid(pid)
        except OSError:
            return -1

    def hook(event, args):
        previous, state["previous"] = state["previous"], event
        if event == "open":
            path, mode, flags = args
            writing = bool(flags & write_flags) if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            if not inside(path, writable if writing else readable):
                deny(f"open {path!r} for {'writing' if writing else 'reading'} outside the working directory")
        elif event.startswith("socket."):
            if not network:
                deny(f"{event} (network access is off)")
        elif event == "import":
            if args[0] in blocked:
                deny(f"import {args[0]} ({blocked[args[0]]})")
        elif event in spawns:
            if max_processes == 0:
                deny(f"{event} (starting processes is off)")
            # exec replaces this process; Popen may go through posix_spawn: count that start once
            if event != "os.exec" and not (event == "os.posix_spawn" and previous == "subprocess.Popen"):
                state["started"] += 1
                if state["started"] > max_processes:
                    deny(f"{event} (more than {max_processes} processes)")
        elif event in changes:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, writable):
                    deny(f"{event} {path!r} outside the working directory")
        elif event in listings:
            if not inside(args[0], readable):
                deny(f"{event} {args[0]!r} outside the working directory")
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            own = target == 0 or (target > 0 and (target if event == "os.killpg" else group_of(target)) == getpgrp())
            if not own:
                deny(f"{event} {target} (a process outside the sandbox)")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            deny(event)

    sys.addaudithook(hook)

def execute(source, filename, namespace, show_source):
    try:
        exec(compile(source, filename, "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as error:
        import linecache, traceback
        if show_source:  # traceback lines for the code, never for the tests
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        return False
    return True

def main():
    import marshal
    job_path, status, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if stage == "unshare":
        unshare_then_exec()
    with open(job_path, "rb") as file:
        job = marshal.load(file)
    os.unlink(job_path)  # the code and the tests now exist only in this process
    sys.argv[:] = ["-c"]
    sys.orig_argv[:] = [sys.executable, "-c"]
    workdir = os.path.realpath(os.getcwd())
    sys.path.insert(0, workdir)
    set_limits(job)
    install_guard(workdir, job)
    layers = ["rlimits"] + (["netns"] if stage == "netns" else []) + ["audit"]
    os.write(status, ("layers " + ",".join(layers) + "\n").encode())
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    if not execute(job["code"], "<code>", module.__dict__, True):
        sys.exit(1)
    if job["tests"] and not execute(job["tests"], "<tests>", module.__dict__, False):
        sys.exit(1)
    os.write(status, ("done " + job["nonce"] + "\n").encode())

main()
"""


def _check_relative(name: str) -> PurePosixPath:
    """``name`` as a path inside the working directory; absolute paths and ``..`` are refused."""
    path = PurePosixPath(name)
    if not name or "\0" in name or path.is_absolute() or ".." in path.parts or path == PurePosixPath("."):
        raise ValueError(f"sandbox files must be relative paths inside the working directory, got {name!r}")
    return path


def _write_files(workdir: str, files: Mapping[str, str]) -> None:
    """Write each ``files[name]`` (text, UTF-8) under ``workdir``, creating parent directories."""
    for name, text in files.items():
        target = os.path.join(workdir, *_check_relative(name).parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as file:
            file.write(text)


def _exited(pid: int) -> bool:
    """True once the child has exited; it is left unreaped so its process group id stays ours."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _pump(
    proc: subprocess.Popen[bytes], status_fd: int, buffers: dict[int, bytearray], limits: SandboxLimits
) -> str | None:
    """Read stdout, stderr and the status pipe as they fill, keeping at most the output cap.

    Returns ``"wall"`` when the wall clock ran out, ``"output"`` when stdout + stderr passed
    ``max_output_bytes`` (reading stops there: a flood is never buffered), ``None`` when the child
    exited and nothing more was readable.
    """
    deadline = time.monotonic() + limits.wall_seconds
    cap, total, pause = limits.max_output_bytes, 0, 0.001
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "wall"
            if not selector.get_map():  # every pipe at EOF: the exit itself follows soon
                if _exited(proc.pid):
                    return None
                time.sleep(min(remaining, pause))
                pause = min(2 * pause, _POLL_SECONDS)
                continue
            ready = selector.select(min(remaining, _POLL_SECONDS))
            for key, _ in ready:
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                if key.fd == status_fd:
                    buffer += chunk[: _STATUS_CAP - len(buffer)]
                    continue
                buffer += chunk[: max(0, cap - total)]
                total += len(chunk)
                if total > cap:
                    return "output"
            # Nothing readable and the child gone: done (a grandchild still holding a pipe is killed).
            if not ready and _exited(proc.pid):
                return None


def _kill_group(pid: int) -> None:
    """SIGKILL the child's whole process group (its session, since it was started as a leader)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for the child, set its return code and return the CPU seconds it used."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _drain(fd: int, buffer: bytearray) -> None:
    """Read what is left in the status pipe without blocking (its writers are dead or escaped)."""
    os.set_blocking(fd, False)
    with suppress(BlockingIOError):
        while len(buffer) < _STATUS_CAP and (chunk := os.read(fd, _READ_CHUNK)):
            buffer += chunk[: _STATUS_CAP - len(buffer)]


def _classify(
    limits: SandboxLimits, stop: str | None, returncode: int, cpu: float, stderr: str, finished: bool
) -> tuple[SandboxStatus, str]:
    """Status and one-line detail from how the run stopped, its exit and its stderr."""
    if stop == "output":
        return "output_limit", f"stdout + stderr passed {limits.max_output_bytes} bytes"
    if stop == "wall":
        return "timeout", f"wall-clock limit of {limits.wall_seconds:g} s"
    # SIGKILL after SIGXCPU means the code ignored SIGXCPU until the hard limit a second later.
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu >= limits.cpu_seconds):
        return "timeout", f"CPU limit of {limits.cpu_seconds} s"
    if returncode == -signal.SIGXFSZ:
        return "output_limit", f"a file passed {limits.max_output_bytes} bytes"
    if returncode == 0:
        if finished:
            return "ok", ""
        return "error", "exited before the tests finished"
    denied = _DENIED_PATTERN.findall(stderr)
    if denied:
        return "denied", denied[-1].strip()
    last = stderr.strip().splitlines()[-1].strip() if stderr.strip() else ""
    if last.startswith("MemoryError"):
        return "memory", f"MemoryError under the {limits.memory_mb} MB limit"
    if f"[Errno {errno.EFBIG}]" in last:
        return "output_limit", f"a file passed {limits.max_output_bytes} bytes"
    if returncode == -signal.SIGKILL:
        return "memory", "killed by SIGKILL, most likely out of memory"
    if returncode < 0:
        return "error", f"killed by {signal.Signals(-returncode).name}"
    return "error", last or f"exit code {returncode}"


class _Run(NamedTuple):
    """What the parent saw of one child: raw pipes, why it stopped, exit code, CPU seconds."""

    stdout: bytes
    stderr: bytes
    status: bytes
    stop: str | None
    returncode: int
    cpu: float


def _stdin_source(jobdir: str, stdin: str) -> AbstractContextManager[IO[bytes] | int]:
    """The child's stdin: a file in the job directory (no writer thread, no pipe deadlock)."""
    if not stdin:
        return nullcontext(subprocess.DEVNULL)
    path = Path(jobdir, "stdin.txt")
    path.write_text(stdin, encoding="utf-8")
    return path.open("rb")


def _spawn_and_watch(workdir: str, jobdir: str, stage: str, stdin: str, limits: SandboxLimits) -> _Run:
    """Start the bootstrap in its own session, watch it, and always kill its group and reap it.

    No ``preexec_fn``: everything runs in the child's bootstrap, so starting a sandbox stays safe
    from a trainer's threads and can use vfork instead of copying a large parent's page tables.
    """
    command = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOTSTRAP]
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir}
    status_read, status_write = os.pipe()
    try:
        try:
            with _stdin_source(jobdir, stdin) as source:
                proc = subprocess.Popen(
                    [*command, os.path.join(jobdir, "job"), str(status_write), stage],
                    cwd=workdir,
                    env=env,
                    stdin=source,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(status_write,),
                    start_new_session=True,
                )
        finally:
            os.close(status_write)  # the child has its own copy; EOF arrives when it is gone
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        buffers = {out: bytearray(), err: bytearray(), status_read: bytearray()}
        try:
            stop = _pump(proc, status_read, buffers, limits)
        finally:
            _kill_group(proc.pid)
            cpu = _reap(proc)
            proc.stdout.close()
            proc.stderr.close()
        _drain(status_read, buffers[status_read])
    finally:
        os.close(status_read)
    return _Run(
        bytes(buffers[out]), bytes(buffers[err]), bytes(buffers[status_read]), stop, proc.returncode, cpu
    )


def run_python(
    code: str,
    *,
    limits: SandboxLimits = DEFAULT_LIMITS,
    files: Mapping[str, str] | None = None,
    stdin: str = "",
    tests: str = "",
) -> SandboxResult:
    """Run ``code`` in a sandboxed interpreter (see the module docstring) and say how it ended.

    ``files`` are written (UTF-8) into the fresh working directory, which is also the current
    directory and ``sys.path[0]``; names must be relative (``"data/in.txt"``), else ``ValueError``.
    ``stdin`` is the code's standard input. ``tests`` (e.g. asserts) run after ``code`` in the same
    namespace; the run is ``"ok"`` only if both finish, so ``sys.exit(0)`` in the code fails it.
    """
    for name in files or {}:
        _check_relative(name)
    nonce = secrets.token_hex(16)  # "done <nonce>" on the status pipe: the code cannot fake finishing
    job = {**asdict(limits), "code": code, "tests": tests, "nonce": nonce, "marker": _DENIED}
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="sandbox-work-") as workdir,
        tempfile.TemporaryDirectory(prefix="sandbox-job-") as jobdir,
    ):
        _write_files(workdir, files or {})
        with open(os.path.join(jobdir, "job"), "wb") as file:
            marshal.dump(job, file)  # the child is the same interpreter; marshal needs no import there
        run = _spawn_and_watch(workdir, jobdir, "plain" if limits.network else "unshare", stdin, limits)
    stderr = run.stderr.decode("utf-8", "replace")
    status_lines = run.status.decode("utf-8", "replace").splitlines()
    # The first line is written before the code runs, so the code cannot forge it.
    layers = status_lines[0].removeprefix("layers ").split(",") if status_lines[:1] else []
    finished = not tests or f"done {nonce}" in status_lines
    status, detail = _classify(limits, run.stop, run.returncode, run.cpu, stderr, finished)
    return SandboxResult(
        status=status,
        returncode=run.returncode,
        stdout=run.stdout.decode("utf-8", "replace"),
        stderr=stderr,
        seconds=time.monotonic() - start,
        detail=detail,
        isolation=tuple(layers),
    )


def python_tool(
    limits: SandboxLimits = DEFAULT_LIMITS, files: Mapping[str, str] | None = None
) -> Callable[[str], str]:
    """A ``python(code) -> str`` tool for tool-using environments: each call is a fresh sandbox
    with ``limits`` and a copy of ``files``. Its docstring and hints give a JSON schema
    (``transformers.utils.get_json_schema``); it returns stdout, or ``"error: <status>: <detail>"``."""
    snapshot = dict(files or {})
    for name in snapshot:
        _check_relative(name)

    def python(code: str) -> str:
        """Run Python code in a sandbox and return its output.

        Args:
            code: The Python source to run; print the values you want to see.
        """
        result = run_python(code, limits=limits, files=snapshot)
        return result.stdout if result.ok else f"error: {result.status}: {result.detail}"

    return python


_PYTHON_FENCES = {"", "python", "python3", "py"}


def extract_python_code(completion: str) -> str:
    """The code in a completion: the last fenced python (or untagged) block, since the final answer
    comes last; a block cut off by the token limit counts; with no such block, the whole text."""
    blocks: list[str] = []
    current: list[str] | None = None
    language = ""
    for line in completion.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            if current is None:  # an opening fence: ```python, ```py, ``` ...
                language, current = (line.strip()[3:].split() or [""])[0].lower(), []
            else:
                blocks += ["".join(current)] if language in _PYTHON_FENCES else []
                current = None
        elif current is not None:
            current.append(line)
    if current is not None and language in _PYTHON_FENCES:
        blocks.append("".join(current))
    return blocks[-1] if blocks else completion


def python_tests(prompt: str, completion: str, **row: Any) -> float:
    """1.0 if the completion's code runs and then ``row["tests"]`` (Python asserts) pass in the
    sandbox with the default limits, else 0.0.

    The tests run after the code in the same namespace and are never written to disk where the code
    can read them; exiting early (``sys.exit(0)``, ``os._exit(0)``) scores 0.0.
    """
    tests = _require(row, "tests", "python_tests")
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError(f"reward 'python_tests' needs 'tests' as non-empty Python source, got {tests!r}")
    return 1.0 if run_python(extract_python_code(completion), tests=tests).ok else 0.0
