"""The server's own OpenAPI 3.1 document, built from the msgspec Structs it decodes and encodes.

FastAPI's generated document is turned off (`openapi_url=None`): the routes read their bodies
with msgspec, so FastAPI sees no body models and would describe every POST as bodiless. This
document is made from the same Structs that `server/protocol.py` decodes (msgspec's own JSON
Schema for them), so it cannot drift from what the server accepts; the fuzz test
(tests/test_fuzz.py) draws its request bodies from it. Served at `GET /openapi.json`, behind the
API key like every route but /health.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    ModelList,
)

REF = "#/components/schemas/{name}"

# POST routes: (path, request Struct, 200 response Struct or None for a free-form object, summary)
POST_ROUTES: tuple[tuple[str, type[msgspec.Struct], type[msgspec.Struct] | None, str], ...] = (
    ("/v1/chat/completions", ChatCompletionRequest, ChatCompletionResponse,
     "OpenAI chat completion (stream: true answers Server-Sent Events)"),
    ("/v1/completions", CompletionRequest, CompletionResponse,
     "OpenAI text completion (stream: true answers Server-Sent Events)"),
    ("/generate", GenerateRequest, None, "SGLang's native generation"),
)

# GET routes: (path, 200 response Struct or None, summary)
GET_ROUTES: tuple[tuple[str, type[msgspec.Struct] | None, str], ...] = (
    ("/v1/models", ModelList, "the served model"),
    ("/health", None, "200 while the server serves (no API key needed)"),
    ("/get_server_info", None, "server arguments and engine metrics"),
    ("/get_model_info", None, "model and tokenizer paths"),
    ("/metrics", None, "Prometheus text"),
    ("/openapi.json", None, "this document"),
)


def _ref(kind: type[msgspec.Struct] | None) -> dict[str, Any]:
    return {"$ref": REF.format(name=kind.__name__)} if kind is not None else {"type": "object"}


def _responses(ok: dict[str, Any], ok_type: str = "application/json") -> dict[str, Any]:
    error = {"description": "an error in OpenAI's shape",
             "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return {"200": {"description": "success", "content": {ok_type: {"schema": ok}}}, "default": error}


def openapi_document(version: str, title: str = "specdec") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route: request bodies and the main responses as JSON
    Schema components, OpenAI's error shape as every route's default response, bearer auth."""
    structs = [r[1] for r in POST_ROUTES] + [r[2] for r in POST_ROUTES if r[2] is not None]
    structs += [r[1] for r in GET_ROUTES if r[1] is not None] + [ErrorResponse]
    _, components = msgspec.json.schema_components(structs, ref_template=REF)
    paths: dict[str, Any] = {}
    for path, request, response, summary in POST_ROUTES:
        paths[path] = {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": _responses(_ref(response)),
        }}
    for path, response, summary in GET_ROUTES:
        if path == "/metrics":
            ok, ok_type = {"type": "string"}, "text/plain"
        else:
            ok, ok_type = _ref(response), "application/json"
        op: dict[str, Any] = {"summary": summary, "responses": _responses(ok, ok_type)}
        if path == "/health":
            op["security"] = []  # the one route open without the key
            op["responses"]["200"] = {"description": "serving"}
        paths[path] = {"get": op}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
