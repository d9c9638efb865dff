"""FastAPI routing only: bodies are decoded and encoded with msgspec, never pydantic.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
POST /generate (SGLang's native body), GET /get_server_info, GET /get_model_info,
GET /metrics (Prometheus text, SGLang's metric names), GET /openapi.json (server/openapi.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdec.engine import per_prompt_images
from specdec.engine_loop import Update
from specdec.sampling_params import GRAMMAR_FIELDS

from .metrics_text import prometheus_text
from .openai_api import DONE, chat_completions, completions, prepare_images, sse, wait_final
from .openapi import openapi_document
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from .state import MAX_TOP_LOGPROBS, ApiError, ServerState

T = TypeVar("T")
log = logging.getLogger("specdec.server")
OPEN_PATHS = frozenset({"/health", "/health_generate"})


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def error_response(e: ApiError) -> Response:
    return json_response(ErrorResponse(ErrorInfo(e.message, e.kind, e.param, e.status)), e.status)


BODY_READ_TIMEOUT_S = 10.0  # a body must arrive within this (a client declaring more than it sends)


async def read_body(request: Request, state: ServerState, kind: type[T]) -> T:
    """The body, checked against the size limit as it streams in (chunked bodies too), within
    BODY_READ_TIMEOUT_S, decoded into `kind`."""
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > state.max_body_bytes:
                raise ApiError(413, f"request body exceeds the {state.max_body_bytes}-byte limit")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout=BODY_READ_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:.0f} s") from None
    body = b"".join(chunks)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        # e.g. "Expected `int`, got `str` - at `$.max_tokens`"
        param = str(e).rsplit("`$.", 1)[-1].rstrip("`") if "`$." in str(e) else None
        raise ApiError(400, f"invalid request: {e}", param) from e
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from e
    except RecursionError as e:  # a body nested deeper than the decoder recurses
        raise ApiError(400, "malformed JSON body: nested too deeply") from e


class Guard:
    """Checks every HTTP request before routing: the API key, the declared body size, and that
    a POST body is JSON. A plain ASGI middleware: it passes `receive` through untouched, so
    handlers see the client's disconnect (Starlette's BaseHTTPMiddleware wraps `receive`, and
    `request.is_disconnected()` behind it never turned true: a non-streaming request ran to its
    end after its client left).

    Content types: absent, `application/json` or `*+json` (FastAPI's rule since 0.65.2); anything
    else is a 415, so a web page cannot drive the server with a "simple" cross-origin POST
    (`text/plain` needs no CORS preflight; JSON does, and the server sends no CORS headers)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Any) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        state = self.state
        if state.api_key is not None and scope.get("path") not in OPEN_PATHS:
            if headers.get("authorization") != f"Bearer {state.api_key}":
                return ApiError(401, "missing or invalid API key (Authorization: Bearer ...)")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
            return ApiError(413, f"request body exceeds the {state.max_body_bytes}-byte limit")
        if scope.get("method") == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind and kind != "application/json" and not kind.endswith("+json"):
                return ApiError(415, f"the body must be JSON (Content-Type: application/json), not {kind!r}")
        return None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="specdec", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Guard, state=state)

    async def http_error(request: Request, exc: Exception) -> Response:
        """The framework's own 404 / 405 in OpenAI's error shape (not `{"detail": ...}`)."""
        status = int(getattr(exc, "status_code", 500))
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(status, what.get(status, str(getattr(exc, "detail", exc)))))

    app.add_exception_handler(StarletteHTTPException, http_error)

    def handle(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                out = await fn(request)
            except ApiError as e:
                return error_response(e)
            except Exception as e:  # a bug must not take the server down: report a 500
                log.exception("error in %s", request.url.path)
                return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            if isinstance(out, Response):
                return out
            if hasattr(out, "__aiter__"):
                return StreamingResponse(out, media_type="text/event-stream")
            return json_response(out)

        return route

    async def chat(request: Request) -> Any:
        body = await read_body(request, state, ChatCompletionRequest)
        return await chat_completions(state, body, request.is_disconnected)

    async def complete(request: Request) -> Any:
        body = await read_body(request, state, CompletionRequest)
        return await completions(state, body, request.is_disconnected)

    async def models(request: Request) -> Any:
        card = ModelCard(state.served_model_name, state.created, root=str(state.engine.model_path),
                         max_model_len=state.engine.context_length)
        return ModelList([card])

    async def health(request: Request) -> Any:
        return Response(status_code=200)

    async def generate(request: Request) -> Any:
        return await native_generate(state, await read_body(request, state, GenerateRequest), request)

    async def server_info(request: Request) -> Any:
        snap = state.engine.metrics.snapshot()
        internal = {
            "avg_spec_accept_length": snap["avg_spec_accept_length"],
            "spec_accept_rate": snap["spec_accept_rate"],
            "last_gen_throughput": state.loop.last_gen_throughput,
        }
        return {**state.server_args, "version": _version(), "cpu_kernel_isa": state.engine.cpu_isa,
                "engine_thread": state.loop.thread_name,
                "generation_defaults": state.engine.generation_defaults.as_dict(),
                "internal_states": [internal],
                "avg_spec_accept_length": snap["avg_spec_accept_length"], "metrics": snap}

    async def model_info(request: Request) -> Any:
        return {"model_path": str(state.engine.model_path), "tokenizer_path": str(state.engine.model_path),
                "is_generation": True, "served_model_name": state.served_model_name}

    async def metrics(request: Request) -> Any:
        return Response(prometheus_text(state.engine.metrics, state.loop.last_gen_throughput),
                        media_type="text/plain; version=0.0.4")

    spec = msgspec.json.encode(openapi_document(_version()))

    async def openapi(request: Request) -> Any:
        return Response(spec, media_type="application/json")

    for path, fn, methods in (
        ("/v1/chat/completions", chat, ["POST"]),
        ("/v1/completions", complete, ["POST"]),
        ("/v1/models", models, ["GET"]),
        ("/health", health, ["GET", "HEAD"]),
        ("/generate", generate, ["POST"]),
        ("/get_server_info", server_info, ["GET"]),
        ("/get_model_info", model_info, ["GET"]),
        ("/metrics", metrics, ["GET"]),
        ("/openapi.json", openapi, ["GET"]),
    ):
        app.add_api_route(path, handle(fn), methods=methods)
    return app


def _version() -> str:
    import specdec

    return specdec.__version__


async def native_generate(state: ServerState, body: GenerateRequest, request: Request) -> Any:
    """SGLang's /generate: text or input_ids, sampling_params, stream, return_logprob."""
    engine = state.engine
    if (body.text is None) == (body.input_ids is None):
        raise ApiError(400, "pass exactly one of text and input_ids", "text")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts:
            raise ApiError(400, "text is an empty list: pass a string or at least one prompt", "text")
        batch = [engine.encode(t) for t in texts]
        single = isinstance(body.text, str)
    else:
        ids = body.input_ids or []
        single = not ids or not isinstance(ids[0], list)
        if not single and not all(isinstance(x, list) for x in ids):  # e.g. [[], null]: was a 500
            raise ApiError(400, "input_ids must be a list of token ids or a list of such lists", "input_ids")
        batch = [list(ids)] if single else [list(x) for x in ids]
        if not all(isinstance(t, int) and not isinstance(t, bool) for seq in batch for t in seq):
            raise ApiError(400, "input_ids must be a list of token ids or a list of such lists", "input_ids")
    if body.stream and not single:  # refused before anything runs
        raise ApiError(400, "stream=True takes a single prompt", "stream")
    if not 0 <= body.top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]; got {body.top_logprobs_num}",
                       "top_logprobs_num")
    try:
        params = engine.sampling_params(body.sampling_params)  # with the generation-config defaults
    except ValueError as e:
        raise ApiError(400, str(e), "sampling_params") from e
    try:
        images = per_prompt_images(body.image_data, len(batch), single)
    except ValueError as e:
        raise ApiError(400, str(e), "image_data") from e
    prepared = [await prepare_images(state, ids, imgs, "image_data") for ids, imgs in zip(batch, images, strict=True)]
    try:
        reqs = [engine.make_request(ids, params, body.return_logprob, body.logprob_start_len,
                                    body.top_logprobs_num, rid=body.rid if single and body.rid else None, mm=mm)
                for ids, mm in prepared]
    except ValueError as e:
        if str(e).startswith(GRAMMAR_FIELDS):  # json_schema / regex / ebnf did not compile
            raise ApiError(400, str(e), "sampling_params") from e
        raise ApiError(400, str(e), "text" if body.text is not None else "input_ids") from e
    try:
        queues = [state.loop.submit(r) for r in reqs]
    except ValueError as e:  # a request id already in flight
        raise ApiError(400, str(e), "rid") from e
    if body.stream:
        return _native_stream(state, reqs[0].rid, queues[0])
    outs = []
    for req, q in zip(reqs, queues, strict=True):
        update = await wait_final(state, req, q, request.is_disconnected)
        outs.append(update.result)
    return outs[0] if single else outs


async def _native_stream(state: ServerState, rid: str, queue: Any) -> AsyncIterator[bytes]:
    """Each chunk carries the cumulative text and output ids, as SGLang streams them."""
    ids: list[int] = []
    text = ""
    finished = False
    try:
        while True:
            update: Update = await queue.get()
            ids.extend(update.new_ids)
            text += update.new_text
            if update.finished:
                finished = True
                yield sse(update.result)
                yield DONE
                return
            yield sse({"text": text, "output_ids": ids, "meta_info": {"id": rid, "completion_tokens": len(ids)}})
    finally:
        if not finished:
            state.loop.abort(rid)
