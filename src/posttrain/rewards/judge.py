"""Chat clients that ask a language model one question and return its text reply.

They are the transport under an LLM judge (is this tool call allowed? how good is this answer?):
OpenAI-style messages go in, the reply text comes out, and anything that keeps the model from
answering raises ``JudgeError`` so the caller can decide what a missing verdict means.

- ``HTTPChatClient``: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp, a hosted
  API), through the standard library only.
- ``LocalHFChatClient``: a local Hugging Face causal LM, loaded once on first use, decoded greedily.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatClient", "HTTPChatClient", "JudgeError", "LocalHFChatClient"]

_SNIPPET_CHARS = 200  # how much of an unexpected response body an error message quotes


class JudgeError(RuntimeError):
    """The judge could not answer: HTTP error, timeout, unreadable response, model failure."""


@runtime_checkable
class ChatClient(Protocol):
    """Anything that answers a list of OpenAI-style messages (``{"role": ..., "content": ...}``)."""

    def complete(self, messages: list[dict[str, str]]) -> str: ...


def check_messages(messages: Sequence[dict[str, str]]) -> None:
    """Raise ``ValueError`` unless ``messages`` is a non-empty list of ``{"role", "content"}`` strings."""
    if not messages:
        raise ValueError("messages must hold at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise ValueError(
                f"messages[{index}] must be a dict with string 'role' and 'content', got {message!r}"
            )


def _snippet(text: str) -> str:
    """``text`` on one line, shortened for an error message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[:_SNIPPET_CHARS] + "..."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPChatClient:
    """Ask an OpenAI-compatible chat endpoint; ``url`` is its base, e.g. ``http://127.0.0.1:8000/v1``.

    Each ``complete`` POSTs ``{"model", "messages", "max_tokens", "temperature"}`` to
    ``{url}/chat/completions`` and returns ``choices[0].message.content``. The bearer key is read
    from the environment variable ``api_key_env`` at each call and sent only when that variable is
    set and non-empty. ``timeout_s`` bounds the connection and each read of the response. Proxies
    from the environment are honoured except for loopback hosts, which are always reached directly.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout_s: float = 10.0,
        api_key_env: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// URL with a host, got {url!r}")
        if not model:
            raise ValueError("model must name the model the endpoint serves, got an empty string")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"HTTPChatClient(url={self.url!r}, model={self.model!r})"

    def complete(self, messages: list[dict[str, str]]) -> str:
        check_messages(messages)
        body = json.dumps(
            {
                "model": self.model,
                "messages": list(messages),
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:  # before URLError: it is a subclass
            try:
                detail = _snippet(exc.read().decode("utf-8", errors="replace"))
            except (OSError, HTTPException):  # the error body itself is unreadable: the status says enough
                detail = ""
            raise self._error(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")) from exc
        except TimeoutError as exc:
            raise self._error(f"no answer within timeout_s={self.timeout_s}") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._error(f"no answer within timeout_s={self.timeout_s}") from exc
            raise self._error(f"cannot connect: {exc.reason}") from exc
        except (OSError, HTTPException) as exc:
            raise self._error(f"connection failed: {type(exc).__name__}: {exc}") from exc
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        """``choices[0].message.content`` of a response body, or ``JudgeError`` saying what is wrong."""
        text = raw.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._error(f"response is not JSON: {_snippet(text)!r}") from exc
        if isinstance(data, dict) and "error" in data and "choices" not in data:
            raise self._error(f"endpoint returned an error: {_snippet(json.dumps(data['error']))}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise self._error(f"response has no choices[0].message.content: {_snippet(text)!r}") from exc
        if not isinstance(content, str):
            raise self._error(f"choices[0].message.content is {type(content).__name__}, not a string")
        return content

    def _error(self, cause: str) -> JudgeError:
        return JudgeError(f"judge model {self.model!r} at {self.endpoint}: {cause}")


class LocalHFChatClient:
    """Ask a local Hugging Face causal LM (a folder holding the model and its tokenizer).

    The folder is checked at construction; the model and tokenizer are loaded (offline) on the first
    ``complete`` and kept. Messages are rendered with the tokenizer's chat template (with the
    generation prompt) when it has one, else their contents are joined with newlines and a final
    newline. Decoding is greedy, so the same messages always get the same reply; the reply holds
    only the generated text, without special tokens.
    """

    def __init__(self, model_path: str | Path, *, max_new_tokens: int = 16, device: str = "cpu") -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise ValueError(f"model_path {str(model_path)!r} is not a directory holding a model")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        import torch

        try:
            torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a torch device: {exc}") from exc
        self.model_path = path
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None

    def __repr__(self) -> str:
        return f"LocalHFChatClient(model_path={str(self.model_path)!r}, device={self.device!r})"

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded (it is, from the first ``complete``)."""
        return self._model is not None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model is given for ``messages`` (loads only the tokenizer if needed)."""
        check_messages(messages)
        tokenizer = self._load_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            try:
                return str(
                    tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
                )
            except Exception as exc:  # a template may reject a role or an ordering
                raise self._error(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        return "\n".join(message["content"] for message in messages) + "\n"

    def complete(self, messages: list[dict[str, str]]) -> str:
        import torch
        from transformers import GenerationConfig

        prompt = self.render(messages)
        model, tokenizer = self._load()
        # a chat template writes its own special tokens; plain text gets the tokenizer's usual ones
        add_special = not getattr(tokenizer, "chat_template", None)
        encoded = tokenizer(prompt, add_special_tokens=add_special, return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        # a complete config, so none of the checkpoint's own sampling defaults leak in
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
        )
        try:
            with torch.no_grad():
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
        except Exception as exc:
            raise self._error(f"generation failed: {type(exc).__name__}: {exc}") from exc
        new_ids = sequences[0, input_ids.shape[1] :].tolist()
        return str(tokenizer.decode(new_ids, skip_special_tokens=True))

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            except Exception as exc:
                raise self._error(f"cannot load the tokenizer: {type(exc).__name__}: {exc}") from exc
        return self._tokenizer

    def _load(self) -> tuple[Any, Any]:
        """The model and tokenizer, loaded on the first call and kept."""
        tokenizer = self._load_tokenizer()
        if self._model is None:
            from transformers import AutoModelForCausalLM

            try:
                model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True)
                model.to(self.device)
            except Exception as exc:
                raise self._error(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
            model.eval()
            model.requires_grad_(False)
            self._model = model
        return self._model, tokenizer

    def _error(self, cause: str) -> JudgeError:
        return JudgeError(f"local judge model {str(self.model_path)!r}: {_snippet(cause)}")
