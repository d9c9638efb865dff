"""A live server on localhost (the embedded model) driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import specdec

from .live_server import free_port, live_server

pytestmark = pytest.mark.slow

API_KEY = "sk-test-123"
PROMPTS = [f"Name {n} colours." for n in range(1, 17)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ["--dtype", "float32", "--api-key", API_KEY, "--speculative-algorithm", "NGRAM",
            "--max-running-requests", "16", "--max-total-tokens", "4096", "--log-level", "warning",
            "--random-seed", "0"]
    with live_server(args, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)


@pytest.fixture(scope="module")
def offline() -> Any:
    return specdec.Engine(dtype="float32", max_total_tokens=4096, log_level="warning")


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _chat_ids(engine: Any, text: str) -> list[int]:
    from specdec.server.chat_template import load_chat_template

    prompt = load_chat_template(None, engine.model_path).render([{"role": "user", "content": text}])
    return engine.encode(prompt)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_chat_matches_offline_engine(client: openai.OpenAI, offline: Any) -> None:
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=MAX_TOKENS, temperature=0,
    )
    ref = offline.generate(input_ids=_chat_ids(offline, PROMPTS[0]),
                           sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert r.choices[0].message.content == ref["text"]
    assert r.usage is not None and r.usage.completion_tokens == len(ref["output_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    meta: Any = r.metadata or {}  # SGLang-style per-request speculative figures
    assert int(meta["spec_verify_ct"]) >= 1


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert text and usage is not None and usage.completion_tokens > 0
    assert reasons in (["stop"], ["length"])


def test_a_stream_with_a_stop_string_adds_up_to_the_plain_answer(client: openai.OpenAI) -> None:
    """Stream deltas come from the request's incremental text (no re-decode); a stop string's
    start is held back and never sent, and the deltas add up to the non-streamed answer."""
    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "prompt": "Write a list of ten fruits:\n1.",
                          "max_tokens": 48, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip()
    plain = client.completions.create(**kw, stop=[stop]).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True)
                       if c.choices)
    assert plain.finish_reason == "stop" and plain.text == full[: full.find(stop)]
    assert streamed == plain.text


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_required_or_named_returns_valid_calls(client: openai.OpenAI, choice: Any) -> None:
    """Constrained to calls of the listed functions with valid arguments (the grammar masks every
    draft token too: the fixture speculates), answered as tool_calls, streamed in one delta."""
    import jsonschema

    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 60, "temperature": 0, "tools": TOOLS,
                          "tool_choice": choice,
                          "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and msg.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    streamed: list[Any] = []
    content = ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            streamed += ch.delta.tool_calls or []
    assert content == ""
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(msg.tool_calls)]


def test_a_conversation_with_tool_results_is_answered(client: openai.OpenAI) -> None:
    """The tool role and an assistant's tool_calls go through the embedded model's tool template;
    with tool_choice auto the answer is content or calls of the listed functions."""
    messages: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=TOOLS,
                                       max_tokens=24, temperature=0)
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls
    for call in msg.tool_calls or []:
        assert call.function.name in {"get_weather", "get_time"}
        json.loads(call.function.arguments)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_no_max_tokens_means_what_the_kv_cache_can_hold(server: str) -> None:
    """The fixture's KV (4096 tokens) is smaller than the model's context (8192): a request
    without max_tokens is bounded by the KV, not refused for the context."""
    r = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=60,
                   json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": None, "temperature": 0, "stop": [" 9"]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_a_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    """The prefix cache: the second request of a long prompt takes its pages from the first
    (usage.prompt_tokens_details.cached_tokens, as OpenAI reports it) and answers the same."""
    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 6, "temperature": 0,
                          "prompt": "A long preamble that several requests share. " * 10 + "Now, a question:"}
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 16 > 0


def test_completions_with_echo_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                  max_tokens=5, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text.startswith("The capital of France is")
    assert choice.logprobs is not None
    lps = choice.logprobs.token_logprobs or []
    assert lps[0] is None and all(lp is not None and lp <= 0 for lp in lps[1:])
    r2 = client.completions.create(model="SmolLM2-135M-Instruct", prompt=[504, 3575, 282], max_tokens=3,
                                   temperature=0)
    assert r2.usage is not None and r2.usage.prompt_tokens == 3


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 3
    # greedy: the chosen token is the most likely one
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5)


def test_native_generate_and_server_info(server: str) -> None:
    r = httpx.post(f"{server}/generate", headers=_headers(), timeout=60,
                   json={"text": "Hello", "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    body = r.json()
    assert r.status_code == 200 and body["meta_info"]["completion_tokens"] == 4
    info = httpx.get(f"{server}/get_server_info", headers=_headers()).json()
    assert "avg_spec_accept_length" in info and info["port"] > 0
    metrics = httpx.get(f"{server}/metrics", headers=_headers()).text
    assert "sglang:spec_accept_length" in metrics and "sglang:num_running_reqs" in metrics


def test_sixteen_concurrent_streams_equal_offline(server: str, offline: Any) -> None:
    def run(prompt: str) -> str:
        c = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
        s = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}],
                                      max_tokens=MAX_TOKENS, temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, PROMPTS))
    refs = offline.generate(input_ids=[_chat_ids(offline, p) for p in PROMPTS],
                            sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert texts == [r["text"] for r in refs]


def _kv_used(server: str) -> int:
    return int(httpx.get(f"{server}/get_server_info", headers=_headers()).json()["metrics"]["kv_used_tokens"])


def test_aborted_stream_frees_kv(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=_headers(), timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell a long story."}],
                            "max_tokens": 2000, "stream": True, "ignore_eos": True}) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 6:
                break  # the client goes away mid-stream
    for _ in range(100):
        if _kv_used(server) == 0:
            break
        time.sleep(0.1)
    assert _kv_used(server) == 0


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/generate"])
def test_a_non_streaming_request_whose_client_leaves_is_aborted(server: str, route: str) -> None:
    body: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 600, "ignore_eos": True}
        if route.startswith("/v1") else
        {"text": "Tell a long story.", "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}})
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes its socket
        httpx.post(f"{server}{route}", headers=_headers(), json=body, timeout=2)
    t0 = time.monotonic()
    while _kv_used(server) > 0 and time.monotonic() - t0 < 3:
        time.sleep(0.1)
    assert _kv_used(server) == 0, "the request kept running after its client left"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, 400, "max_tokens"),
        ({"max_tokens": 5}, 400, None),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 33}, 400, "n"),
        # issue 21: refused by name, not silently ignored
        ({"messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "not a name", "parameters": {}}}]}, 400, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "tool_choice": "required",
          "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
         400, "response_format"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "structural_tag"}}, 400,
         "response_format"),
        # structured outputs: a schema that does not compile, or no schema, is a 400 naming the field
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
          "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}}},
         400, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
          "response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, 400, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 500}}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"five": 1}}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logit_bias": {"99999999": 1}}, 400,
         "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "min_p": 2}, 400, "min_p"),
        ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 3}, 400, "frequency_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, 400, "repetition_penalty"),
        # issue 19: images need --enable-multimodal (this server's SmolLM2 is text only)
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, 400, "messages"),
    ],
)
def test_bad_requests_get_errors_and_server_survives(server: str, body: Any, status: int, param: str | None) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(), json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param
    assert httpx.get(f"{server}/health").status_code == 200


def test_malformed_json_and_oversize_body(server: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", headers={**_headers(), "content-type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (9 * 1024 * 1024) + b'"}]}'
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(), content=big, timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # issue 21: each of these ran (or hung) instead of being refused up front
        ({"text": "a", "return_logprob": True, "top_logprobs_num": 100000,
          "sampling_params": {"max_new_tokens": 2}}, "top_logprobs_num"),
        ({"text": ["a", "b"], "stream": True, "sampling_params": {"max_new_tokens": 64}}, "stream"),
        ({"text": []}, "text"),
        ({"input_ids": [10**9], "sampling_params": {"max_new_tokens": 2}}, "input_ids"),
        ({"text": "a", "sampling_params": {"regex": "(unclosed"}}, "sampling_params"),
        ({"text": "a", "sampling_params": {"ebnf": "root ::= missing_rule"}}, "sampling_params"),
        ({"text": "a", "sampling_params": {"regex": "a+", "json_schema": "{}"}}, "sampling_params"),
        ({"text": "a", "image_data": "data:image/png;base64,iVBORw0KGgo="}, "image_data"),  # text-only server
        ({"text": ["a", "b"], "image_data": ["x"]}, "image_data"),  # one entry per prompt
    ],
)
def test_bad_generate_requests_are_refused_before_anything_runs(server: str, body: Any, param: str) -> None:
    t0 = time.perf_counter()
    r = httpx.post(f"{server}/generate", headers=_headers(), json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert time.perf_counter() - t0 < 1.0
    assert _kv_used(server) == 0  # nothing was admitted (the streamed batch used to run anyway)


def test_a_body_nested_too_deeply_is_a_400(server: str) -> None:
    deep = b'{"text": "a", "input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{server}/generate", headers={**_headers(), "content-type": "application/json"},
                   content=deep, timeout=30)
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_request_id_in_flight_cannot_be_reused(server: str) -> None:
    body = {"text": "Count to fifty.", "rid": "same-rid",
            "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}}

    def post() -> httpx.Response:
        return httpx.post(f"{server}/generate", headers=_headers(), json=body, timeout=60)

    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post)
        time.sleep(0.3)  # the first is in flight
        second = pool.submit(post)
        codes = sorted([first.result().status_code, second.result().status_code])
    assert codes == [200, 400]  # both answered: one served, one refused (it used to hang)
    assert post().status_code == 200  # free again once answered
    assert _kv_used(server) == 0


def test_errors_of_the_framework_and_of_content_type_have_openais_shape(server: str) -> None:
    r = httpx.get(f"{server}/v1/nothing-here", headers=_headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == 404 and "detail" not in r.json()
    r = httpx.get(f"{server}/v1/chat/completions", headers=_headers())
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    assert httpx.head(f"{server}/health").status_code == 200
    # a "simple" cross-origin POST (no CORS preflight) from a web page is refused
    r = httpx.post(f"{server}/generate", headers={**_headers(), "content-type": "text/plain",
                                                   "origin": "http://evil.example"},
                   content=b'{"text": "a", "sampling_params": {"max_new_tokens": 1}}')
    assert r.status_code == 415 and r.json()["error"]["code"] == 415
    assert _kv_used(server) == 0
    info = httpx.get(f"{server}/get_server_info", headers=_headers()).json()
    assert info["api_key"] == "<redacted>" and API_KEY not in str(info)


def test_completions_refuse_suffix_and_bad_best_of(server: str) -> None:
    for extra, param in (({"suffix": "end"}, "suffix"), ({"best_of": 2, "n": 3}, "best_of"),
                         ({"best_of": 3, "stream": True}, "best_of"), ({"best_of": 40}, "best_of")):
        r = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=30,
                       json={"prompt": "a", "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=30,
                    json={"prompt": "a", "max_tokens": 2, "best_of": 1, "suffix": None})
    assert ok.status_code == 200


def test_n_choices_greedy_equal_the_single_answer_and_stream_per_index(client: openai.OpenAI) -> None:
    """n = 3 siblings share the prompt's KV pages; greedy, each equals the n = 1 answer. Streamed,
    each index's deltas add up to it; usage counts the prompt once."""
    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
                          "messages": [{"role": "user", "content": "Name three rivers of Europe, " * 6}]}
    one = client.chat.completions.create(**kw)
    three = client.chat.completions.create(**kw, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    texts = ["", ""]
    reasons = [None, None]
    for chunk in client.chat.completions.create(**kw, n=2, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == [one.choices[0].message.content] * 2 and None not in reasons


def test_seeded_choices_are_the_seeded_single_answers_and_best_of_picks_the_likeliest(server: str) -> None:
    """Choice i of a seeded n > 1 request is the n = 1 answer seeded seed + i (sharing the prompt's
    KV changes nothing); best_of = 4, n = 2 returns the two of those four with the highest
    cumulative logprob, in that order."""
    def post(**extra: Any) -> Any:
        body = {"prompt": "Once upon a time, in a land far away,", "max_tokens": 8, "temperature": 1.0,
                "seed": 11, "logprobs": 0, **extra}
        r = httpx.post(f"{server}/v1/completions", headers=_headers(), json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"]

    four = post(n=4)
    singles = [post(seed=11 + i)[0]["text"] for i in range(4)]
    assert [c["text"] for c in four] == singles
    assert len(set(singles)) > 1  # sampled, so the seeds differ (8 tokens at temperature 1)
    # prompt logprobs need a prefill of the whole prompt: siblings asking for them do not share it
    echoed = post(n=2, echo=True, max_tokens=2, prompt="Once upon a time, in a land far away, " * 6)
    lps = [c["logprobs"]["token_logprobs"] for c in echoed]
    assert len(lps[0]) > 50 and lps[0][0] is None and None not in lps[0][1:]
    assert lps[0][:-2] == pytest.approx(lps[1][:-2], abs=1e-4)
    total = [sum(c["logprobs"]["token_logprobs"]) for c in four]
    best = sorted(range(4), key=lambda i: -total[i])[:2]
    picked = post(n=2, best_of=4)
    assert [c["text"] for c in picked] == [four[i]["text"] for i in best]
    assert [c["index"] for c in picked] == [0, 1]


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, offline: Any) -> None:
    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is",
                          "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**kw, logprobs=0)
    first = offline.encode(plain.choices[0].text)[0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100})
    assert offline.encode(banned.choices[0].text)[0] != first
    forced = offline.encode(" banana")[0]
    r = client.completions.create(**kw, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert offline.encode(r.choices[0].text) == [forced] * 4


def test_a_client_leaving_n_choices_aborts_them_all(server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 600,
            "ignore_eos": True, "n": 3}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", headers=_headers(), json=body, timeout=2)
    t0 = time.monotonic()
    while _kv_used(server) > 0 and time.monotonic() - t0 < 3:
        time.sleep(0.1)
    assert _kv_used(server) == 0, "a choice kept running after its client left"


def test_a_body_that_never_arrives_times_out_and_a_chunked_one_is_size_checked(server: str) -> None:
    from specdec.server.app import BODY_READ_TIMEOUT_S

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_READ_TIMEOUT_S + 10) as sock:
        body = b'{"text": "a"}'
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body) + 100).encode() + b"\r\n\r\n" + body)
        t0 = time.monotonic()
        reply = sock.recv(4096)
        assert b" 408 " in reply.split(b"\r\n", 1)[0]
        assert BODY_READ_TIMEOUT_S - 1 < time.monotonic() - t0 < BODY_READ_TIMEOUT_S + 5

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is checked as it streams in
        yield b'{"text": "'
        for _ in range(10):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(f"{server}/generate", headers={**_headers(), "content-type": "application/json"},
                   content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").status_code == 200


def test_api_key_is_enforced(server: str) -> None:
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_engine_loop_runs_on_the_main_thread(server: str) -> None:
    """OpenMP throttles parallel regions started off the main thread (engine_loop.py): the
    server runs its engine loop on the main thread and HTTP in another."""
    from specdec.kernels import cpu_kernels

    info = httpx.get(f"{server}/get_server_info", headers=_headers()).json()
    assert info["engine_thread"] == "MainThread"
    assert info["cpu_kernel_isa"] == cpu_kernels.active_isa()


def _own_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """A plain-decoding server of our own (for signal tests), started and healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "specdec.launch_server", "--port", str(port), "--dtype", "float32",
           "--speculative-algorithm", "NONE", "--max-total-tokens", "4096", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return proc, base


def test_sigterm_stops_a_busy_server_and_answers_its_requests() -> None:
    proc, base = _own_server()
    try:
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000,
                "stream": True, "ignore_eos": True}
        finish = None
        with cf.ThreadPoolExecutor(1) as pool:  # a non-streaming request in flight too (issue 21)
            plain = pool.submit(httpx.post, f"{base}/v1/chat/completions", timeout=60,
                                json={**body, "stream": False})
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i == 5:
                        proc.send_signal(signal.SIGTERM)
                        t0 = time.monotonic()
                    if '"finish_reason":"abort"' in line.replace(" ", ""):
                        finish = "abort"
            answer = plain.result(timeout=20)
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 15
        assert proc.returncode == 0 and finish == "abort"
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "abort"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_lets_running_requests_finish_within_the_graceful_timeout() -> None:
    """--graceful-shutdown-timeout 6: a request that can finish in time ends normally, one that
    cannot is answered with abort when the time is up, and the process exits 0 soon after."""
    proc, base = _own_server("--graceful-shutdown-timeout", "6")
    try:

        def ask(tokens: int) -> httpx.Response:
            return httpx.post(f"{base}/generate", timeout=60, json={
                "text": "Tell a long story.", "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}})

        with cf.ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, 3000)
            time.sleep(1.0)
            short = pool.submit(ask, 24)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            short_answer, long_answer = short.result(timeout=30), long.result(timeout=30)
        proc.wait(timeout=20)
        waited = time.monotonic() - t0
        assert proc.returncode == 0
        assert short_answer.status_code == 200 and long_answer.status_code == 200, (short_answer.text, long_answer.text)
        assert short_answer.json()["meta_info"]["finish_reason"]["type"] == "length"
        assert long_answer.json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert 5 < waited < 15  # the long one got its 6 s, then everything stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_structured_outputs_over_http(server: str) -> None:
    """response_format json_schema (chat, streamed too) and json_object, /generate's regex: the
    output follows the constraint (this server speculates with NGRAM) and no KV is left."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "Name a big city and its population, as JSON."}],
            "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(), json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=_headers(),
                      json={**body, "stream": True}, timeout=120) as s:
        parts = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                 for line in s.iter_lines() if line.startswith("data: {") and '"choices":[{' in line]
    assert "".join(parts) == choice["message"]["content"]
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(), timeout=120,
                   json={**body, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    r = httpx.post(f"{server}/generate", headers=_headers(), timeout=120,
                   json={"text": "Is the sky blue?", "sampling_params": {"max_new_tokens": 30, "temperature": 0,
                                                                        "regex": "(yes|no)[.]"}})
    assert r.status_code == 200 and r.json()["text"] in ("yes.", "no."), r.text
    assert _kv_used(server) == 0
