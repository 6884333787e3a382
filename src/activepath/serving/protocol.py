"""The OpenAI completions protocol: decoding and validating a request body, the request
schema published in OpenAPI, and shaping responses.

Every user mistake becomes a ``RequestError`` with an HTTP status and a message naming
the bad field; nothing here touches the model. Fields are honoured, accepted only at a
value that changes nothing (e.g. ``echo: false``), or refused: never silently ignored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16
_NUMBER = (int, float)


class RequestError(Exception):
    """A request the server refuses: ``status`` 4xx (or 5xx), OpenAI-style ``code``."""

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


def short(value: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: error messages must not echo a megabyte back."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def decode_json(raw: bytes) -> object:
    """The body as JSON. Refuses (400) anything but UTF-8 (RFC 8259; ``json.loads`` would
    take UTF-16/32 bytes too), invalid JSON, NaN/Infinity, numbers out of range and nesting
    deeper than the decoder's recursion limit."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply to be a completion request") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int over the digit limit
        raise RequestError(400, f"the request body is not valid JSON: {short(str(exc), 200)}") from None


def _refuse_constant(name: str) -> float:
    raise RequestError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(400, f"the number {short(text)} is out of range for a double")
    return value


# Fields accepted only at the value that changes nothing (decoding is greedy, one choice,
# no logprobs): anything else is refused until the server implements it.
_NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,), "suffix": (None, ""),
    "stop": (None, "", []), "logit_bias": (None, {}), "stream_options": (None,),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}
_WHY_REFUSED = {
    "n": "only one choice per request (n=1) is supported", "best_of": "only best_of=1 is supported",
    "echo": "echo is not supported", "logprobs": "logprobs are not supported", "suffix": "suffix is not supported",
    "stop": "'stop' sequences are not supported", "logit_bias": "logit_bias is not supported",
    "stream_options": "stream_options are not supported",
    "presence_penalty": "penalties are not supported (only 0)", "frequency_penalty": "penalties are not supported (only 0)",
}
_HONOURED = ("model", "prompt", "max_tokens", "stream")
_NO_EFFECT = ("temperature", "top_p", "seed", "user")  # validated; greedy decoding makes them change nothing
KNOWN_FIELDS = frozenset((*_HONOURED, *_NO_EFFECT, *_NO_OP_VALUES))
SEED_RANGE = (-(2**63), 2**64 - 1)


def parse_completion(body: object, *, served_model: str, max_len: int, vocab_size: int) -> CompletionRequest:
    """Validate a decoded JSON body. Raises ``RequestError`` (400, or 404 for the model)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        names = [short(name, 40) for name in unknown[:5]]
        raise RequestError(400, f"unsupported fields: {', '.join(names)}", param=unknown[0][:100])
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    if model != served_model:
        raise RequestError(404, f"the model {short(model)} does not exist; this server serves {served_model!r}",
                           param="model", code="model_not_found")
    _check_no_op_fields(body)
    _check_no_effect_fields(body)
    return CompletionRequest(model=model, prompt=_prompt(body.get("prompt"), vocab_size),
                             max_tokens=_max_tokens(body.get("max_tokens"), max_len),
                             stream=_flag(body.get("stream", False), "stream"))


def _check_no_op_fields(body: dict[str, Any]) -> None:
    for name, allowed in _NO_OP_VALUES.items():
        value = body.get(name)
        # type-exact: True == 1 and 0.0 == 0 in Python, but `n: true` is not `n: 1`
        if not any(type(value) is type(ok) and value == ok for ok in allowed):
            shown = ", ".join("null" if ok is None else json.dumps(ok) for ok in allowed)
            raise RequestError(400, f"{_WHY_REFUSED[name]}: '{name}' may only be {shown}, got {short(value)}",
                               param=name)


def _check_no_effect_fields(body: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise RequestError(400, f"'temperature' must be a number in [0, 2], got {short(temperature)}",
                           param="temperature")
    if temperature:  # sampling would change the output; decoding here is greedy
        raise RequestError(400, f"decoding is greedy: 'temperature' must be 0 (or omitted), got {temperature}",
                           param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise RequestError(400, f"'top_p' must be a number in (0, 1], got {short(top_p)}", param="top_p")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise RequestError(400, f"'seed' must be an integer in [-2**63, 2**64 - 1], got {short(seed)}", param="seed")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(400, f"'user' must be a string, got {short(user)}", param="user")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _prompt(prompt: object, vocab_size: int) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(400, "'prompt' is empty", param="prompt")
        _check_encodable(prompt)
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(400, f"token ids must lie in [0, {vocab_size}), got {short(bad[:5])}", param="prompt")
        return tuple(prompt)
    raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of token ids "
                            "(batches of more than one prompt are not supported)", param="prompt")


def _check_encodable(prompt: str) -> None:
    """JSON lets a string hold a lone UTF-16 surrogate (``"\\ud800"``); no tokenizer can."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(400, f"'prompt' holds a lone surrogate {prompt[exc.start]!r} at index {exc.start}; "
                                "text must be valid Unicode", param="prompt") from None


def _max_tokens(value: object, max_len: int) -> int:
    if value is None:  # OpenAI's default, cut to a context shorter than it (found by the fuzzer)
        return min(DEFAULT_MAX_TOKENS, max_len - 1)
    if not _is_int(value):
        raise RequestError(400, f"'max_tokens' must be an integer, got {short(value)}", param="max_tokens")
    if not 1 <= value < max_len:
        raise RequestError(400, f"'max_tokens' must lie in [1, {max_len - 1}], got {short(value)}",
                           param="max_tokens")
    return value


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be a boolean, got {short(value)}", param=name)
    return value


def context_error(prompt_tokens: int, max_tokens: int, max_len: int) -> RequestError:
    return RequestError(400, f"this model's context is {max_len} tokens; the prompt has {prompt_tokens} and "
                             f"max_tokens is {max_tokens}", param="prompt", code="context_length_exceeded")


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
                     created: int | None = None) -> dict[str, Any]:
    """One streamed chunk, or (with usage added by the caller) the whole response."""
    return {"id": request_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}


def completion_schema(served_model: str, max_len: int) -> dict[str, Any]:
    """The request body's JSON Schema, published in OpenAPI for clients and the fuzzer. The
    handler does not rely on it: ``parse_completion`` validates every body itself."""
    nothing = {"type": "null"}

    def const(*values: object) -> dict[str, Any]:
        return {"enum": list(values)}

    tokens = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    text = {"type": "string", "minLength": 1}
    props: dict[str, Any] = {
        "model": {"type": "string", "enum": [served_model]},
        "prompt": {"anyOf": [text, tokens, {"type": "array", "minItems": 1, "maxItems": 1, "items": text},
                             {"type": "array", "minItems": 1, "maxItems": 1, "items": tokens}]},
        "max_tokens": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_len - 1}, nothing]},
        "stream": {"anyOf": [{"type": "boolean"}, nothing]},
        "temperature": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 0}, nothing]},
        "top_p": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, nothing]},
        "seed": {"anyOf": [{"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}, nothing]},
        "user": {"anyOf": [{"type": "string"}, nothing]},
    }
    for name, allowed in _NO_OP_VALUES.items():
        unique = {json.dumps(value): value for value in allowed}  # 0 and 0.0 are one JSON value
        props[name] = const(*unique.values())
    return {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": props}
