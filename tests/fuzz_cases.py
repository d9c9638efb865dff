"""What the fuzz test (tests/test_fuzz.py) sends: one HTTP request per case, drawn from the
server's own OpenAPI document (server/openapi.py, as served at /openapi.json).

Four kinds, mixed:
- sane: bodies valid under the schema with sensible values (mostly answered 200), streamed or
  not, some abandoned by the client (a stream closed after a few events, a non-streaming
  request given up after a short timeout);
- schema: anything the schema admits (random types inside `Any`, random strings and numbers);
- mutated: a sane body with one to three mutations (a wrong type, a huge or negative number,
  unicode, an empty list, an extra field, a nested object, a deleted key);
- raw: bytes that are not a valid body (malformed JSON, JSON that is not an object, deep
  nesting, NaN, lone surrogates, a wrong content type), wrong methods, unknown paths, no key.

Token counts stay tiny (at most MAX_NEW new tokens, at most MAX_CHOICES choices) so that a run
is bounded by its example count: mutations only ever put an absurd value (negative, zero, huge,
another type) into a count field, and never delete one (a chat request without max_tokens may
run to the end of the context).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .schema_strategies import ANY_JSON, SchemaStrategies

MAX_NEW = 8  # new tokens per request
MAX_CHOICES = 2  # n (and best_of up to MAX_CHOICES + 1)
VOCAB = 49152  # the embedded SmolLM2's vocabulary; ids past it are drawn by the mutations
MODEL = "SmolLM2-135M-Instruct"
POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
COUNT_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "max_new_tokens", "n", "best_of"})


@dataclass(frozen=True)
class Case:
    """One HTTP request and how the client treats its answer."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    auth: bool = True
    stream_events: int | None = None  # a stream the client closes after this many events
    give_up_s: float | None = None  # a non-streaming request the client abandons after this long
    kind: str = "sane"

    @property
    def abandoned(self) -> bool:
        return self.stream_events is not None or self.give_up_s is not None

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: enough to replay it
        body = None if self.body is None else self.body.decode("utf-8", "backslashreplace")
        return (f"Case({self.kind}: {self.method} {self.path} body={body!r} content_type={self.content_type!r} "
                f"auth={self.auth} stream_events={self.stream_events} give_up_s={self.give_up_s})")


def encode(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


# ---- sane values --------------------------------------------------------------------------------

TEXT = st.text(max_size=60)
WORDS = st.sampled_from(["Hello.", "Name three colours.", "2+2=", "Write a haiku.", "The capital of France is",
                         "{\"a\": 1}", "日本語で話して", "🙂🙃", ""])
PROMPT_TEXT = WORDS | TEXT
IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
MAYBE = st.none
FLOAT_0_2 = st.floats(0, 2)
STOP = MAYBE() | st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=2)
STOP_IDS = MAYBE() | st.lists(st.integers(0, VOCAB - 1), max_size=3)
BIAS = MAYBE() | st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
RESPONSE_FORMAT = MAYBE() | st.sampled_from([
    {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}},
])

SAMPLING: dict[str, SearchStrategy[Any]] = {
    "temperature": MAYBE() | FLOAT_0_2,
    "top_p": MAYBE() | st.floats(0.05, 1),
    "top_k": MAYBE() | st.integers(-1, 50),
    "min_p": MAYBE() | st.floats(0, 0.5),
    "frequency_penalty": MAYBE() | st.floats(-2, 2),
    "presence_penalty": MAYBE() | st.floats(-2, 2),
    "repetition_penalty": MAYBE() | st.floats(0.5, 2),
    "stop": STOP,
    "stop_token_ids": STOP_IDS,
    "seed": MAYBE() | st.integers(0, 2**32),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "logit_bias": BIAS,
}
SGLANG_ONLY: dict[str, SearchStrategy[Any]] = {
    "regex": st.sampled_from(["[a-z]+", "(yes|no)", "[0-9]{1,3}"]),
    "json_schema": st.just('{"type": "object"}'),
}
SAMPLING_PARAMS = st.fixed_dictionaries({"max_new_tokens": st.integers(0, MAX_NEW)},
                                        optional={**SAMPLING, **SGLANG_ONLY})


