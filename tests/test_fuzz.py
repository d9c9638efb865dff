"""A standing fuzz test of the live server, driven by its own OpenAPI document (GET /openapi.json).

Hypothesis draws requests from the document (tests/fuzz_cases.py: sane, schema-only, mutated
and raw ones, streamed and not, some abandoned by the client) and sends them in groups of one
to GROUP at once (so that they are batched together) to a server on the embedded model with
NGRAM speculation. Every answer must come within REQUEST_TIMEOUT_S, never be a 5xx, be
OpenAI's error shape when it is not a 2xx, and a 2xx must not carry an aborted choice (what an
engine step that raised reports); after each group the KV cache must be back to 0 tokens. A
failing group is shrunk to the fewest, simplest requests that still fail, and printed. At the
end /health must answer, nothing may be left in the KV cache and the server's log must hold no
traceback.

Bounded in count (SPECDEC_FUZZ_EXAMPLES groups, default 200), per request (REQUEST_TIMEOUT_S)
and in total (SPECDEC_FUZZ_BUDGET_S, default 60 s: past it the remaining examples are skipped,
and at least MIN_EXAMPLES must have run). The suite's run is derandomized (the same examples
every time); `make fuzz` runs 2000 random ones (SPECDEC_FUZZ_RANDOM=1).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from specdec.server.openapi import openapi_document

from .fuzz_cases import FORCE, SANE, SCHEMA, Case, body_strategies, cases
from .live_server import live_server

API_KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("SPECDEC_FUZZ_EXAMPLES", "200"))
BUDGET_S = float(os.environ.get("SPECDEC_FUZZ_BUDGET_S", "60"))
RANDOM = os.environ.get("SPECDEC_FUZZ_RANDOM", "") == "1"
MIN_EXAMPLES = min(EXAMPLES, 30)
REQUEST_TIMEOUT_S = 30.0  # a request answering later than this is a hang (at most 8 new tokens each)
KV_SETTLE_S = 10.0
GROUP = 4  # an example is 1-4 requests sent at once
ERROR_KEYS = {"message", "type", "param", "code"}
# what the fuzz found once, replayed first on every run
FOUND = [
    Case("POST", "/generate", b'{"sampling_params": {"max_new_tokens": 0}, "input_ids": [[], null]}', kind="found"),
    Case("POST", "/generate", b'{"input_ids": [[1, 2], 3], "sampling_params": {"max_new_tokens": 1}}', kind="found"),
]


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[str, Path]]:
    """A server of its own (NGRAM speculation, a 4096-token KV cache, an API key); its log
    goes to a file the test reads at the end."""
    log = Path(tempfile.mkstemp(prefix="specdec-fuzz-", suffix=".log")[1])
    args = ["--dtype", "float32", "--api-key", API_KEY, "--speculative-algorithm", "NGRAM",
            "--max-running-requests", "16", "--max-total-tokens", "4096", "--log-level", "warning",
            "--random-seed", "0"]
    try:
        with live_server(args, log, tries=240) as base:
            yield base, log
    finally:
        log.unlink(missing_ok=True)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def kv_used(client: httpx.Client) -> int:
    return int(client.get("/get_server_info", headers=_auth()).json()["metrics"]["kv_used_tokens"])


def wait_kv_free(client: httpx.Client, timeout_s: float = KV_SETTLE_S) -> int:
    """KV tokens in use once it reaches 0, or after `timeout_s` (aborts land a step later)."""
    end = time.monotonic() + timeout_s
    used = kv_used(client)
    while used and time.monotonic() < end:
        time.sleep(0.05)
        used = kv_used(client)
    return used


def finish_reasons(obj: Any) -> list[Any]:
    """The finish reasons in an answer or a stream event of any of the three POST routes."""
    if isinstance(obj, list):
        return [r for item in obj for r in finish_reasons(item)]
    if not isinstance(obj, dict):
        return []
    if "choices" in obj:
        return [c.get("finish_reason") for c in obj["choices"] if c.get("finish_reason") is not None]
    reason = (obj.get("meta_info") or {}).get("finish_reason")
    return [reason.get("type")] if isinstance(reason, dict) else []


def check_error_shape(r: httpx.Response, case: Case) -> None:
    try:
        body = r.json()
    except json.JSONDecodeError:
        raise AssertionError(f"{r.status_code} without a JSON body: {r.text[:300]!r} for {case!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, f"not OpenAI's error shape: {body!r} for {case!r}"
    assert err["code"] == r.status_code and isinstance(err["message"], str) and err["message"], body


def send(client: httpx.Client, case: Case) -> tuple[int, float]:
    """Send `case`, check its answer; (status, seconds)."""
    headers = {**(_auth() if case.auth else {}), **({"Content-Type": case.content_type} if case.content_type else {})}
    t0 = time.monotonic()
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S if case.give_up_s is None else case.give_up_s)
    try:
        with client.stream(case.method, case.path, content=case.body, headers=headers, timeout=timeout) as r:
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                assert r.status_code == 200, case
                check_stream(r, case, t0)
            else:
                r.read()
                if r.status_code >= 300:
                    check_error_shape(r, case)
                elif case.method == "POST" and case.path in ("/v1/chat/completions", "/v1/completions", "/generate"):
                    reasons = finish_reasons(r.json())
                    assert reasons and "abort" not in reasons, f"aborted or unfinished answer {r.text[:500]!r} for {case!r}"
    except httpx.TimeoutException:
        assert case.give_up_s is not None, f"no answer within {REQUEST_TIMEOUT_S} s: {case!r}"
        return 0, time.monotonic() - t0  # the client gave up, as planned
    elapsed = time.monotonic() - t0
    assert elapsed < REQUEST_TIMEOUT_S, f"answered after {elapsed:.1f} s: {case!r}"
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]!r} for {case!r}"
    return r.status_code, elapsed


def check_stream(r: httpx.Response, case: Case, t0: float) -> None:
    """Each event is a JSON object without an error or an abort, and the stream ends with
    [DONE]; a client that closes after `case.stream_events` events stops there."""
    events = 0
    done = False
    for line in r.iter_lines():
        assert time.monotonic() - t0 < REQUEST_TIMEOUT_S, f"stream still going after {REQUEST_TIMEOUT_S} s: {case!r}"
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r} for {case!r}"
        data = line[len("data: "):]
        assert not done, f"an event after [DONE]: {line!r}"
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        assert "error" not in event and "abort" not in finish_reasons(event), f"{event!r} for {case!r}"
        events += 1
        if case.stream_events is not None and events >= case.stream_events:
            return  # the client goes away mid-stream: leaving the block closes the connection
    assert done, f"the stream ended without [DONE]: {case!r}"


def test_the_openapi_document_describes_every_route_and_validates_sane_bodies() -> None:
    """The document is OpenAPI 3.1 with each route; the fuzz test's sane bodies are valid under
    its request schemas (so the converter reads the schema right), and the document's schemas
    accept the bodies the other tests send."""
    doc = openapi_document("0")
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/generate", "/v1/models", "/health",
            "/openapi.json"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    registry_doc = {"components": {"schemas": schemas}}

    def validator(name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **registry_doc})

    chat = validator("ChatCompletionRequest")
    chat.validate({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert not chat.is_valid({"messages": "hi"}) and not chat.is_valid({"max_tokens": 4})
    names = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
             "/generate": "GenerateRequest"}
    for overrides in (SANE, SCHEMA):
        for path, strategy in body_strategies(doc, overrides, FORCE).items():
            _all_valid(strategy, validator(names[path]))


def _all_valid(strategy: Any, check: jsonschema.Draft202012Validator) -> None:
    @settings(max_examples=40, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(body=strategy)
    def valid(body: Any) -> None:
        check.validate(body)

    valid()


@pytest.mark.parametrize(("status", "content_type", "body", "stream"), [
    (500, "application/json", b'{"error": {"message": "x", "type": "server_error", "param": null, "code": 500}}', False),
    (400, "application/json", b'{"detail": "bad"}', False),  # not OpenAI's error shape
    (404, "text/plain", b"Not Found", False),
    (200, "application/json", b'{"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}', False),
    (200, "application/json", b'{"choices": [{"index": 0, "text": "", "finish_reason": null}]}', False),
    (200, "text/event-stream", b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n', True),
    (200, "text/event-stream", b'data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n', True),
])
def test_the_checks_catch_what_they_look_for(status: int, content_type: str, body: bytes, stream: bool) -> None:
    """Each defect the fuzz test looks for fails its checks (a mock server answers)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, headers={"content-type": content_type},
                                                                   content=body))
    with httpx.Client(transport=transport, base_url="http://fuzz") as client, pytest.raises(AssertionError):
        send(client, Case("POST", "/v1/completions", b'{"prompt": "x", "stream": %s}' % (b"true" if stream else b"false")))


