"""The sandbox on real processes: every limit ends a run with a clear status and the caller goes on."""

from __future__ import annotations

import os
import select
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from posttrain.rewards.sandbox import (
    SandboxLimits,
    SandboxResult,
    extract_python_code,
    python_tests,
    python_tool,
    run_python,
)

# Small limits keep the file fast: a runaway run costs at most about a second.
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_mb=256)


def run(code: str, **kwargs: object) -> SandboxResult:
    kwargs.setdefault("limits", FAST)
    return run_python(code, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on a free local port; a test checks afterwards whether anything connected."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


def _has_pending_connection(server: socket.socket) -> bool:
    return bool(select.select([server], [], [], 0.2)[0])


# ---------------------------------------------------------------- ordinary runs


def test_printing_code_is_ok_with_its_stdout() -> None:
    result = run("print('hello')\nprint(6 * 7)")
    assert result.ok and result.status == "ok"
    assert result.stdout == "hello\n42\n" and result.stderr == "" and result.returncode == 0
    assert {"rlimits", "audit"} <= set(result.isolation)
    assert result.seconds < FAST.wall_seconds


def test_syntax_error_is_an_error() -> None:
    result = run("def broken(:\n    pass")
    assert result.status == "error" and not result.ok
    assert result.detail.startswith("SyntaxError")


def test_exception_is_an_error_whose_traceback_shows_the_line() -> None:
    result = run("x = 1\ny = x / 0")
    assert result.status == "error" and result.returncode == 1
    assert result.detail == "ZeroDivisionError: division by zero"
    assert "y = x / 0" in result.stderr


def test_stdin_is_the_codes_standard_input() -> None:
    result = run("print(input()[::-1])", stdin="abc\n")
    assert result.ok and result.stdout == "cba\n"


def test_the_parent_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    result = run("import os, sys; print(sorted(os.environ)); print(sys.flags.isolated, sys.flags.no_site)")
    assert result.ok and "SANDBOX_TEST_SECRET" not in result.stdout
    assert result.stdout.splitlines()[1] == "1 1"


def test_exit_code_of_the_code_is_kept() -> None:
    assert run("import sys; sys.exit(0)").ok
    result = run("import sys; sys.exit(3)")
    assert result.status == "error" and result.returncode == 3


# ---------------------------------------------------------------- resource limits


def test_infinite_loop_hits_the_cpu_limit() -> None:
    result = run("while True:\n    pass", limits=SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert result.status == "timeout" and "CPU" in result.detail
    assert result.seconds < 5


def test_sleep_hits_the_wall_clock_limit() -> None:
    result = run(
        "import time\nprint('before', flush=True)\ntime.sleep(100)", limits=SandboxLimits(wall_seconds=1)
    )
    assert result.status == "timeout" and "wall-clock" in result.detail
    assert result.seconds < 5
    assert result.stdout == "before\n"  # output printed before the kill is kept


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(2_000_000_000)", "x = []\nwhile True:\n    x.append(bytearray(10_000_000))"],
    ids=["one-allocation", "growing-list"],
)
def test_memory_hog_hits_the_memory_limit(code: str) -> None:
    result = run(code)
    assert result.status == "memory" and "256 MB" in result.detail


def test_stdout_flood_hits_the_output_limit_quickly() -> None:
    limits = SandboxLimits(wall_seconds=5, max_output_bytes=10_000)
    result = run("while True:\n    print('x' * 10000)", limits=limits)
    assert result.status == "output_limit"
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= limits.max_output_bytes
    assert result.seconds < 3


def test_huge_file_in_the_workdir_hits_the_file_size_limit() -> None:
    code = "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1_000_000)"
    result = run(code)
    assert result.status == "output_limit" and "file" in result.detail


# ---------------------------------------------------------------- denied operations


@pytest.mark.parametrize(
    ("code", "operation"),
    [
        ("import os\nwhile True:\n    os.fork()", "os.fork"),
        ("import os\nos.system('echo hi')", "os.system"),
        ("import os\nos.posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
        ("import subprocess\nsubprocess.run(['true'])", "import _posixsubprocess"),
        ("import os\nos.execv('/bin/true', ['true'])", "os.exec"),
    ],
    ids=["fork-bomb", "system", "posix_spawn", "subprocess", "exec"],
)
def test_starting_processes_is_denied(code: str, operation: str) -> None:
    result = run(code)
    assert result.status == "denied" and result.detail.startswith(operation)
    assert "hi" not in result.stdout


def test_max_processes_allows_that_many_and_no_more() -> None:
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=5, max_processes=2)
    two = "import subprocess\nfor _ in range(2):\n    subprocess.run(['true'], check=True)\nprint('ran')"
    assert run(two, limits=limits).stdout == "ran\n"
    result = run(two.replace("range(2)", "range(3)"), limits=limits)
    assert result.status == "denied" and "more than 2 processes" in result.detail


@pytest.mark.parametrize(
    "code",
    [
        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', PORT))",
        "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:PORT/', timeout=1)",
    ],
    ids=["socket", "create_connection", "urllib"],
)
def test_network_is_denied_and_the_server_sees_nothing(code: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = run(code.replace("PORT", str(port)))
    assert result.status == "denied" and result.detail.startswith("socket.")
    assert not _has_pending_connection(listener)


def test_network_true_reaches_a_local_server(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=2, network=True)
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port})).close()", limits=limits)
    assert result.ok and "netns" not in result.isolation
    assert _has_pending_connection(listener)


