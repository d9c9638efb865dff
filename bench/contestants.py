"""Benchmark contestants, each in its own process, so one that crashes (a native library's
SIGSEGV, an illegal instruction) is reported with its signal while the others finish.

A contestant process reads one JSON request per line on stdin and writes one JSON reply per
line on stdout (its logs go to stderr):

    <- {"ready": true}                                   once loaded (or {"error": "..."})
    -> {"ids": [1, 2, 3]}                               a prompt's token ids
    <- {"new": [7, 8], "accept": 1.0, "seconds": 0.01}  generated ids, accept length, wall time
    -> {"quit": true}

`seconds` is measured inside the process around the generation alone, so the pipe's latency is
not timed. While one contestant generates the others wait on their stdin, idle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

Answer = Callable[[list[int]], tuple[list[int], float]]  # prompt ids -> (new ids, accept length)


@dataclass(frozen=True)
class Reply:
    new: list[int]
    accept: float
    seconds: float


class ContestantFailed(RuntimeError):
    """The contestant's process died or answered with an error."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Contestant:
    """One contestant's process; `ask` one prompt at a time."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self._log: IO[str] = tempfile.TemporaryFile("w+")  # its stderr, shown if it dies
        self._proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, env=env, bufsize=1)
        self.failure: str | None = None
        self._receive()  # {"ready": true}

    def _receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._fail(describe_exit(self._proc.wait()))
        msg = json.loads(line)
        if "error" in msg:
            self._fail(f"error: {msg['error']}")
        return dict(msg)

    def _fail(self, why: str) -> None:
        self._log.seek(0)
        tail = [ln for ln in self._log.read().splitlines() if ln.strip()][-3:]
        self.failure = why + (f" ({' | '.join(tail)})" if tail else "")
        raise ContestantFailed(self.failure)

    def ask(self, ids: list[int]) -> Reply:
        if self.failure is not None:
            raise ContestantFailed(self.failure)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"ids": ids}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail(describe_exit(self._proc.wait()))
        msg = self._receive()
        return Reply([int(t) for t in msg["new"]], float(msg["accept"]), float(msg["seconds"]))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


def serve_answers(make: Callable[[], Answer], stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> int:
    """The contestant side: build the answer function, then answer prompts until told to quit."""
    import time

    out = os.fdopen(os.dup(stdout.fileno()), "w", buffering=1) if stdout is sys.stdout else stdout
    if stdout is sys.stdout:  # anything the libraries print goes to stderr, not into the protocol
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        answer = make()
    except Exception as e:  # reported to the driver, which prints the table without us
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        t0 = time.perf_counter()
        new, accept = answer([int(t) for t in msg["ids"]])
        seconds = time.perf_counter() - t0
        out.write(json.dumps({"new": new, "accept": accept, "seconds": seconds}) + "\n")
        out.flush()
    return 0
