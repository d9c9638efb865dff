"""The engine's scheduler loop, fed from an asyncio server running in another thread.

The HTTP event loop never runs model code: it `submit`s validated requests and awaits
`Update`s on an asyncio queue; the engine loop admits and aborts requests between steps
(continuous batching) and publishes what each step produced. A step that raises fails the
requests in flight with an abort reason; the loop (and the server) keep running.

`run()` runs the loop in the calling thread, and the server calls it from the process's main
thread: GNU OpenMP (PyTorch's and our kernels' thread pool) counts the main thread as one of
its threads for good, so a parallel region started from any other thread finds more OpenMP
threads than CPUs on a small machine and its workers stop spinning between regions (each
region then pays a futex wake-up: 3-4x the time of a one-row int8 linear on 2 cores).
`start()` runs it in a thread instead (tests, embedding), at that cost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from .engine import Engine
from .request import LogprobEntry, Req

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Update:
    rid: str
    new_ids: tuple[int, ...]
    new_logprobs: tuple[LogprobEntry, ...]
    new_top_logprobs: tuple[list[LogprobEntry], ...]
    new_text: str  # the text these tokens made final (the request's IncrementalDetokenizer)
    finished: bool
    result: dict[str, Any] | None  # Engine.result() once finished


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Update]
    req: Req
    sent: int = 0
    sent_chars: int = 0


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._subs: dict[str, _Subscriber] = {}
        self._live: set[str] = set()  # ids submitted and not yet answered (event-loop side)
        self._drain_deadline: float | None = None  # set by drain(): stop admitting, finish by then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)
        self.last_gen_throughput = 0.0
        self.thread_name: str | None = None  # the thread running the loop (MainThread when served)

    def start(self) -> None:
        """Run the loop in a thread of its own (see the module docstring for the cost)."""
        self._thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread (the main thread, for speed) until `stop()`."""
        self._run()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def drain(self, timeout_s: float) -> None:
        """Graceful shutdown (safe from a signal handler): new and queued requests are answered
        at once (finish reason abort), running ones may finish for up to `timeout_s`; then the
        loop stops as `stop()` does, answering what is left."""
        self._drain_deadline = time.monotonic() + timeout_s
        self._inbox.put(("wake", None))

    def stop(self) -> None:
        """Ask the loop to return after the current step (safe from any thread or a signal
        handler); joins the loop's thread if `start()` made one."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # ---- called from the event loop -----------------------------------------------------------
    def submit(self, req: Req) -> asyncio.Queue[Update]:
        """Queue `req` for the engine; raises ValueError when its id is already in flight (the
        set of live ids is only touched on the event loop, so check-and-add cannot race)."""
        if req.rid in self._live:
            raise ValueError(f"request id {req.rid!r} is already in use by a request in flight")
        self._live.add(req.rid)
        q: asyncio.Queue[Update] = asyncio.Queue()
        self._inbox.put(("add", _Subscriber(asyncio.get_running_loop(), q, req)))
        return q

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    # ---- the loop thread ------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._subs[payload.req.rid] = payload
                self.engine.scheduler.add(payload.req)  # (while draining, _run answers it at once)
            elif kind == "abort":
                self._abort(payload, "client disconnected")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _abort(self, rid: str, message: str) -> None:
        req = self.engine.scheduler.abort(rid, message)
        if req is not None:
            self._publish(req)

    def _run(self) -> None:
        self.thread_name = threading.current_thread().name
        scheduler = self.engine.scheduler
        while not self._stop.is_set():
            self._drain(block=not scheduler.has_work())
            if self._drain_deadline is not None:  # graceful shutdown: nothing new starts
                for req in list(scheduler.waiting):
                    self._abort(req.rid, "server shutting down")
                if not scheduler.running or time.monotonic() >= self._drain_deadline:
                    break
            if not scheduler.has_work():
                continue
            t0 = time.perf_counter()
            try:
                touched = scheduler.step()
            except Exception as e:  # keep serving: fail the batch, not the server
                log.exception("engine step failed")
                for req in list(scheduler.waiting) + list(scheduler.running):
                    self._abort(req.rid, f"internal error: {e}")
                continue
            produced = 0
            for req in touched:
                produced += self._publish(req)
            dt = time.perf_counter() - t0
            if produced and dt > 0:
                self.last_gen_throughput = produced / dt
        # stopped: what is still queued or running is answered (aborted), its KV freed
        self._drain(block=False)
        for req in list(scheduler.waiting) + list(scheduler.running):
            self._abort(req.rid, "server shutting down")

    def _publish(self, req: Req) -> int:
        sub = self._subs.get(req.rid)
        if sub is None:
            return 0
        new = req.output_ids[sub.sent:]
        lps = req.output_token_logprobs[sub.sent:] if req.return_logprob else []
        tops = req.output_top_logprobs[sub.sent:] if req.return_logprob and req.top_logprobs_num else []
        sub.sent = req.output_len
        text = req.detok.text if req.detok is not None else ""
        new_text = text[sub.sent_chars:]
        sub.sent_chars = len(text)
        result = self.engine.result(req) if req.finished else None
        if req.finished:
            del self._subs[req.rid]
        update = Update(req.rid, tuple(new), tuple(lps), tuple(tops), new_text, req.finished, result)
        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, update)
        if req.finished:  # the id is free again once its last update is on the event loop
            sub.loop.call_soon_threadsafe(self._live.discard, req.rid)
        return len(new)