def test_netns_layer_is_reported_as_it_is() -> None:
    """Where the kernel lets the child enter a network namespace, its namespace differs from ours."""
    result = run("import os\nprint(os.readlink('/proc/self/ns/net'))")
    assert result.ok
    entered = result.stdout.strip() != os.readlink("/proc/self/ns/net")
    assert entered == ("netns" in result.isolation)


def test_reading_a_file_outside_the_workdir_is_denied(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden_tests.py"
    hidden.write_text("assert solve(2) == 4  # SECRET-EXPECTED-ANSWER")
    result = run(f"print(open({str(hidden)!r}).read())")
    assert result.status == "denied" and str(hidden) in result.detail
    assert "SECRET" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("import os\nprint(os.listdir(HIDDEN_DIR))", "denied"),
        ("import glob\nprint(glob.glob(HIDDEN_DIR + '/*'))", "ok"),  # glob swallows the PermissionError
        ("import os\nos.chdir(HIDDEN_DIR)\nprint(open('hidden_tests.py').read())", "denied"),
        (
            "import os\nos.symlink(HIDDEN_DIR + '/hidden_tests.py', 'link')\nprint(open('link').read())",
            "denied",
        ),
        ("print(open('/proc/self/cmdline').read())", "denied"),
    ],
    ids=["listdir", "glob", "chdir", "symlink", "cmdline"],
)
def test_ways_around_the_path_rule_see_nothing(code: str, status: str, tmp_path: Path) -> None:
    (tmp_path / "hidden_tests.py").write_text("SECRET")
    result = run(code.replace("HIDDEN_DIR", repr(str(tmp_path))))
    assert result.status == status
    assert "SECRET" not in result.stdout and "hidden_tests" not in result.stdout