def test_the_checks_pass_a_sound_answer() -> None:
    ok = (b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'
          b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\ndata: [DONE]\n\n')
    transport = httpx.MockTransport(lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                                   content=ok))
    with httpx.Client(transport=transport, base_url="http://fuzz") as client:
        assert send(client, Case("POST", "/v1/completions", b'{"prompt": "x", "stream": true}'))[0] == 200


@pytest.mark.slow
def test_the_served_document_needs_the_key(fuzz_server: tuple[str, Path]) -> None:
    base, _ = fuzz_server
    assert httpx.get(f"{base}/openapi.json").status_code == 401
    r = httpx.get(f"{base}/openapi.json", headers=_auth())
    assert r.status_code == 200 and r.json()["paths"].keys() == openapi_document("0")["paths"].keys()


@pytest.mark.slow
def test_fuzz_no_5xx_no_hang_no_kv_left(fuzz_server: tuple[str, Path]) -> None:
    base, log = fuzz_server
    client = httpx.Client(base_url=base, limits=httpx.Limits(max_connections=2 * GROUP))
    document = client.get("/openapi.json", headers=_auth()).json()  # the server's own schema
    stats: collections.Counter[str] = collections.Counter()
    slowest = [0.0]
    examples = [0]
    start = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2 * REQUEST_TIMEOUT_S), database=None,
              derandomize=not RANDOM, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(group=st.lists(cases(document), min_size=1, max_size=GROUP))
    @example(group=FOUND)
    def fuzz(group: list[Case]) -> None:
        assume(time.monotonic() - start < BUDGET_S)  # past the budget: skip what is left
        with cf.ThreadPoolExecutor(len(group)) as pool:  # a group runs at once: batched together
            answers = list(pool.map(lambda c: send(client, c), group))
        for case, (status, elapsed) in zip(group, answers, strict=True):
            stats[f"{case.kind} {status or 'abandoned'}"] += 1
            slowest[0] = max(slowest[0], elapsed)
        examples[0] += 1
        left = wait_kv_free(client)
        assert left == 0, f"{left} KV tokens still in use {KV_SETTLE_S:.0f} s after {group!r}"

    fuzz()
    ran = sum(stats.values())
    took = time.monotonic() - start
    print(f"\nfuzz: {examples[0]} examples ({ran} requests) in {took:.1f} s, slowest {slowest[0]:.2f} s; "
          "statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    assert examples[0] >= MIN_EXAMPLES, f"only {examples[0]} examples ran within {BUDGET_S:.0f} s"
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    assert wait_kv_free(client) == 0
    text = log.read_text()
    assert "Traceback" not in text and "engine step failed" not in text, text[-5000:]
    assert any(k.endswith(" 200") for k in stats), stats  # the run did generate
    client.close()
