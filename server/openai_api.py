"""OpenAI-compatible /v1/chat/completions and /v1/completions over the engine loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from specdec.engine_loop import Update
from specdec.multimodal import MultimodalInputs
from specdec.request import LogprobEntry, Req
from specdec.sampling_params import GRAMMAR_FIELDS, SamplingParams

from .fanout import best_indices, check_counts, merged, share_prompt, sibling_params
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from .state import MAX_TOP_LOGPROBS, ApiError, ServerState
from .streaming import ChoiceStream, TextStreamer
from .tools import ToolPlan, call_id, message_tool_calls, plan_tools

IsDisconnected = Callable[[], Awaitable[bool]]


# ---- shared helpers -----------------------------------------------------------------------------


def sampling_params(state: ServerState, body: Any, max_new: int | None, prompt_len: int,
                    tool_schema: str | None = None) -> SamplingParams:
    """OpenAI fields -> SamplingParams; every invalid value is a 400 naming the field.
    `tool_schema`: the constraint of tool_choice required / named (server/tools.py)."""
    refuse_unsupported(body)
    schema = response_schema(getattr(body, "response_format", None))
    if tool_schema is not None:
        if schema is not None:
            raise ApiError(400, "response_format cannot be combined with tool_choice required or a named "
                           "function (both constrain the answer)", "response_format")
        schema = tool_schema
    defaults = state.engine.generation_defaults
    if max_new is None:  # what the context and the KV cache can hold, capped by the model's default
        max_new = state.engine.max_new_tokens_for(prompt_len)
        if defaults.max_new_tokens is not None:  # generation_config's max_new_tokens (vLLM's default max_tokens)
            max_new = min(max_new, defaults.max_new_tokens)
    if max_new <= 0:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_new}", "max_tokens")
    if body.temperature is not None and body.temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got {body.temperature}", "temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    fields: dict[str, Any] = {
        "max_new_tokens": max_new,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "repetition_penalty": body.repetition_penalty,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "seed": body.seed,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "json_schema": schema,
        "logit_bias": body.logit_bias or None,
    }
    try:
        return SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None}, defaults.sampling)
    except ValueError as e:  # the message starts with the field's name: name the request's field
        field = next((k for k in sorted(fields, key=len, reverse=True) if str(e).startswith(k)), None)
        raise ApiError(400, str(e), {"max_new_tokens": "max_tokens", "json_schema": "response_format"}.get(field or "", field)) from e


def response_schema(fmt: Any) -> str | None:
    """OpenAI's response_format -> the json_schema sampling parameter (text: None). json_object
    is any JSON object, as SGLang maps it."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ApiError(400, "response_format must be an object", "response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema, a JSON Schema object",
                           "response_format")
        return msgspec.json.encode(schema).decode()
    raise ApiError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   "response_format")


def refuse_unsupported(body: Any) -> None:
    """OpenAI fields this server does not implement yet are refused with a 400 naming them,
    never ignored (a request asking for something must not get plain text instead)."""
    if getattr(body, "suffix", None):
        raise ApiError(400, "suffix (insertion) is not supported: this server's models have no "
                       "fill-in-the-middle format", "suffix")


async def prepare_images(state: ServerState, ids: list[int], images: Sequence[Any], param: str
                         ) -> tuple[list[int], MultimodalInputs | None]:
    """The prompt with its images' layout and the images to embed (off the event loop: decoding
    and fetching take time); a bad image is a 400 naming the problem."""
    if not images:
        return ids, None
    try:
        return await asyncio.to_thread(state.engine.prepare_images, ids, images)
    except ValueError as e:
        raise ApiError(400, str(e), param) from e


def make_requests(state: ServerState, ids: list[int], params: SamplingParams, rid: str, count: int,
                  grammar_param: str = "response_format", **kw: Any) -> list[Req]:
    """`count` sibling requests of one prompt (n / best_of), sharing its KV (server/fanout.py);
    a single request keeps the id `rid`, siblings are `rid-0`, `rid-1`, ..."""
    reqs = []
    try:
        for i, p in enumerate(sibling_params(params, count)):
            reqs.append(state.engine.make_request(ids, p, rid=rid if count == 1 else f"{rid}-{i}", **kw))
    except ValueError as e:
        if str(e).startswith(GRAMMAR_FIELDS):  # the schema / grammar did not compile
            raise ApiError(400, str(e), grammar_param) from e
        if str(e).startswith("logit_bias"):
            raise ApiError(400, str(e), "logit_bias") from e
        raise ApiError(400, str(e), "messages" if rid.startswith("chatcmpl") else "prompt") from e
    share_prompt(reqs)
    return reqs


