"""The served decode speed against the offline engine's, in one run: does the server give users
what the engine can do?

For each mode (`--modes`: plain decoding, `NONE`, and the embedded model's speculative default,
`default`) the same engine flags run twice: a `specdec serve` process answering SGLang's
`/generate` over HTTP, and a `specdec.Engine` in this process's main thread. Both get the same
chat-templated held-out prompts, greedy, `ignore_eos`, and alternate prompt by prompt (the idle
one waits, so they never share the CPU). Per prompt the decode rate is
(N - 1) / (t(N tokens) - t(1 token)): prefill and the HTTP round trip cancel out.

    python -m specdec.bench.served_vs_offline --quantization w8a16 --num-prompts 4 --max-new-tokens 128

Prints the median decode tok/s per side and their ratio; exits 1 when a mode's served speed is
below `--min-ratio` (default 0.9) of the offline engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bench_serving import DEFAULT_DATA


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.served_vs_offline",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=DEFAULT_DATA["chat"], help="jsonl with a 'prompt' per line")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--quantization", default="w8a16", help="'none' for unquantised weights")
    p.add_argument("--modes", nargs="+", default=["NONE", "default"],
                   help="NONE (plain decoding) and/or default (the embedded model's speculative settings)")
    p.add_argument("--min-ratio", type=float, default=0.9, help="fail below this served / offline ratio")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def engine_flags(quantization: str | None, mode: str) -> tuple[list[str], dict[str, Any]]:
    """The same settings as `specdec serve` flags and as `Engine` keyword arguments."""
    flags: list[str] = []
    kwargs: dict[str, Any] = {"log_level": "warning"}
    if quantization:
        flags += ["--quantization", quantization]
        kwargs["quantization"] = quantization
    if mode == "NONE":
        flags += ["--speculative-algorithm", "NONE"]
        kwargs["speculative_algorithm"] = "NONE"
    return flags, kwargs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, flags: list[str]) -> None:
        import httpx

        self.port = _free_port()
        exe = Path(sys.executable).with_name("specdec")
        cmd = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "specdec.cli", "serve"]
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port), "--log-level", "warning", *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(timeout=600)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if self.client.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start in 10 minutes")

    def generate(self, ids: list[int], n: int) -> tuple[float, dict[str, Any]]:
        body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
        t0 = time.perf_counter()
        r = self.client.post(f"{self.base}/generate", json=body)
        dt = time.perf_counter() - t0
        r.raise_for_status()
        return dt, dict(r.json())

    def info(self) -> dict[str, Any]:
        return dict(self.client.get(f"{self.base}/get_server_info").json())

    def close(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def decode_rate(t_n: float, t_1: float, n: int) -> float:
    return (n - 1) / (t_n - t_1) if t_n > t_1 else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from specdec import Engine
    from specdec.bench.bench_decode import chat_prompt_ids

    quant = None if args.quantization in ("none", "") else args.quantization
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()][: args.num_prompts]
    n = args.max_new_tokens
    report: list[dict[str, Any]] = []
    failed = False
    for mode in args.modes:
        flags, kwargs = engine_flags(quant, mode)
        print(f"[served_vs_offline] {mode}: starting the server and the offline engine ...", file=sys.stderr, flush=True)
        server = Server(flags)
        try:
            from specdec.cli_args import resolve_speculative_defaults

            engine = Engine(**resolve_speculative_defaults(kwargs))
            prompts = [chat_prompt_ids(engine.tokenizer, r["prompt"]) for r in rows]
            params = {"temperature": 0, "ignore_eos": True}
            served: list[float] = []
            offline: list[float] = []
            accept: list[float] = []
            for ids in [prompts[0], *prompts]:  # the first prompt once more as a warm-up
                s_n, out = server.generate(ids, n)
                s_1, _ = server.generate(ids, 1)
                t0 = time.perf_counter()
                engine.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": n})
                o_n = time.perf_counter() - t0
                t0 = time.perf_counter()
                engine.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 1})
                o_1 = time.perf_counter() - t0
                served.append(decode_rate(s_n, s_1, n))
                offline.append(decode_rate(o_n, o_1, n))
                accept.append(float(out["meta_info"].get("spec_accept_length") or 1.0))
            info = server.info()
            engine.shutdown()
        finally:
            server.close()
        s_med, o_med = statistics.median(served[1:]), statistics.median(offline[1:])
        ratio = s_med / o_med
        ok = ratio >= args.min_ratio
        failed |= not ok
        entry = {"mode": mode, "served_tok_s": s_med, "offline_tok_s": o_med, "ratio": ratio,
                 "accept_length": statistics.mean(accept[1:]), "engine_thread": info.get("engine_thread"),
                 "cpu_kernel_isa": info.get("cpu_kernel_isa"), "served": served[1:], "offline": offline[1:]}
        report.append(entry)
        print(f"{mode:<8} served {s_med:7.1f} tok/s   offline {o_med:7.1f} tok/s   served/offline {ratio:5.2f}x"
              f"   accept {entry['accept_length']:.2f}   {'ok' if ok else 'BELOW ' + str(args.min_ratio)}")
    print(f"{len(rows)} held-out chat prompts, {n} new tokens (ignore_eos), greedy, batch 1, "
          f"--quantization {args.quantization}, CPU kernels {report[0]['cpu_kernel_isa']}, {os.cpu_count()} CPUs")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": report},
                                        indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
