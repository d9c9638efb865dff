"""Interactive chat client for any OpenAI-compatible server (`specdec chat`).

Streams replies from POST {base}/chat/completions as they arrive, keeps the conversation
history, and after each reply prints one dim status line to stderr: tokens, seconds,
tokens/s, time to first token and, when the server reports speculative-decoding figures
(SGLang-style `spec_accept_length` / `spec_verify_ct` under a top-level `metadata`,
`meta_info` or `usage` object), the accept length.

    specdec chat                                  # interactive; model = first of GET /models
    specdec chat -m "What is 2+2?"                # one shot: print the reply, exit
    specdec chat --base-url http://host:8000/v1 --model my-model --system "Be terse."
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:30000/v1"
PROMPT = "you> "
SPEC_SOURCES = ("metadata", "meta_info", "usage")
HELP_TEXT = """commands:
  /reset          clear the conversation (keeps the system prompt)
  /system <text>  set the system prompt and clear the conversation (no text: remove it)
  /help           show this help
  /exit           quit (also /quit or Ctrl-D)"""

JSON = dict[str, Any]


class ChatError(Exception):
    """A failed request the session survives: server error, bad stream, timeout."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectFailed(Exception):
    """The server cannot be reached at all (fatal)."""


@dataclass
class ReplyStats:
    tokens: int | None
    seconds: float
    tokens_exact: bool = True
    ttft: float | None = None
    accept_length: float | None = None
    finish_reason: str | None = None


@dataclass
class Reply:
    text: str
    stats: ReplyStats