def submit_all(state: ServerState, reqs: Sequence[Req]) -> list[asyncio.Queue[Update]]:
    return [state.loop.submit(r) for r in reqs]


def abort_all(state: ServerState, reqs: Sequence[Req]) -> None:
    for r in reqs:
        state.loop.abort(r.rid)  # (a no-op for one that has finished)


DISCONNECT_CHECK_S = 0.5


async def wait_final(state: ServerState, req: Req, queue: asyncio.Queue[Update],
                     is_disconnected: IsDisconnected, siblings: Sequence[Req] = ()) -> Update:
    """Await the final update; a client that goes away aborts its request and `siblings` (the
    other requests of its HTTP request; KV freed). The connection is checked every
    DISCONNECT_CHECK_S whether or not tokens are arriving (a request producing tokens used to
    be checked only when it stalled, so it ran to its end)."""
    next_check = time.monotonic() + DISCONNECT_CHECK_S
    while True:
        try:
            update = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
            if update.finished:
                return update
        except TimeoutError:
            pass
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + DISCONNECT_CHECK_S
            if await is_disconnected():
                state.loop.abort(req.rid)
                abort_all(state, siblings)
                raise ApiError(499, "client disconnected") from None


async def wait_all(state: ServerState, reqs: Sequence[Req], queues: Sequence[asyncio.Queue[Update]],
                   is_disconnected: IsDisconnected) -> list[dict[str, Any]]:
    """Every request's result (they run together); a client that leaves aborts them all, and
    so does any error on the way."""
    results = []
    try:
        for req, q in zip(reqs, queues, strict=True):
            update = await wait_final(state, req, q, is_disconnected, reqs)
            assert update.result is not None
            results.append(update.result)
    except BaseException:
        abort_all(state, reqs)
        raise
    return results


def finish_reason(result: dict[str, Any]) -> tuple[str | None, int | str | None]:
    reason = result["meta_info"]["finish_reason"] or {}
    kind = reason.get("type")
    return (None if kind is None else str(kind)), reason.get("matched")


def spec_metadata(meta: dict[str, Any]) -> dict[str, Any] | None:
    keys = [k for k in meta if k.startswith("spec_")]
    return {k: meta[k] for k in keys} if keys else None


def chat_logprobs(entries: Sequence[LogprobEntry], tops: Sequence[Sequence[LogprobEntry]]) -> ChoiceLogprobs:
    content = []
    for i, (lp, _tid, text) in enumerate(entries):
        tok = text or ""
        row = tops[i] if i < len(tops) else []
        top = [TopLogprob(t or "", float(v or 0.0), list((t or "").encode())) for v, _, t in row]
        content.append(TokenLogprob(tok, float(lp or 0.0), list(tok.encode()), top))
    return ChoiceLogprobs(content)


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# ---- chat -----------------------------------------------------------------------------------------


async def chat_completions(state: ServerState, body: ChatCompletionRequest,
                           is_disconnected: IsDisconnected) -> ChatCompletionResponse | AsyncIterator[bytes]:
    state.check_model(body.model)
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message", "messages")
    if state.chat_template is None:
        raise ApiError(400, "this server has no chat template; start it with --chat-template", "messages")
    count = check_counts(body.n, None, body.stream)
    plan = plan_tools(body.tools, body.tool_choice, state.chat_template.tool_format)
    images: list[str] = []
    messages = [_message(m, i, images, state.engine.image_placeholder) for i, m in enumerate(body.messages)]
    try:
        prompt = state.chat_template.render(messages, add_generation_prompt=True, tools=plan.tools)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    ids, mm = await prepare_images(state, state.engine.encode(prompt), images, "messages")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    params = sampling_params(state, body, body.max_completion_tokens or body.max_tokens, len(ids), plan.schema)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    reqs = make_requests(state, ids, params, rid, count, "tools" if plan.schema else "response_format", mm=mm,
                         return_logprob=body.logprobs,
                         top_logprobs_num=(body.top_logprobs or 0) if body.logprobs else 0)
    queues = submit_all(state, reqs)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _chat_stream(state, rid, reqs, queues, params, plan, created, include_usage, body.logprobs)
    results = await wait_all(state, reqs, queues, is_disconnected)
    choices = []
    for i, result in enumerate(results):
        meta = result["meta_info"]
        kind, matched = finish_reason(result)
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs", []))
        content, calls = plan.parse(result["text"])
        tool_calls = [ToolCall(call_id(), FunctionCall(c.name, c.arguments)) for c in calls] or None
        if tool_calls and kind == "stop":
            kind = "tool_calls"
        choices.append(ChatChoice(i, AssistantMessage("assistant", content, tool_calls), logprobs, kind, matched))
    return ChatCompletionResponse(rid, created, state.served_model_name, choices, usage_sum(results, len(results)),
                                  spec_metadata(results[0]["meta_info"]))