def _shared(struct: str) -> dict[str, SearchStrategy[Any]]:
    """Overrides common to the chat and completion bodies."""
    s = {f"{struct}.{k}": v for k, v in SAMPLING.items() if k != "logit_bias"}
    s.update({
        f"{struct}.model": st.sampled_from([None, MODEL, "default"]),
        f"{struct}.max_tokens": st.integers(1, MAX_NEW),
        f"{struct}.n": st.integers(1, MAX_CHOICES),
        f"{struct}.logit_bias": BIAS,
        f"{struct}.user": MAYBE() | st.text(max_size=10),
    })
    return s


SANE: dict[str, SearchStrategy[Any]] = {
    **_shared("ChatCompletionRequest"),
    **_shared("CompletionRequest"),
    "ChatCompletionRequest.messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]),
         "content": PROMPT_TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": PROMPT_TEXT}),
                                           min_size=1, max_size=2)}), min_size=1, max_size=3),
    "ChatCompletionRequest.max_completion_tokens": MAYBE() | st.integers(1, MAX_NEW),
    "ChatCompletionRequest.top_logprobs": MAYBE() | st.integers(0, 5),
    "ChatCompletionRequest.tools": MAYBE() | st.just([TOOL]),
    "ChatCompletionRequest.tool_choice": st.sampled_from(
        [None, "auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
    "ChatCompletionRequest.response_format": RESPONSE_FORMAT,
    "CompletionRequest.prompt": PROMPT_TEXT | IDS | st.lists(PROMPT_TEXT, min_size=1, max_size=2)
    | st.lists(IDS, min_size=1, max_size=2),
    "CompletionRequest.logprobs": MAYBE() | st.integers(0, 5),
    "CompletionRequest.best_of": MAYBE() | st.integers(1, MAX_CHOICES + 1),
    "CompletionRequest.suffix": st.none(),
    "GenerateRequest.text": MAYBE() | PROMPT_TEXT | st.lists(PROMPT_TEXT, min_size=1, max_size=2),
    "GenerateRequest.input_ids": MAYBE() | IDS | st.lists(IDS, min_size=1, max_size=2),
    "GenerateRequest.sampling_params": SAMPLING_PARAMS,
    "GenerateRequest.logprob_start_len": st.integers(-1, 8),
    "GenerateRequest.top_logprobs_num": st.integers(0, 5),
    "GenerateRequest.rid": MAYBE() | st.uuids().map(str),
}
FORCE = frozenset({"ChatCompletionRequest.max_tokens", "CompletionRequest.max_tokens",
                   "GenerateRequest.sampling_params"})

# schema kind: anything the schema admits, but a count is tiny or absurd (refused at once)
COUNT = st.integers(-(2**63), MAX_NEW) | st.integers(10**7, 2**64)
SCHEMA: dict[str, SearchStrategy[Any]] = {
    "ChatCompletionRequest.max_tokens": COUNT,
    "ChatCompletionRequest.max_completion_tokens": MAYBE() | COUNT,
    "ChatCompletionRequest.n": st.integers(-(2**63), MAX_CHOICES) | st.integers(33, 2**64),
    "CompletionRequest.max_tokens": COUNT,
    "CompletionRequest.n": st.integers(-(2**63), MAX_CHOICES) | st.integers(33, 2**64),
    "CompletionRequest.best_of": MAYBE() | st.integers(-(2**63), MAX_CHOICES + 1) | st.integers(33, 2**64),
    "GenerateRequest.sampling_params": st.fixed_dictionaries(
        {"max_new_tokens": COUNT}, optional={k: ANY_JSON for k in [*SAMPLING, *SGLANG_ONLY]}),
}


def body_strategies(document: Mapping[str, Any], overrides: Mapping[str, SearchStrategy[Any]],
                    force: frozenset[str] = FORCE) -> dict[str, SearchStrategy[Any]]:
    """Each POST route's request-body strategy, from the document's requestBody schemas."""
    schemas = SchemaStrategies(document["components"]["schemas"], overrides, force)
    out = {}
    for path in POST_PATHS:
        body_schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        out[path] = schemas.schema(body_schema)
    return out


# ---- mutations ----------------------------------------------------------------------------------

JUNK: SearchStrategy[Any] = st.sampled_from([
    -1, 0, -(2**63) - 1, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 1e-308, 0.5, -0.0, True, False, None,
    "", "💥" * 50, "\x00", "\u202e\u200b", "null", "1", [], [[]], {}, {"a": {"b": {"c": [1, {"d": None}]}}},
    [None, "x", 1], "a" * 5000,
]) | ANY_JSON


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (dict keys and list indices), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        value = value[k]
    return value


@st.composite
def mutated(draw: st.DrawFn, sane: SearchStrategy[Any]) -> Any:
    """A sane body with one to three mutations (on copies: drawn values may be shared constants)."""
    body = copy.deepcopy(draw(sane))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(body)
        op = draw(st.sampled_from(["replace", "replace", "delete", "extra", "wrap"]))
        if op == "extra" or not paths:
            objects = [()] + [p for p in paths if isinstance(_get(body, p), dict)]
            target = _get(body, draw(st.sampled_from(objects)))
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=10))] = copy.deepcopy(draw(JUNK))
            continue
        path = draw(st.sampled_from(paths))
        parent, key = _get(body, path[:-1]), path[-1]
        if key in COUNT_FIELDS:
            parent[key] = copy.deepcopy(draw(st.sampled_from([-1, 0, -(2**63), 2**64, 10**12, "8", 8.5, [], {}])))
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        else:
            parent[key] = copy.deepcopy(draw(JUNK))
    return body