# ---------------------------------------------------------------- response parsing


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def error_text(body: str) -> str:
    """The human message of an error body: OpenAI `{"error": {"message"}}`, FastAPI `detail`."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:500] or "(empty response body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            for key in ("message", "detail"):
                if err.get(key):
                    return str(err[key])
        elif err:
            return str(err)
    return body.strip()[:500]


def http_error(response: httpx.Response) -> ChatError:
    message = error_text(response.text)
    return ChatError(f"server error (HTTP {response.status_code}): {message}",
                     status=response.status_code)


def spec_metrics(obj: JSON) -> JSON:
    """The `spec_*` figures of one response or chunk, from metadata / meta_info / usage."""
    found: JSON = {}
    for source in SPEC_SOURCES:
        section = obj.get(source)
        if isinstance(section, dict):
            found.update({k: v for k, v in section.items() if k.startswith("spec_")})
    return found


def accept_length(spec: JSON, tokens: int | None) -> float | None:
    """Reported accept length, else completion tokens per verify step (SGLang's definition)."""
    reported = _number(spec.get("spec_accept_length"))
    if reported is not None:
        return reported
    verify_ct = _number(spec.get("spec_verify_ct"))
    if verify_ct and tokens:
        return tokens / verify_ct
    return None


def completion_tokens(obj: JSON) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        n = _number(usage.get("completion_tokens"))
        if n is not None:
            return int(n)
    return None


def sse_events(lines: Iterable[str]) -> Iterator[JSON]:
    """The JSON objects of `data: ...` lines, up to `data: [DONE]`; in-stream errors raise."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, `: keep-alive` comments, `event:` lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        if not data:
            continue
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise ChatError(f"malformed stream chunk: {data[:200]!r}") from e
        if not isinstance(obj, dict):
            raise ChatError(f"unexpected stream chunk: {data[:200]!r}")
        if obj.get("error"):
            raise ChatError(f"server error: {error_text(data)}")
        yield obj


@dataclass
class _StreamState:
    started: float
    pieces: list[str] = field(default_factory=list)
    text_chunks: int = 0
    first_text_at: float | None = None
    tokens: int | None = None
    spec: JSON = field(default_factory=dict)
    finish_reason: str | None = None

    def add(self, chunk: JSON, on_text: Callable[[str], None]) -> None:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.first_text_at is None:
                    self.first_text_at = time.perf_counter()
                self.pieces.append(text)
                self.text_chunks += 1
                on_text(text)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        self.tokens = completion_tokens(chunk) or self.tokens
        self.spec.update(spec_metrics(chunk))

    def reply(self) -> Reply:
        exact = self.tokens is not None
        tokens = self.tokens if exact else self.text_chunks
        ttft = None if self.first_text_at is None else self.first_text_at - self.started
        stats = ReplyStats(tokens=tokens, seconds=time.perf_counter() - self.started,
                           tokens_exact=exact, ttft=ttft,
                           accept_length=accept_length(self.spec, self.tokens),
                           finish_reason=self.finish_reason)
        return Reply("".join(self.pieces), stats)


def parse_completion(obj: JSON, seconds: float) -> Reply:
    """A non-streamed chat completion response."""
    choices = obj.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise ChatError("response has no choices")
    message = choices[0].get("message") or {}
    tokens = completion_tokens(obj)
    stats = ReplyStats(tokens=tokens, seconds=seconds,
                       accept_length=accept_length(spec_metrics(obj), tokens),
                       finish_reason=choices[0].get("finish_reason"))
    return Reply(str(message.get("content") or ""), stats)


# ---------------------------------------------------------------- HTTP client


@contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    """httpx failures -> ConnectFailed (unreachable server) or ChatError (anything else)."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise ConnectFailed(f"cannot connect to {base_url} ({e}); is the server running?") from e
    except httpx.TimeoutException as e:
        raise ChatError(f"request timed out ({type(e).__name__})") from e
    except httpx.HTTPError as e:
        raise ChatError(f"request failed: {type(e).__name__}: {e}") from e


class ChatClient:
    """Thin sync client for /models and /chat/completions of an OpenAI-compatible server."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._http.close()

    def list_models(self) -> list[str]:
        with _transport_errors(self.base_url):
            response = self._http.get(f"{self.base_url}/models")
        if response.is_error:
            raise http_error(response)
        try:
            data = response.json().get("data") or []
        except (json.JSONDecodeError, AttributeError) as e:
            raise ChatError(f"bad /models response: {response.text[:200]!r}") from e
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def chat(self, payload: JSON, on_text: Callable[[str], None]) -> Reply:
        """Send one chat completion; streamed text goes to `on_text` as it arrives."""
        url = f"{self.base_url}/chat/completions"
        started = time.perf_counter()
        with _transport_errors(self.base_url):
            if not payload.get("stream"):
                return self._chat_once(url, payload, started, on_text)
            with self._http.stream("POST", url, json=payload) as response:
                if response.is_error:
                    response.read()
                    raise http_error(response)
                state = _StreamState(started)
                for chunk in sse_events(response.iter_lines()):
                    state.add(chunk, on_text)
                return state.reply()

    def _chat_once(self, url: str, payload: JSON, started: float,
                   on_text: Callable[[str], None]) -> Reply:
        response = self._http.post(url, json=payload)
        if response.is_error:
            raise http_error(response)
        try:
            obj = response.json()
        except json.JSONDecodeError as e:
            raise ChatError(f"bad response: {response.text[:200]!r}") from e
        reply = parse_completion(obj, time.perf_counter() - started)
        on_text(reply.text)
        return reply


def first_model(client: ChatClient) -> str:
    try:
        models = client.list_models()
    except ChatError as e:
        hint = " (does --base-url end in /v1?)" if e.status == 404 else ""
        raise ChatError(f"cannot list models: {e}{hint}; pass --model") from e
    if not models:
        raise ChatError("the server lists no models; pass --model")
    return models[0]


# ---------------------------------------------------------------- conversation


@dataclass
class Conversation:
    system: str | None = None
    turns: list[JSON] = field(default_factory=list)

    def messages(self) -> list[JSON]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def reset(self) -> None:
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def dim(text: str, stream: TextIO) -> str:
    return f"\x1b[2m{text}\x1b[0m" if _use_color(stream) else text


def format_status(stats: ReplyStats) -> str:
    parts: list[str] = []
    if stats.tokens is not None:
        parts.append(f"{'' if stats.tokens_exact else '~'}{stats.tokens} tokens")
    parts.append(f"{stats.seconds:.2f} s")
    if stats.tokens is not None and stats.seconds > 0:
        parts.append(f"{stats.tokens / stats.seconds:.1f} tok/s")
    if stats.ttft is not None:
        parts.append(f"ttft {stats.ttft:.2f} s")
    if stats.accept_length is not None:
        parts.append(f"accept length {stats.accept_length:.2f}")
    if stats.finish_reason not in (None, "stop"):
        parts.append(f"finish {stats.finish_reason}")
    return "[" + ", ".join(parts) + "]"


class ChatSession:
    """One conversation with one model: sends turns, prints replies and status lines."""

    def __init__(self, client: ChatClient, model: str, args: argparse.Namespace) -> None:
        self.client = client
        self.model = model
        self.args = args
        self.conversation = Conversation(system=args.system)

    def payload(self, messages: list[JSON]) -> JSON:
        body: JSON = {"model": self.model, "messages": messages,
                      "temperature": self.args.temperature, "max_tokens": self.args.max_tokens,
                      "stream": not self.args.no_stream}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        return body

    def send(self, text: str) -> Reply:
        """Send a user turn and print the reply; history grows only when the reply completes."""
        user = {"role": "user", "content": text}
        wrote: list[bool] = []

        def write(piece: str) -> None:
            wrote.append(True)
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            reply = self.client.chat(self.payload([*self.conversation.messages(), user]), write)
        finally:
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
        self.conversation.turns += [user, {"role": "assistant", "content": reply.text}]
        print(dim(format_status(reply.stats), sys.stderr), file=sys.stderr, flush=True)
        return reply


# ---------------------------------------------------------------- modes


def _note(text: str) -> None:
    print(dim(text, sys.stderr), file=sys.stderr, flush=True)


def _error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


def read_line(stdin: TextIO) -> str | None:
    """One input line (prompted and editable on a terminal); None at EOF."""
    if stdin.isatty():
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def handle_command(session: ChatSession, line: str) -> bool:
    """Run a slash command; False means leave the session."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.conversation.reset()
        _note("[conversation cleared]")
    elif name == "/system":
        session.conversation.set_system(rest)
        _note("[system prompt set; conversation cleared]" if rest
              else "[system prompt removed; conversation cleared]")
    elif name == "/help":
        print(HELP_TEXT, file=sys.stderr)
    else:
        _error(f"unknown command {name}; /help lists the commands")
    return True


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() history and editing)
    except ImportError:
        pass


