"""Shared fixtures: one thread per test process, offline HF, a tiny model + tokenizer built once per session."""

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from posttrain.models.tiny import build_tiny_model

# Tiny models: one thread avoids oversubscription stalls when test processes share few cores.
torch.set_num_threads(1)


def arithmetic_corpus() -> list[str]:
    sums = [f"{a}+{b}={a + b}" for a in range(0, 100, 7) for b in range(0, 100, 9)]
    return sums + ["What is 12 plus 3? The answer is 15.", "Compute: 7 + 8 = 15"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model",
        arithmetic_corpus(),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


@dataclass
class FakeChatServer:
    """A minimal OpenAI-compatible chat server on 127.0.0.1; records each request it gets."""

    server: ThreadingHTTPServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    content: str = "DENY"
    status: int = 200
    raw_body: bytes | None = None  # sent as is instead of a chat completion when set
    delay_s: float = 0.0
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}/v1"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout test) makes the late write fail: expected


@pytest.fixture
def chat_server() -> Iterator[FakeChatServer]:
    state: FakeChatServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            state.requests.append(
                {"path": self.path, "headers": dict(self.headers.items()), "body": json.loads(body)}
            )
            if state.delay_s:
                state.release.wait(state.delay_s)
            if state.raw_body is not None:
                payload = state.raw_body
            else:
                payload = json.dumps(
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": state.content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), Handler)
    state = FakeChatServer(server=server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
