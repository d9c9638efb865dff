"""`specdec chat` client against a tiny fake OpenAI-compatible server (no model needed)."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from specdec.server.chat_client import (
    accept_length,
    build_parser,
    error_text,
    main,
    spec_metrics,
    sse_events,
)

PIECES = ["Hel", "lo", " world"]
REPLY = "".join(PIECES)
METADATA = {"spec_verify_ct": 12, "spec_accept_length": 2.9}


@dataclass
class FakeState:
    """What the fake server does and what it saw."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    models: list[str] = field(default_factory=lambda: ["fake-model", "other-model"])


class FakeHandler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            data = [{"id": m, "object": "model"} for m in self.server.state.models]
            self._json(200, {"object": "list", "data": data})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._json(404, {"detail": "Not Found"})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = self.server.state
        state.requests.append(body)
        state.headers.append(dict(self.headers))
        last = body["messages"][-1]["content"]
        if "FAIL" in last:
            self._json(400, {"error": {"message": "context too long (fake)",
                                       "type": "invalid_request_error", "code": 400}})
        elif "MIDSTREAM" in last:
            self._stream([self._chunk({"content": "par"}),
                          {"error": {"message": "engine crashed (fake)"}}])
        elif body.get("stream"):
            self._stream(self._chunks())
        else:
            self._json(200, self._completion())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def _usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    def _chunks(self) -> list[dict[str, Any]]:
        chunks = [self._chunk({"role": "assistant", "content": ""})]
        chunks += [self._chunk({"content": p}) for p in PIECES]
        chunks.append(self._chunk({}, finish="stop"))
        final: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk",
                                 "choices": [], "usage": self._usage()}
        if self.server.state.metadata is not None:
            final["metadata"] = self.server.state.metadata
        return [*chunks, final]

    def _completion(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": "c1", "object": "chat.completion", "model": "fake-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": REPLY}}],
            "usage": self._usage()}
        if self.server.state.metadata is not None:
            obj["metadata"] = self.server.state.metadata
        return obj

    def _stream(self, events: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        self.wfile.write(b": keep-alive\n\n")
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


class FakeServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.state = FakeState()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run(argv: list[str], monkeypatch: pytest.MonkeyPatch, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(argv)


def test_one_shot_streams_reply(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["--base-url", fake.base_url, "-m", "Hi"], monkeypatch) == 0
    out, err = capsys.readouterr()
    assert out == REPLY + "\n"
    assert "3 tokens" in err and "tok/s" in err
    assert "accept" not in err  # the server reported no spec metadata
    (request,) = fake.state.requests
    assert request["model"] == "fake-model"  # first id of GET /v1/models
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["messages"] == [{"role": "user", "content": "Hi"}]
    assert request["temperature"] == 0.7 and request["max_tokens"] == 512


def test_flags_reach_the_request(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--base-url", fake.base_url + "/", "--model", "other-model", "--api-key", "sk-x",
            "--system", "Be terse.", "--temperature", "0", "--max-tokens", "9", "-m", "Hi"]
    assert run(argv, monkeypatch) == 0
    (request,) = fake.state.requests
    assert request["model"] == "other-model"
    assert request["temperature"] == 0.0 and request["max_tokens"] == 9
    assert request["messages"] == [{"role": "system", "content": "Be terse."},
                                   {"role": "user", "content": "Hi"}]
    assert fake.state.headers[0]["Authorization"] == "Bearer sk-x"


def test_interactive_keeps_history(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    script = "/system Be terse.\nfirst\n\nsecond\n/reset\nthird\n/help\n/exit\nnever sent\n"
    assert run(["--base-url", fake.base_url, "--system", "old"], monkeypatch, script) == 0
    out, err = capsys.readouterr()
    assert out == (REPLY + "\n") * 3
    system = {"role": "system", "content": "Be terse."}
    assistant = {"role": "assistant", "content": REPLY}
    assert [r["messages"] for r in fake.state.requests] == [
        [system, {"role": "user", "content": "first"}],
        [system, {"role": "user", "content": "first"}, assistant,
         {"role": "user", "content": "second"}],
        [system, {"role": "user", "content": "third"}],  # /reset kept the system prompt
    ]
    assert "/reset" in err  # /help text
    assert err.count("tok/s") == 3


def test_interactive_eof_and_system_removal(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    script = "one\n/system\ntwo\n/bogus\n"  # ends without /exit: EOF quits
    assert run(["--base-url", fake.base_url, "--system", "S"], monkeypatch, script) == 0
    _, err = capsys.readouterr()
    assert [r["messages"] for r in fake.state.requests] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}],
        [{"role": "user", "content": "two"}],
    ]
    assert "unknown command /bogus" in err


def test_status_line_shows_accept_length(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake.state.metadata = METADATA
    assert run(["--base-url", fake.base_url, "-m", "Hi"], monkeypatch) == 0
    _, err = capsys.readouterr()
    status = err.strip().splitlines()[-1]
    assert "3 tokens" in status and "tok/s" in status
    assert "accept length 2.90" in status
    assert "\x1b[" not in status  # no ANSI when stderr is not a terminal


def test_no_stream(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake.state.metadata = METADATA
    assert run(["--base-url", fake.base_url, "--no-stream", "-m", "Hi"], monkeypatch) == 0
    out, err = capsys.readouterr()
    assert out == REPLY + "\n"
    assert "accept length 2.90" in err
    (request,) = fake.state.requests
    assert request["stream"] is False and "stream_options" not in request


def test_server_error_one_shot_exits_1(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["--base-url", fake.base_url, "-m", "please FAIL"], monkeypatch) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "HTTP 400" in err and "context too long (fake)" in err


def test_server_error_interactive_continues(fake: FakeServer,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    script = "FAIL now\nMIDSTREAM\nhello\n/exit\n"
    assert run(["--base-url", fake.base_url], monkeypatch, script) == 0
    out, err = capsys.readouterr()
    assert "context too long (fake)" in err and "engine crashed (fake)" in err
    assert out == "par\n" + REPLY + "\n"
    # failed turns are not kept in the history
    assert fake.state.requests[-1]["messages"] == [{"role": "user", "content": "hello"}]


def test_connection_refused_exits_1(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    base = f"http://127.0.0.1:{port}/v1"
    for extra in ([], ["--model", "m"]):  # fails on GET /models, or on the chat request
        assert run(["--base-url", base, "-m", "Hi", *extra], monkeypatch) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert f"cannot connect to {base}" in err and "is the server running?" in err


def test_wrong_base_url_hint(fake: FakeServer, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    base = fake.base_url.removesuffix("/v1")
    assert run(["--base-url", base, "-m", "Hi"], monkeypatch) == 1
    assert "does --base-url end in /v1?" in capsys.readouterr().err


def test_parser_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    args = build_parser().parse_args([])
    assert args.base_url == "http://127.0.0.1:30000/v1"
    assert args.api_key == "sk-env"
    assert args.model is None and args.system is None and args.message is None
    assert args.temperature == 0.7 and args.max_tokens == 512 and args.no_stream is False
    monkeypatch.delenv("OPENAI_API_KEY")
    assert build_parser().parse_args([]).api_key is None


def test_spec_metrics_sources() -> None:
    assert accept_length(spec_metrics({"metadata": METADATA}), 30) == 2.9
    assert accept_length(spec_metrics({"usage": {"spec_accept_length": 1.5}}), 3) == 1.5
    assert accept_length(spec_metrics({"meta_info": {"spec_verify_ct": 4}}), 10) == 2.5
    assert accept_length(spec_metrics({"meta_info": {"spec_verify_ct": 4}}), None) is None
    assert accept_length(spec_metrics({"usage": {"completion_tokens": 3}}), 3) is None


def test_sse_parsing_and_error_text() -> None:
    lines = [": ping", "", "event: message", 'data: {"a": 1}', "data:{\"b\": 2}", "data: [DONE]",
             'data: {"never": true}']
    assert list(sse_events(lines)) == [{"a": 1}, {"b": 2}]
    assert error_text('{"error": {"message": "boom"}}') == "boom"
    assert error_text('{"detail": "Not Found"}') == "Not Found"
    assert error_text('{"error": "flat"}') == "flat"
    assert error_text("Bad Gateway") == "Bad Gateway"