def interactive(session: ChatSession) -> int:
    if sys.stdin.isatty():
        _enable_line_editing()
    _note(f"[chatting with {session.model} at {session.client.base_url}; "
          "/help for commands, /exit or Ctrl-D to quit]")
    while True:
        try:
            line = read_line(sys.stdin)
        except KeyboardInterrupt:
            print()
            _note("[use /exit or Ctrl-D to quit]")
            continue
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line):
                return 0
            continue
        try:
            session.send(line)
        except ChatError as e:
            _error(str(e))
        except KeyboardInterrupt:
            _note("[interrupted; turn discarded]")


def one_shot(session: ChatSession, message: str) -> int:
    try:
        session.send(message)
    except ChatError as e:
        _error(str(e))
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec chat", description="Chat with any OpenAI-compatible server.",
        epilog=HELP_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help="API base URL, including /v1 (default: %(default)s).")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer token (default: $OPENAI_API_KEY, else none).")
    parser.add_argument("--model", default=None,
                        help="Model id (default: the first id from GET {base}/models).")
    parser.add_argument("--system", default=None, help="Initial system prompt.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=512, help="Max tokens per reply.")
    parser.add_argument("-m", "--message", default=None,
                        help="One-shot: send this message, print the reply, exit.")
    parser.add_argument("--no-stream", action="store_true",
                        help="Ask for the whole reply at once instead of streaming.")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="Seconds to wait for the server per read (default: %(default)s).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with ChatClient(args.base_url, args.api_key, args.timeout) as client:
            session = ChatSession(client, args.model or first_model(client), args)
            if args.message is not None:
                return one_shot(session, args.message)
            return interactive(session)
    except (ConnectFailed, ChatError) as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
