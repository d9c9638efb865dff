"""What every route needs: the engine, its loop thread, the chat template and server knobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from specdec.engine import Engine
from specdec.engine_loop import EngineLoop

from .chat_template import ChatTemplate


class ApiError(Exception):
    """Becomes an OpenAI-style error body with this status; the server keeps serving."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            405: "invalid_request_error",
            408: "timeout_error",
            413: "request_too_large",
            415: "invalid_request_error",
        }.get(status, "server_error")


# the most top logprobs a request may ask for per token over HTTP (vLLM's --max-logprobs default;
# OpenAI's chat API allows 20 too): each costs a top-k over the vocabulary and a detokenised
# entry per token. The offline engine allows up to the vocabulary.
MAX_TOP_LOGPROBS = 20


@dataclass
class ServerState:
    engine: Engine
    loop: EngineLoop
    chat_template: ChatTemplate | None
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    server_args: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None) -> None:
        """Unknown model names are a 404, as in OpenAI's API."""
        if name is None or name in (self.served_model_name, str(self.engine.model_path), "default"):
            return
        raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                       f"`{self.served_model_name}`", "model", "model_not_found")