def test_changing_files_outside_the_workdir_is_denied(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in (
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"import os\nos.remove({str(keep)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
    ):
        assert run(code).status == "denied", code
    assert keep.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_files_inside_the_workdir_can_be_read_written_and_imported() -> None:
    code = (
        "import helper\n"
        "print(open('data/in.txt').read())\n"
        "open('out.txt', 'w').write('written')\n"
        "print(open('out.txt').read(), helper.VALUE)"
    )
    result = run(code, files={"data/in.txt": "payload", "helper.py": "VALUE = 7"})
    assert result.ok and result.stdout == "payload\nwritten 7\n"


@pytest.mark.parametrize("module", ["ctypes", "_ctypes"])
def test_importing_ctypes_is_denied(module: str) -> None:
    result = run(f"import {module}")
    assert result.status == "denied" and result.detail.startswith(f"import {module}")


def test_signalling_the_caller_and_raising_limits_are_denied() -> None:
    assert run("import os\nos.kill(os.getppid(), 0)").status == "denied"
    result = run("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))")
    assert result.status == "denied" and "setrlimit" in result.detail


def test_a_caught_denial_does_not_end_the_run() -> None:
    result = run("try:\n    open('/etc/hostname')\nexcept PermissionError as e:\n    print('caught')")
    assert result.ok and result.stdout == "caught\n"


# ---------------------------------------------------------------- files, temp dirs, concurrency


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.txt", "a/../../escape.txt", "", "."])
def test_files_must_be_relative_paths_inside(name: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        run_python("pass", files={name: "x"})


@pytest.mark.parametrize(
    "code",
    [
        "print('ok')",
        "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a', 0)",
        "import time\ntime.sleep(100)",
        "while True:\n    print('x' * 10000)",
        "open('/etc/hostname')",
        "x = bytearray(2_000_000_000)",
    ],
    ids=["ok", "unreadable-dir", "timeout", "flood", "denied", "memory"],
)
def test_temporary_directories_are_always_removed(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run(
        code, files={"input.txt": "x"}, stdin="line\n", tests="pass", limits=SandboxLimits(wall_seconds=1)
    )
    assert result.status in {"ok", "timeout", "output_limit", "denied", "memory"}
    assert list(tmp_path.iterdir()) == []


def test_runs_from_several_threads_at_once() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: run(f"print({i} * {i})"), range(8)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu_seconds", 0),
        ("cpu_seconds", 1.5),
        ("wall_seconds", 0),
        ("wall_seconds", float("inf")),
        ("memory_mb", -1),
        ("max_processes", -1),
        ("max_output_bytes", 0),
        ("network", "no"),
        ("memory_mb", True),
    ],
)
def test_limits_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------- hidden tests


def test_tests_run_after_the_code_in_its_namespace() -> None:
    assert run("def square(x):\n    return x * x", tests="assert square(3) == 9").ok
    failed = run("def square(x):\n    return x + x", tests="assert square(3) == 9")
    assert failed.status == "error" and failed.detail == "AssertionError"


@pytest.mark.parametrize(
    "exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"]
)
def test_exiting_before_the_tests_is_not_ok(exit_call: str) -> None:
    result = run(f"def square(x):\n    return 0\n{exit_call}", tests="assert square(3) == 9")
    assert result.status == "error" and not result.ok


def test_the_code_cannot_see_the_tests() -> None:
    probe = (
        "import os, sys\n"
        "found = [repr(sys.argv), repr(getattr(sys, 'orig_argv', ''))]\n"
        "for where in ('.', '..', os.environ.get('TMPDIR', '.'), '/proc/self/cmdline', '/proc/self/environ'):\n"
        "    try:\n"
        "        found.append(repr(os.listdir(where)) if os.path.isdir(where) else open(where).read())\n"
        "    except OSError as error:\n"
        "        found.append(type(error).__name__)\n"
        "print('\\n'.join(found))\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        print(os.read(fd, 1000))\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run(probe, tests="assert True, 'SECRET-TESTS-TEXT'")
    assert result.ok
    assert "SECRET" not in result.stdout and "job" not in result.stdout


# ---------------------------------------------------------------- python_tests reward

SQUARE_TESTS = "assert square(3) == 9\nassert square(-4) == 16"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("def square(x):\n    return x * x", 1.0),
        ("Here is my answer:\n```python\ndef square(x):\n    return x ** 2\n```\nDone.", 1.0),
        ("```python\ndef square(x):\n    return x * x\n", 1.0),  # cut off before the closing fence
        ("def square(x):\n    return x + x", 0.0),
        ("def square(x):\n    return x * x\nimport sys\nsys.exit(0)", 0.0),
        ("def square(x):\n    return x *", 0.0),
        ("print(open('/proc/self/cmdline').read())\ndef square(x):\n    return x * x", 0.0),
        ("import os\nprint(os.listdir('..'))\ndef square(x):\n    return x * x", 0.0),
        ("import socket\nsocket.create_connection(('127.0.0.1', 80))\ndef square(x):\n    return x * x", 0.0),
    ],
    ids=[
        "plain",
        "fenced",
        "unclosed-fence",
        "wrong",
        "exit-early",
        "syntax",
        "cmdline",
        "listdir",
        "network",
    ],
)
def test_python_tests_reward(completion: str, expected: float) -> None:
    assert python_tests("Write square(x).", completion, tests=SQUARE_TESTS, answer="unused") == expected