def usage_sum(results: Sequence[dict[str, Any]], per_prompt: int) -> Usage:
    """Usage over the returned choices, `per_prompt` consecutive ones per prompt (as vLLM counts
    it): each prompt once, every returned choice's tokens."""
    prompt_tokens = sum(r["meta_info"]["prompt_tokens"] for r in results[::per_prompt])
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    cached = sum(r["meta_info"]["cached_tokens"] for r in results[::per_prompt])
    return Usage(prompt_tokens, completion, prompt_tokens + completion, PromptTokensDetails(cached))


def _message(m: ChatMessage, index: int, images: list[str], placeholder: str | None) -> dict[str, Any]:
    """A request message for the template: text content (an image_url part becomes the image
    placeholder there, its URL appended to `images`); an assistant's tool_calls with their
    arguments as objects; a tool message's tool_call_id."""
    out: dict[str, Any] = {"role": m.role, "content": None if m.content is None and m.tool_calls
                           else _content_text(m.content, index, images, placeholder)}
    calls = message_tool_calls(m.tool_calls, index)
    if calls:
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _content_text(content: Any, index: int, images: list[str], placeholder: str | None) -> str:
    """Text parts joined with newlines; an image part is its placeholder, written where it
    stands without a separator (as Llama 4's template writes <|image|> before the text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = ""
    last_text = False
    for k, part in enumerate(content):
        if part.type == "image_url":
            if part.image_url is None:
                raise ApiError(400, f"messages[{index}].content[{k}] is an image_url part without image_url.url",
                               "messages")
            if placeholder is None:
                raise ApiError(400, "image_url content parts need a server started with --enable-multimodal "
                               "(a Llama 4 checkpoint with its vision tower)", "messages")
            images.append(part.image_url.url)
            out += placeholder
            last_text = False
        elif part.type == "text" and part.text is not None:
            out += ("\n" if last_text else "") + part.text
            last_text = True
        else:
            raise ApiError(400, f"unsupported content part type {part.type!r} (text or image_url)", "messages")
    return out


async def _chat_stream(state: ServerState, rid: str, reqs: Sequence[Req], queues: Sequence[asyncio.Queue[Update]],
                       params: SamplingParams, plan: ToolPlan, created: int, include_usage: bool,
                       want_logprobs: bool) -> AsyncIterator[bytes]:
    """Each choice's deltas as they come (chunks carry the choice's index); a choice's tool calls
    in one delta at its end (text that may start a call is held back until then); usage once
    all end."""
    model = state.served_model_name
    streams = [ChoiceStream(params, plan) for _ in reqs]
    results: list[dict[str, Any]] = []

    def chunk(i: int, delta: DeltaMessage, reason: str | None = None, lps: ChoiceLogprobs | None = None,
              metadata: dict[str, Any] | None = None) -> bytes:
        return sse(ChatCompletionChunk(rid, created, model, [ChatChunkChoice(i, delta, lps, reason)],
                                       None, metadata))

    try:
        for i in range(len(reqs)):
            yield chunk(i, DeltaMessage(role="assistant", content=""))
        async for i, update in merged(queues):
            lps = chat_logprobs(update.new_logprobs, update.new_top_logprobs) if want_logprobs else None
            if not update.finished:
                delta = streams[i].push(update.new_text)
                if delta or (lps and lps.content):
                    yield chunk(i, DeltaMessage(content=delta), None, lps)
                continue
            result = update.result
            assert result is not None
            results.append(result)
            delta, calls = streams[i].finish(result["text"])
            if delta or (lps and lps.content):
                yield chunk(i, DeltaMessage(content=delta), None, lps)
            kind, _ = finish_reason(result)
            if calls:
                yield chunk(i, DeltaMessage(tool_calls=[ToolCallDelta(j, call_id(), FunctionCall(c.name, c.arguments))
                                                        for j, c in enumerate(calls)]))
                kind = "tool_calls" if kind == "stop" else kind
            yield chunk(i, DeltaMessage(), kind, None, spec_metadata(result["meta_info"]))
        if include_usage:
            yield sse(ChatCompletionChunk(rid, created, model, [], usage_sum(results, len(results)),
                                          spec_metadata(results[0]["meta_info"])))
        yield DONE
    finally:
        if len(results) < len(reqs):  # the client left (or the stream failed): abort the rest
            abort_all(state, reqs)


# ---- completions ----------------------------------------------------------------------------------


def _prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """str | list[int] | list[str] | list[list[int]] -> token id lists."""
    if isinstance(prompt, str):
        return [state.engine.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [state.engine.encode(p) for p in prompt]
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of token ids, a list of strings or a list of "
                   "token id lists", "prompt")


def completion_logprobs(state: ServerState, entries: Sequence[LogprobEntry],
                        tops: Sequence[Any], offset0: int) -> CompletionLogprobs:
    tokens, lps, top_out, offsets = [], [], [], []
    pos = offset0
    for i, (lp, _tid, text) in enumerate(entries):
        tok = text or ""
        tokens.append(tok)
        lps.append(lp)
        top = tops[i] if i < len(tops) else None
        top_out.append(None if not top else {t or "": float(v or 0.0) for v, _, t in top})
        offsets.append(pos)
        pos += len(tok)
    return CompletionLogprobs(tokens, lps, top_out, offsets)


async def completions(state: ServerState, body: CompletionRequest,
                      is_disconnected: IsDisconnected) -> CompletionResponse | AsyncIterator[bytes]:
    state.check_model(body.model)
    all_ids = _prompts(state, body.prompt)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    count = check_counts(body.n, body.best_of, body.stream)  # requests per prompt
    want_lp = body.logprobs is not None
    rid = f"cmpl-{uuid.uuid4().hex}"
    reqs: list[Req] = []
    params = SamplingParams()
    for k, ids in enumerate(all_ids):
        params = sampling_params(state, body, body.max_tokens, len(ids))
        reqs += make_requests(state, ids, params, rid if len(all_ids) == 1 else f"{rid}-p{k}", count,
                              return_logprob=want_lp or count > body.n,  # best_of ranks by logprob
                              logprob_start_len=0 if (body.echo and want_lp) else -1,
                              top_logprobs_num=body.logprobs or 0)
    queues = submit_all(state, reqs)
    created = int(time.time())
    if body.stream:  # (count == n here)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _completion_stream(state, rid, reqs, queues, params, created, body.echo, include_usage, body.n)
    results = await wait_all(state, reqs, queues, is_disconnected)
    chosen: list[int] = []
    for k in range(len(all_ids)):  # best_of: the n most likely candidates of each prompt
        group = results[k * count:(k + 1) * count]
        picks = best_indices(group, body.n) if count > body.n else range(body.n)
        chosen += [k * count + j for j in picks]
    choices = []
    for i, c in enumerate(chosen):
        req, result = reqs[c], results[c]
        meta = result["meta_info"]
        prompt_text = state.engine.detokenize(req.prompt_ids, False) if body.echo else ""
        logprobs = None
        if want_lp:
            entries = list(meta["output_token_logprobs"])
            tops = list(meta.get("output_top_logprobs", []))
            if body.echo:
                entries = list(meta["input_token_logprobs"]) + entries
                tops = list(meta.get("input_top_logprobs", [])) + tops
            logprobs = completion_logprobs(state, entries, tops, 0)
        kind, matched = finish_reason(result)
        choices.append(CompletionChoice(i, prompt_text + result["text"], logprobs, kind, matched))
    picked = [results[c] for c in chosen]
    return CompletionResponse(rid, created, state.served_model_name, choices, usage_sum(picked, body.n),
                              spec_metadata(picked[0]["meta_info"]))


async def _completion_stream(state: ServerState, rid: str, reqs: Sequence[Req], queues: Sequence[asyncio.Queue[Update]],
                             params: SamplingParams, created: int, echo: bool, include_usage: bool,
                             per_prompt: int) -> AsyncIterator[bytes]:
    """Each choice's text deltas as they come (choice index = prompt * n + j, OpenAI's order)."""
    model = state.served_model_name
    streamers = [TextStreamer(params) for _ in reqs]
    results: list[dict[str, Any] | None] = [None] * len(reqs)

    def chunk(i: int, text: str, reason: str | None = None, metadata: dict[str, Any] | None = None) -> bytes:
        return sse(CompletionResponse(rid, created, model, [CompletionChoice(i, text, None, reason)],
                                      None, metadata))

    try:
        if echo:
            for i, req in enumerate(reqs):
                yield chunk(i, state.engine.detokenize(req.prompt_ids, False))
        async for i, update in merged(queues):
            if not update.finished:
                delta = streamers[i].push(update.new_text)
                if delta:
                    yield chunk(i, delta)
                continue
            result = update.result
            assert result is not None
            results[i] = result
            kind, _ = finish_reason(result)
            yield chunk(i, streamers[i].finish(result["text"]), kind, spec_metadata(result["meta_info"]))
        if include_usage:
            done = [r for r in results if r is not None]
            yield sse(CompletionResponse(rid, created, model, [], usage_sum(done, per_prompt)))
        yield DONE
    finally:
        if any(r is None for r in results):  # the client left (or the stream failed): abort the rest
            abort_all(state, reqs)
