import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.rewards.judge import ChatClient, HTTPChatClient, JudgeError, LocalHFChatClient

MESSAGES = [
    {"role": "system", "content": "Answer ALLOW or DENY."},
    {"role": "user", "content": "Tool call: read_file('tests/test_hidden.py')"},
]


# --- HTTPChatClient -----------------------------------------------------------------------------


def test_http_client_posts_openai_request_and_returns_content(
    chat_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    chat_server.content = "ALLOW, the call is harmless."
    client = HTTPChatClient(chat_server.base_url + "/", "judge-7b", max_tokens=8, temperature=0.5)
    assert isinstance(client, ChatClient)

    assert client.complete(MESSAGES) == "ALLOW, the call is harmless."

    (request,) = chat_server.requests
    assert request["path"] == "/v1/chat/completions"  # the trailing slash of the base url is dropped
    assert request["body"] == {
        "model": "judge-7b",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0.5,
    }
    headers = {name.lower(): value for name, value in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers


def test_http_client_sends_bearer_key_only_when_env_var_is_set(
    chat_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    client = HTTPChatClient(chat_server.base_url, "judge", api_key_env="JUDGE_TEST_KEY")
    client.complete(MESSAGES)
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123")
    client.complete(MESSAGES)  # the key is read at call time

    without, with_key = (
        {name.lower(): value for name, value in request["headers"].items()}
        for request in chat_server.requests
    )
    assert "authorization" not in without
    assert with_key["authorization"] == "Bearer sk-test-123"


def test_http_client_returns_content_verbatim(chat_server: Any) -> None:
    chat_server.content = "  DENY\n"
    assert HTTPChatClient(chat_server.base_url, "judge").complete(MESSAGES) == "  DENY\n"


def test_http_error_status_raises_judge_error_naming_endpoint_and_status(
    chat_server: Any,
) -> None:
    chat_server.status = 500
    chat_server.raw_body = b'{"error": {"message": "model overloaded"}}'
    client = HTTPChatClient(chat_server.base_url, "judge-7b")
    with pytest.raises(JudgeError) as info:
        client.complete(MESSAGES)
    message = str(info.value)
    assert "\n" not in message
    assert "judge-7b" in message and f"{chat_server.base_url}/chat/completions" in message
    assert "500" in message and "model overloaded" in message


def test_non_json_body_raises_judge_error(chat_server: Any) -> None:
    chat_server.raw_body = b"<html>gateway says hello</html>"
    with pytest.raises(JudgeError, match="not JSON.*gateway says hello"):
        HTTPChatClient(chat_server.base_url, "judge").complete(MESSAGES)


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": []}',
        b'{"choices": [{"message": {"role": "assistant"}}]}',
        b'{"choices": [{"message": {"role": "assistant", "content": null}}]}',
        b"[1, 2]",
        b'{"error": {"message": "unknown model"}}',
    ],
)
def test_json_without_content_raises_judge_error(chat_server: Any, body: bytes) -> None:
    chat_server.raw_body = body
    client = HTTPChatClient(chat_server.base_url, "judge")
    with pytest.raises(JudgeError, match=f"'judge' at {client.endpoint}: .*(content|error)"):
        client.complete(MESSAGES)


def test_slow_server_raises_judge_error_after_timeout(chat_server: Any) -> None:
    chat_server.delay_s = 5.0
    client = HTTPChatClient(chat_server.base_url, "judge", timeout_s=0.3)
    start = time.perf_counter()
    with pytest.raises(JudgeError, match="timeout_s=0.3"):
        client.complete(MESSAGES)
    assert time.perf_counter() - start < 2.0


def test_closed_port_raises_judge_error() -> None:
    # A bound socket that never listens: connecting to it is refused, and no other process can
    # take the port while the test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = HTTPChatClient(f"http://127.0.0.1:{port}/v1", "judge", timeout_s=2.0)
        with pytest.raises(JudgeError, match=f"127.0.0.1:{port}.*cannot connect"):
            client.complete(MESSAGES)


@pytest.mark.parametrize("url", ["ftp://example.com/v1", "127.0.0.1:8000/v1", "", "http:///v1"])
def test_bad_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        HTTPChatClient(url, "judge")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timeout_s": 0.0}, "timeout_s"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_settings_raise_value_error(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        HTTPChatClient("http://127.0.0.1:1/v1", "judge", **kwargs)


def test_malformed_messages_raise_value_error_before_any_request(chat_server: Any) -> None:
    client = HTTPChatClient(chat_server.base_url, "judge")
    with pytest.raises(ValueError, match="at least one"):
        client.complete([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        client.complete([{"role": "user"}])
    assert chat_server.requests == []


# --- LocalHFChatClient --------------------------------------------------------------------------


def test_local_client_is_lazy_deterministic_and_returns_only_new_text(tiny_model_dir: Path) -> None:
    client = LocalHFChatClient(tiny_model_dir, max_new_tokens=6)
    assert isinstance(client, ChatClient)
    assert not client.loaded

    first = client.complete(MESSAGES)
    assert client.loaded
    assert isinstance(first, str)
    assert client.complete(MESSAGES) == first  # greedy

    # the tiny tokenizer has no chat template: contents joined by newlines, then a newline
    prompt = client.render(MESSAGES)
    assert prompt == "Answer ALLOW or DENY.\nTool call: read_file('tests/test_hidden.py')\n"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert first == expected


def test_local_client_uses_the_chat_template_when_there_is_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer.save_pretrained(folder)

    client = LocalHFChatClient(folder, max_new_tokens=4)
    assert client.render(MESSAGES) == (
        "[system] Answer ALLOW or DENY.\n[user] Tool call: read_file('tests/test_hidden.py')\n[assistant] "
    )
    assert not client.loaded  # rendering needs only the tokenizer
    reply = client.complete(MESSAGES)
    assert isinstance(reply, str) and reply == client.complete(MESSAGES)


def test_local_client_missing_path_raises_value_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        LocalHFChatClient(missing)


def test_local_client_unloadable_folder_raises_judge_error(tmp_path: Path) -> None:
    client = LocalHFChatClient(tmp_path)  # exists, but holds no model
    with pytest.raises(JudgeError, match=str(tmp_path)):
        client.complete(MESSAGES)
    assert not client.loaded
