"""HTTP fuzzing of the server (issue 14): Schemathesis drives ``POST /v1/completions`` from
the server's own OpenAPI description (valid bodies and negated ones), Hypothesis throws
arbitrary JSON objects at it, and a hand-written corpus replays every hostile body found so
far. Properties, for every request: no 5xx, an answer within a bounded time, every 4xx an
OpenAI-style error body (naming the field when one field is at fault), and the server
healthy afterwards. Runs on the embedded ``tiny`` model with a short context, so valid
bodies generate at most a few tokens.

Bounded for CI (about a minute on 2 cores); ``ACTIVEPATH_FUZZ=long`` runs many more
examples locally."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from test_serving_fixtures import LiveServer

from activepath.models import embedded_path
from activepath.serving.http_guard import HttpLimits
from activepath.serving.protocol import KNOWN_FIELDS

LONG = os.environ.get("ACTIVEPATH_FUZZ") == "long"
SCHEMA_EXAMPLES = 1000 if LONG else 120
JSON_EXAMPLES = 2000 if LONG else 150
MAX_LEN = 12  # max_tokens <= 11: a valid body costs at most ~11 decode steps
BODY_LIMIT = 64 * 1024
REQUEST_BOUND_S = 10.0  # generous for a loaded 2-core CI host; a hang is minutes
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live():
    directory = embedded_path("tiny")
    limits = HttpLimits(max_body_bytes=BODY_LIMIT, header_timeout_s=5.0, body_timeout_s=5.0)
    server = LiveServer(directory, limits=limits, max_len=MAX_LEN, max_batch_size=4, served_model="tiny")
    yield server
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # healthy after everything
    server.close()


def check_answer(resp: httpx.Response | object, elapsed_s: float, body: object) -> None:
    """The properties every answer must have."""
    status = resp.status_code
    assert status < 500, f"{status} for {short_repr(body)}: {resp.text[:300]}"
    assert elapsed_s < REQUEST_BOUND_S, f"{elapsed_s:.1f} s for {short_repr(body)}"
    if status >= 400:
        error = json.loads(resp.text)["error"]  # OpenAI-style
        assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
        if status == 400 and isinstance(body, dict) and error["param"] is not None:
            assert error["param"] in {*map(str, body), "prompt"}, error  # the field at fault
        if status == 400 and isinstance(body, dict) and set(body) - KNOWN_FIELDS:
            assert error["param"] is not None, error
    else:
        assert status == 200, resp.text[:300]


def short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "…"


def post(url: str, content: bytes, headers: dict[str, str] | None = None) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = httpx.post(f"{url}/v1/completions", content=content, headers=JSON if headers is None else headers,
                      timeout=REQUEST_BOUND_S * 2)
    return resp, time.monotonic() - start


# --- schema-driven -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def completion_cases(live: LiveServer):
    """Schemathesis' strategies for the operation: bodies valid by the published schema, and
    negated ones (each violating it somewhere: wrong types, out-of-range values, extra
    fields, missing prompt). Drawn inside Hypothesis directly: ``schemathesis.pytest
    .from_fixture`` does not work with pytest 9 (it reads ``Function._nodeid``)."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operation = schema["/v1/completions"]["POST"]
    return st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))


@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=SCHEMA_EXAMPLES, derandomize=not LONG)
@given(data=st.data())
def test_schema_driven_fuzz(live: LiveServer, completion_cases, data: st.DataObject) -> None:
    case = data.draw(completion_cases)
    start = time.monotonic()
    resp = case.call(base_url=live.url, timeout=REQUEST_BOUND_S * 2)
    check_answer(resp, time.monotonic() - start, case.body)


# --- arbitrary JSON ----------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=12)
field_names = st.sampled_from(sorted(KNOWN_FIELDS)) | st.text(max_size=12)
small_valid = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20), "max_tokens": st.integers(1, 3)})
bodies = (st.dictionaries(field_names, values, max_size=6)
          | st.builds(lambda base, extra: {**base, **extra}, small_valid, st.dictionaries(field_names, values,
                                                                                         max_size=2))
          | values)


@settings(deadline=None, max_examples=JSON_EXAMPLES, suppress_health_check=list(HealthCheck), derandomize=not LONG)
@given(body=bodies)
def test_arbitrary_json_bodies(live: LiveServer, body: object) -> None:
    resp, elapsed = post(live.url, json.dumps(body).encode())
    check_answer(resp, elapsed, body)


