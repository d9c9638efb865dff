"""A soak test of the server: a mixed load for a fixed time, then what it left behind.

    python -m specdec.bench.soak --duration-s 600            # launches `specdec serve --quantization w8a16`
    python -m specdec.bench.soak --base-url http://127.0.0.1:30000 --server-pid 1234

By default it launches the server itself (`specdec serve --quantization w8a16` on a free port:
EAGLE3 speculation, the embedded model's default) and stops it at the end; `--base-url` drives
a running one instead (`--server-pid` to read its memory). `--concurrency` clients send the mix
of bench/soak_mix.py (three routes, streamed and not, mixed prompt and output lengths, some
requests abandoned by the client, a few bad ones) until `--duration-s` has passed, and wait for
those in flight. Then the KV cache must drain to 0 tokens.

Prints a JSON summary (and writes it to `--out`): requests sent, served, abandoned, errors by
status, 5xx, hangs (no answer within `--hang-s`), unexpected answers (a good request refused, a
bad one served, an answer with an aborted choice: what a failed engine step reports), tokens
generated, KV tokens in use at the end, the server's peak RSS (VmHWM), the tracebacks in its
log (when launched here). Exits 1 on any 5xx, hang, unexpected answer, leaked KV or traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .soak_mix import Mix, Plan

KV_SETTLE_S = 30.0


@dataclass
class Tally:
    """What the clients saw."""

    sent: int = 0
    served: int = 0
    abandoned: int = 0
    bad_sent: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    by_route: collections.Counter[str] = field(default_factory=collections.Counter)
    errors_5xx: int = 0
    hangs: int = 0
    transport_errors: int = 0
    unexpected: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, served requests
    examples: list[str] = field(default_factory=list)  # the first few problems, to replay them

    def problem(self, what: str, plan: Plan, detail: str = "") -> None:
        if len(self.examples) < 10:
            self.examples.append(f"{what}: POST {plan.route} {plan.body[:300]!r} {detail[:300]}")


def completion_tokens(obj: Any) -> int:
    """Generated tokens in an answer or final event of any route."""
    if isinstance(obj, list):
        return sum(completion_tokens(x) for x in obj)
    if not isinstance(obj, dict):
        return 0
    if isinstance(obj.get("usage"), dict):
        return int(obj["usage"].get("completion_tokens", 0))
    return int((obj.get("meta_info") or {}).get("completion_tokens", 0))


def aborted(obj: Any) -> bool:
    """Whether an answer or event carries an aborted choice (a request the server gave up)."""
    if isinstance(obj, list):
        return any(aborted(x) for x in obj)
    if not isinstance(obj, dict):
        return False
    if any(c.get("finish_reason") == "abort" for c in obj.get("choices") or []):
        return True
    reason = (obj.get("meta_info") or {}).get("finish_reason")
    return isinstance(reason, dict) and reason.get("type") == "abort"


async def run_one(client: httpx.AsyncClient, plan: Plan, tally: Tally, hang_s: float) -> None:
    """Send one planned request and count what came back."""
    tally.sent += 1
    tally.by_route[plan.route] += 1
    tally.bad_sent += plan.bad
    t0 = time.monotonic()
    try:
        status, closed_early, final = await asyncio.wait_for(exchange(client, plan, hang_s), hang_s)
        if closed_early:
            tally.abandoned += 1
            tally.by_status["abandoned"] += 1
            return
    except asyncio.TimeoutError:
        tally.hangs += 1
        tally.problem("hang", plan, f"no answer within {hang_s:.0f} s")
        return
    except httpx.TimeoutException:
        if plan.give_up_s is None:
            tally.hangs += 1
            tally.problem("hang", plan, "read timeout")
        else:
            tally.abandoned += 1
            tally.by_status["abandoned"] += 1
        return
    except httpx.HTTPError as e:
        tally.transport_errors += 1
        tally.problem("transport error", plan, repr(e))
        return
    except ValueError as e:  # a 200 whose body or event is not JSON
        tally.unexpected += 1
        tally.problem("not JSON", plan, repr(e))
        return
    tally.by_status[str(status)] += 1
    if status >= 500:
        tally.errors_5xx += 1
        tally.problem(f"{status}", plan)
    elif plan.bad != (400 <= status < 500) or (status == 200 and aborted(final)):
        tally.unexpected += 1
        tally.problem(f"unexpected {status}", plan, json.dumps(final)[:300] if final is not None else "")
    elif status == 200:
        tally.served += 1
        tally.tokens += completion_tokens(final)
        tally.latencies.append(time.monotonic() - t0)


async def exchange(client: httpx.AsyncClient, plan: Plan, hang_s: float) -> tuple[int, bool, Any]:
    """(status, closed early by the client, the answer or final event: None for an error)."""
    timeout = httpx.Timeout(plan.give_up_s if plan.give_up_s is not None else hang_s)
    headers = {"Content-Type": "application/json"}
    async with client.stream("POST", plan.route, content=plan.body, headers=headers, timeout=timeout) as r:
        if r.status_code == 200 and plan.stream:
            closed_early, final = await read_stream(r, plan)
            return r.status_code, closed_early, final
        await r.aread()
        return r.status_code, False, r.json() if r.status_code == 200 else None


async def read_stream(r: httpx.Response, plan: Plan) -> tuple[bool, Any]:
    """(closed early by the client, the final event with the usage or the last result)."""
    events = 0
    final: Any = None
    async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        events += 1
        if aborted(event):
            return False, event
        if event.get("usage") or (plan.route == "/generate" and event.get("meta_info", {}).get("finish_reason")):
            final = event
        if plan.close_after_events is not None and events >= plan.close_after_events:
            return True, None  # leaving the block closes the connection mid-stream
    return False, final if final is not None else {}


async def drive(base_url: str, api_key: str | None, duration_s: float, concurrency: int, seed: int,
                hang_s: float) -> tuple[Tally, dict[str, int]]:
    """`concurrency` clients sending the mix until `duration_s` has passed."""
    tally = Tally()
    mix = Mix(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    kv = {"peak": 0}
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                await run_one(client, mix.next(), tally, hang_s)

        async def watch() -> None:  # the KV high-water mark and the host's load, every 2 s
            while time.monotonic() < deadline:
                try:
                    kv["peak"] = max(kv["peak"], await kv_used(client))
                except httpx.HTTPError:
                    pass
                kv["load_x100"] = max(kv.get("load_x100", 0), load_avg_x100())
                await asyncio.sleep(2)

        await asyncio.gather(watch(), *(worker() for _ in range(concurrency)))
    return tally, kv


async def kv_used(client: httpx.AsyncClient) -> int:
    r = await client.get("/get_server_info", timeout=10)
    return int(r.json()["metrics"]["kv_used_tokens"])


async def settle(base_url: str, api_key: str | None) -> tuple[int, float, dict[str, Any]]:
    """(KV tokens in use once 0 or after KV_SETTLE_S, seconds it took, the server's info)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        t0 = time.monotonic()
        used = await kv_used(client)
        while used and time.monotonic() - t0 < KV_SETTLE_S:
            await asyncio.sleep(0.2)
            used = await kv_used(client)
        took = time.monotonic() - t0
        info = (await client.get("/get_server_info", timeout=10)).json()
    return used, took, info


def proc_status_kib(pid: int, key: str) -> int | None:
    """A `VmHWM:`-style field of /proc/<pid>/status in KiB (None if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def load_avg_x100() -> int:
    """The host's 1-minute load average x 100 (other work on the machine slows the server)."""
    try:
        return int(float(Path("/proc/loadavg").read_text().split()[0]) * 100)
    except (OSError, ValueError, IndexError):
        return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`specdec serve --quantization w8a16` (plus --server-arg values) on a free port, healthy."""
    port = free_port()
    exe = Path(sys.executable).with_name("specdec")
    cmd = [str(exe) if exe.exists() else "specdec", "serve", "--quantization", "w8a16", "--port", str(port),
           "--log-level", "warning", *(["--api-key", args.api_key] if args.api_key else []), *args.server_arg]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + args.start_timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.start_timeout_s:.0f} s")


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50 / p90 / p99 / max of served requests' end-to-end seconds."""
    if not values:
        return None
    v = sorted(values)
    pick = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {k: round(v[min(len(v) - 1, int(q * len(v)))], 2) for k, q in pick.items()}
    return {**out, "max": round(v[-1], 2)}


def mib(kib: int | None) -> float | None:
    return round(kib / 1024, 1) if kib is not None else None


def summary(args: argparse.Namespace, tally: Tally, kv: dict[str, int], kv_end: int, settle_s: float,
            info: dict[str, Any], took: float, pid: int | None, rss_start: int | None,
            tracebacks: int | None) -> dict[str, Any]:
    hwm = proc_status_kib(pid, "VmHWM") if pid else None
    rss = proc_status_kib(pid, "VmRSS") if pid else None
    metrics = info.get("metrics", {})
    ok = (tally.errors_5xx == 0 and tally.hangs == 0 and tally.unexpected == 0 and tally.transport_errors == 0
          and kv_end == 0 and not tracebacks)
    return {
        "ok": ok,
        "duration_s": round(took, 1),
        "concurrency": args.concurrency,
        "seed": args.seed,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "host_load_avg_1m_max": kv.get("load_x100", 0) / 100,
        "server": {"launched": args.base_url is None, "speculative_algorithm": info.get("speculative_algorithm"),
                   "quantization": info.get("quantization"), "avg_spec_accept_length": info.get("avg_spec_accept_length"),
                   "kv_total_tokens": metrics.get("kv_total_tokens")},
        "requests": {"sent": tally.sent, "served": tally.served, "abandoned_by_client": tally.abandoned,
                     "bad_sent": tally.bad_sent, "by_status": dict(sorted(tally.by_status.items())),
                     "by_route": dict(sorted(tally.by_route.items()))},
        "errors_5xx": tally.errors_5xx,
        "hangs": tally.hangs,
        "transport_errors": tally.transport_errors,
        "unexpected": tally.unexpected,
        "tokens_generated": tally.tokens,
        "tokens_per_s": round(tally.tokens / took, 1) if took > 0 else None,
        "latency_s": percentiles(tally.latencies),
        "kv_used_tokens_end": kv_end,
        "kv_settle_s": round(settle_s, 2),
        "kv_used_tokens_peak_sampled": kv["peak"],
        "kv_cached_free_tokens_end": metrics.get("kv_cached_free_tokens"),  # prefix-cache pages, reusable
        "server_requests_finished": metrics.get("requests_finished"),
        "server_requests_aborted": metrics.get("requests_aborted"),
        "server_peak_rss_mib": mib(hwm),
        "server_rss_start_mib": mib(rss_start),
        "server_rss_end_mib": mib(rss),
        "server_log_tracebacks": tracebacks,
        "problems": tally.examples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0, help="how long to send requests")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--base-url", default=None, help="a running server (default: launch one)")
    p.add_argument("--server-pid", type=int, default=None, help="its pid, to read its peak RSS")
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra flag for the launched server (repeat; e.g. --server-arg=--max-running-requests=8)")
    p.add_argument("--hang-s", type=float, default=180.0, help="a request unanswered after this is a hang")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the summary here (JSON)")
    args = p.parse_args(argv)
    if args.duration_s <= 0 or args.concurrency < 1:
        p.error("--duration-s must be > 0 and --concurrency >= 1")

    proc = None
    log = Path(tempfile.mkstemp(prefix="specdec-soak-", suffix=".log")[1])
    try:
        if args.base_url is None:
            proc, base = launch(args, log)
            pid: int | None = proc.pid
        else:
            base, pid = args.base_url.rstrip("/"), args.server_pid
        rss_start = proc_status_kib(pid, "VmRSS") if pid else None
        t0 = time.monotonic()
        tally, kv = asyncio.run(drive(base, args.api_key, args.duration_s, args.concurrency, args.seed, args.hang_s))
        took = time.monotonic() - t0
        kv_end, settle_s, info = asyncio.run(settle(base, args.api_key))
        log_text = log.read_text(errors="replace") if proc is not None else ""
        tracebacks = log_text.count("Traceback") if proc is not None else None
        out = summary(args, tally, kv, kv_end, settle_s, info, took, pid, rss_start, tracebacks)
        spec = re.search(r"speculative: ([A-Za-z0-9_]+)", log_text)
        if spec and out["server"]["speculative_algorithm"] is None:
            out["server"]["speculative_algorithm"] = spec.group(1)
        if tracebacks:
            out["server_log_first_traceback"] = log_text[log_text.index("Traceback"):][:3000]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if os.environ.get("SPECDEC_SOAK_KEEP_LOG"):
                print(f"server log: {log}", file=sys.stderr)
            else:
                log.unlink(missing_ok=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