@pytest.mark.parametrize("row", [{}, {"tests": None}, {"tests": "   "}])
def test_python_tests_needs_tests_in_the_row(row: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="tests"):
        python_tests("p", "def square(x):\n    return x * x", **row)


@pytest.mark.parametrize(
    ("completion", "code"),
    [
        ("print(1)", "print(1)"),
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("```py\nA\n```\ntext\n```\nB\n```", "B\n"),  # the last block is the answer
        ("```text\nnot code\n```\n```python\nprint(2)\n```", "print(2)\n"),
        ("intro\n```python\nprint(3)", "print(3)"),  # cut off by the token limit
        ("```text\nx\n```\n```python\nprint(4)", "print(4)"),
        ("```python title\nprint(5)\n```", "print(5)\n"),
        ("```bash\nls\n```", "```bash\nls\n```"),  # no python block: the whole text
    ],
)
def test_extract_python_code(completion: str, code: str) -> None:
    assert extract_python_code(completion) == code


# ---------------------------------------------------------------- python tool


def test_python_tool_has_a_schema_and_runs_code() -> None:
    from transformers.utils import get_json_schema

    tool = python_tool(FAST, files={"numbers.txt": "1 2 3"})
    schema = get_json_schema(tool)
    assert schema["function"]["name"] == "python"
    assert schema["function"]["description"] == "Run Python code in a sandbox and return its output."
    assert schema["function"]["parameters"]["required"] == ["code"]
    assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"
    assert tool("print(sum(map(int, open('numbers.txt').read().split())))") == "6\n"
    assert tool("import socket; socket.socket()").startswith("error: denied: socket.")
    assert tool("while True: pass").startswith("error: timeout:")


def test_a_python_tool_env_survives_runaway_code_and_the_guard_stops_cheating_first(tmp_path: Path) -> None:
    """A tool-using episode whose policy writes an infinite loop, a fork bomb and a read of the
    hidden tests: each call ends with a clear error observation and the episode goes on; with the
    guard the read of the hidden tests is denied before any process starts."""
    from posttrain.envs.guard import Guard
    from posttrain.envs.tools import ToolEnv

    hidden = tmp_path / "hidden_tests.py"
    hidden.write_text("assert solve() == 42\n")
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=2.0, memory_mb=256)

    class CodeEnv(ToolEnv):
        def start(self, row: dict[str, Any]) -> str:
            self.answered: str | None = None
            return "print the answer\n"

        def tools(self) -> dict[str, Any]:
            return {"python": python_tool(limits, files={"data.txt": "6 7"}), "answer": self.answer}

        def answer(self, value: str) -> str:
            """Give the final answer.

            Args:
                value: The answer.
            """
            self.answered = value
            return "done"

        def finished(self) -> bool:
            return self.answered is not None

        def outcome_reward(self) -> float:
            return float(self.answered == "42")

    env = CodeEnv()
    env.reset({}, seed=0)
    observations = [
        env.step(action + "\n").observation
        for action in (
            'python("while True: pass")',
            'python("import os\\nwhile True: os.fork()")',
            f'python("print(open({str(hidden)!r}).read())")',
            "python(\"a, b = open('data.txt').read().split()\\nprint(int(a) * int(b))\")",
        )
    ]
    assert observations[0].startswith("= error: timeout")
    assert observations[1].startswith("= error: denied")
    assert observations[2].startswith("= error: denied") and "42" not in observations[2]
    assert observations[3] == "= 42\n\n"
    final = env.step('answer("42")\n')
    assert final.done and final.reward == 1.0
    env.guard = Guard()
    env.reset({}, seed=0)
    step = env.step(f'python("print(open({str(hidden)!r}).read())")\n')
    assert step.info["guard"]["rule"] == "hidden_answer"  # denied by the rules: no process started
    assert step.observation == "= no such file\n"