# ---- raw requests ---------------------------------------------------------------------------------

RAW_BODIES = st.sampled_from([
    b"", b"{", b"}", b"[]", b"null", b"123", b'"text"', b"{}", b'{"messages": NaN}', b'{"prompt": Infinity}',
    b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"text": "\\udfff\\ud800", "sampling_params": {"max_new_tokens": 2}}',
    b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}',
    b'{"prompt": "a", "max_tokens": 2, "max_tokens": 3}', b"\xff\xfe\x00", b'{"prompt": "\xc3\x28"}',
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b'{"prompt": "x"} trailing',
]) | st.binary(max_size=64)
CONTENT_TYPES = st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                                 "application/problem+json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data", "APPLICATION/JSON"])
ALL_PATHS = [*POST_PATHS, "/v1/models", "/health", "/get_server_info", "/get_model_info", "/metrics",
             "/openapi.json"]


@st.composite
def raw_case(draw: st.DrawFn) -> Case:
    choice = draw(st.integers(0, 3))
    if choice == 0:  # bytes that are not a valid body
        return Case("POST", draw(st.sampled_from(POST_PATHS)), draw(RAW_BODIES), draw(CONTENT_TYPES), kind="raw")
    if choice == 1:  # a method a route does not take, or a route that does not exist
        path = draw(st.sampled_from(ALL_PATHS) | st.from_regex(r"\A/[a-z0-9_./-]{0,24}\Z"))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
        return Case(method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None, kind="raw")
    if choice == 2:  # no API key
        return Case(draw(st.sampled_from(["GET", "POST"])), draw(st.sampled_from(ALL_PATHS)), b"{}", auth=False,
                    kind="raw")
    # a GET route with a junk query string
    query = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=30))
    return Case("GET", draw(st.sampled_from(ALL_PATHS[3:])) + "?" + query, None, None, kind="raw")


# ---- cases --------------------------------------------------------------------------------------


@st.composite
def body_case(draw: st.DrawFn, path: str, body: Any, kind: str) -> Case:
    """A POST of `body`; a sane one may be a stream the client closes after a few events, or a
    plain request it gives up on after a short timeout."""
    stream_events = give_up_s = None
    if kind == "sane" and isinstance(body, dict):
        client = draw(st.sampled_from(["read", "close_stream", "read", "give_up"]))
        if client == "close_stream":
            body = {**body, "stream": True}
            stream_events = draw(st.integers(0, 3))
        elif client == "give_up":
            body = {**body, "stream": False}
            give_up_s = draw(st.sampled_from([0.05, 0.2, 0.6]))
    return Case("POST", path, encode(body), stream_events=stream_events, give_up_s=give_up_s, kind=kind)


def cases(document: Mapping[str, Any]) -> SearchStrategy[Case]:
    """Every kind of case, sane ones the most often."""
    sane = body_strategies(document, SANE)
    schema = body_strategies(document, SCHEMA)

    @st.composite
    def one(draw: st.DrawFn) -> Case:
        kind = draw(st.sampled_from(["raw", "schema", "mutated", "sane", "raw", "mutated", "sane", "sane"]))
        if kind == "raw":
            return draw(raw_case())
        path = draw(st.sampled_from(POST_PATHS))
        body = draw({"sane": sane[path], "schema": schema[path], "mutated": mutated(sane[path])}[kind])
        return draw(body_case(path, body, kind))

    return one()