# --- the hostile corpus ---------------------------------------------------------------------------------

HOSTILE: list[tuple[str, bytes, dict[str, str] | None, int]] = [
    ("lone surrogate", b'{"prompt": "\\ud800"}', None, 400),
    ("surrogate pair split", b'{"prompt": "a\\udc00b"}', None, 400),
    ("deep nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, 400),
    ("deep nesting in a field", b'{"prompt": "a", "user": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", None, 400),
    ("5000-digit int", b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", None, 400),
    ("huge token id", b'{"prompt": [' + b"1" * 4000 + b"]}", None, 400),
    ("NaN", b'{"prompt": "a", "temperature": NaN}', None, 400),
    ("Infinity", b'{"prompt": "a", "top_p": Infinity}', None, 400),
    ("-Infinity", b'{"prompt": "a", "max_tokens": -Infinity}', None, 400),
    ("float overflow", b'{"prompt": "a", "top_p": 1e400}', None, 400),
    ("huge max_tokens", b'{"prompt": "a", "max_tokens": 1000000000000}', None, 400),
    ("negative max_tokens", b'{"prompt": "a", "max_tokens": -1}', None, 400),
    ("zero max_tokens", b'{"prompt": "a", "max_tokens": 0}', None, 400),
    ("bool max_tokens", b'{"prompt": "a", "max_tokens": true}', None, 400),
    ("float max_tokens", b'{"prompt": "a", "max_tokens": 2.0}', None, 400),
    ("negative token id", b'{"prompt": [-1]}', None, 400),
    ("mixed prompt list", b'{"prompt": [1, "a"]}', None, 400),
    ("batch of two", b'{"prompt": ["a", "b"]}', None, 400),
    ("prompt object", b'{"prompt": {"text": "a"}}', None, 400),
    ("prompt null", b'{"prompt": null}', None, 400),
    ("no prompt", b'{"max_tokens": 2}', None, 400),
    ("model number", b'{"prompt": "a", "model": 7}', None, 400),
    ("unknown model", b'{"prompt": "a", "model": "gpt-4"}', None, 404),
    ("unknown field", b'{"prompt": "a", "max_token": 2}', None, 400),
    ("many unknown fields", json.dumps({"prompt": "a", **{f"f{i}": i for i in range(500)}}).encode(), None, 400),
    ("refused field", b'{"prompt": "a", "logprobs": 5}', None, 400),
    ("stream not bool", b'{"prompt": "a", "stream": 1}', None, 400),
    ("duplicate keys", b'{"prompt": "a", "prompt": 5}', None, 400),
    ("empty body", b"", None, 400),
    ("whitespace body", b"  \n ", None, 400),
    ("null body", b"null", None, 400),
    ("array body", b"[1, 2]", None, 400),
    ("string body", b'"prompt"', None, 400),
    ("number body", b"12", None, 400),
    ("truncated JSON", b'{"prompt": "a', None, 400),
    ("trailing garbage", b'{"prompt": "a"} x', None, 400),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', None, 400),
    ("UTF-16 body", '{"prompt": "a"}'.encode("utf-16"), None, 400),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"prompt": "a"}', None, 400),
    ("NUL in prompt", b'{"prompt": "a\\u0000b", "max_tokens": 1}', None, 200),
    ("text/plain", b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415),
    ("form", b"prompt=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("no content type", b'{"prompt": "a"}', {}, 415),
    ("bad content type", b'{"prompt": "a"}', {"Content-Type": ";;;\x7f"}, 415),
    ("oversized body", json.dumps({"prompt": "a" * (BODY_LIMIT + 10)}).encode(), None, 413),
    ("context overflow", json.dumps({"prompt": list(range(1, MAX_LEN + 1))}).encode(), None, 400),
    ("valid", b'{"prompt": "def f():", "max_tokens": 3}', None, 200),
]


@pytest.mark.parametrize("name,content,headers,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_corpus(live: LiveServer, name: str, content: bytes, headers: dict[str, str] | None,
                        status: int) -> None:
    resp, elapsed = post(live.url, content, headers)
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    check_answer(resp, elapsed, body)
    assert resp.status_code == status, resp.text[:300]
    assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
