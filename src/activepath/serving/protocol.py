"""The OpenAI completions protocol: validating a request body and shaping responses.

Every user mistake becomes a ``RequestError`` with an HTTP status and a message naming
the bad field; nothing here touches the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

_IGNORED = {"temperature", "top_p", "user", "presence_penalty", "frequency_penalty", "seed", "suffix", "logprobs",
            "echo", "best_of", "logit_bias", "stream_options"}
_KNOWN = _IGNORED | {"model", "prompt", "max_tokens", "stream", "n", "stop"}
DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A request the server refuses: ``status`` 4xx, OpenAI-style ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """A validated request: ``prompt`` is text or token ids. Decoding is greedy."""

    model: str
    prompt: str | tuple[int, ...]
    max_tokens: int
    stream: bool


def parse_completion(body: object, *, served_model: str, max_len: int, vocab_size: int) -> CompletionRequest:
    """Validate a decoded JSON body. Raises ``RequestError`` (400, or 404 for the model)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise RequestError(400, f"unsupported fields: {unknown}", param=unknown[0])
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    if model != served_model:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                           param="model", code="model_not_found")
    _check_unsupported(body)
    return CompletionRequest(model=model, prompt=_prompt(body.get("prompt"), vocab_size),
                             max_tokens=_max_tokens(body.get("max_tokens", DEFAULT_MAX_TOKENS), max_len),
                             stream=_flag(body.get("stream", False), "stream"))


def _prompt(prompt: object, vocab_size: int) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(400, "'prompt' is empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(400, f"token ids must lie in [0, {vocab_size}), got {bad[:5]}", param="prompt")
        return tuple(prompt)
    raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of token ids "
                            "(batches of more than one prompt are not supported)", param="prompt")


def _max_tokens(value: object, max_len: int) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'max_tokens' must be an integer, got {value!r}", param="max_tokens")
    if not 1 <= value < max_len:
        raise RequestError(400, f"'max_tokens' must lie in [1, {max_len - 1}], got {value}", param="max_tokens")
    return value


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be a boolean, got {value!r}", param=name)
    return value


def _check_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError(400, f"only n=1 is supported, got {n!r}", param="n")
    if body.get("stop") not in (None, [], ""):
        raise RequestError(400, "'stop' sequences are not supported", param="stop")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise RequestError(400, f"'temperature' must be a number >= 0, got {temperature!r}", param="temperature")


def context_error(prompt_tokens: int, max_tokens: int, max_len: int) -> RequestError:
    return RequestError(400, f"this model's context is {max_len} tokens; the prompt has {prompt_tokens} and "
                             f"max_tokens is {max_tokens}", param="prompt", code="context_length_exceeded")


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
                     created: int | None = None) -> dict[str, Any]:
    """One streamed chunk, or (with usage added by the caller) the whole response."""
    return {"id": request_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
