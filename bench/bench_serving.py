"""Online serving benchmark with `sglang.bench_serving`'s flags and result block.

Sends a prompt set to a running server (ours, SGLang, vLLM or any OpenAI-compatible one) with
Poisson arrivals (`--request-rate`, default inf = all at once) under an optional concurrency
cap, streams every response, and reports throughput, TTFT, TPOT, ITL and end-to-end latency,
plus the speculative accept length when the server reports one.

    python -m specdec.bench_serving --backend specdec --port 30000 \\
        --dataset-name random --random-input-len 256 --random-output-len 128 --num-prompts 32
    python -m specdec.bench_serving --backend openai-chat --dataset-name gsm8k --num-prompts 50 \\
        --max-concurrency 4 --output-file results.jsonl

Backends: `specdec` / `sglang` stream SGLang's native `/generate`; `openai` and `vllm` use
`/v1/completions`; `openai-chat` uses `/v1/chat/completions`.

Datasets: `random` (random token ids of `--random-input-len` / `--random-output-len`, both
drawn from [len * ratio, len] with `--random-range-ratio`), `sharegpt` (a ShareGPT json or
jsonl file), `gsm8k` (GSM8K's test questions), `alpaca` (the Alpaca seed tasks), `chat` (held-out
chat prompts of every category; these three ship in specdec.bench.data), `custom` (a jsonl of
chat prompts: `messages` / `conversations`, or `prompt` / `text` / `question` /
`instruction`). Output lengths come from the reference reply unless `--sharegpt-output-len`
fixes them; the server is asked to ignore EOS (`--disable-ignore-eos` turns that off).

Measured per request: TTFT (first streamed chunk with content), ITL (gaps between later
content chunks: a speculative step emits several tokens in one chunk, as SGLang counts it),
E2E latency, and output tokens (the server's `meta_info` / `usage` figure, or the tokenizer's
count of the text). TPOT = (E2E - TTFT) / (output tokens - 1). Peak output throughput is the
largest token count in one 1-second window of the run. Failed requests are counted and
reported; they never stop the run.

Accept length: aggregated from the per-request speculative metadata (emitted tokens / verify
steps) when responses carry it, else the change of `/get_server_info` over the run, else its
engine-wide average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("specdec", "sglang", "vllm", "openai", "openai-chat")
NATIVE_BACKENDS = ("specdec", "sglang")
DATASETS = ("random", "sharegpt", "gsm8k", "alpaca", "chat", "custom")
BENCH_DATA = Path(__file__).resolve().parent / "data"  # shipped in the package (bench/data/README.md)
DEFAULT_DATA = {"gsm8k": BENCH_DATA / "gsm8k_test.jsonl", "alpaca": BENCH_DATA / "alpaca_seed_tasks.jsonl",
                "chat": BENCH_DATA / "chat_heldout.jsonl"}

Messages = list[dict[str, str]]


# ---- datasets -----------------------------------------------------------------------------------
@dataclass
class ChatSample:
    """One prompt as chat messages (the last one a user turn) and its reference reply."""

    messages: Messages
    reference: str | None = None
    output_len: int | None = None  # fixed by the data, if it says so


@dataclass
class DatasetRow:
    prompt: str  # the text sent to text backends (chat-templated when asked / needed)
    prompt_len: int  # client-side token count of `prompt`
    output_len: int  # max new tokens requested
    messages: Messages | None = None  # sent as-is to openai-chat


def read_jsonl_or_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
          "system": "system"}


def _turns(raw: Any) -> Messages:
    """ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turns -> OpenAI messages."""
    out: Messages = []
    for t in raw if isinstance(raw, list) else []:
        if not isinstance(t, dict):
            continue
        role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str):
            continue
        out.append({"role": role, "content": content})
    return out


def sample_from_record(rec: Any) -> ChatSample | None:
    """A chat sample from one record of a ShareGPT / custom / gsm8k / alpaca file."""
    if not isinstance(rec, dict):
        return None
    output_len = rec.get("output_len", rec.get("max_tokens"))
    output_len = int(output_len) if isinstance(output_len, int) and output_len > 0 else None
    for key in ("messages", "conversations", "conversation"):
        if key in rec:
            turns = _turns(rec[key])
            first_user = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
            if first_user is None:
                return None
            # the prompt runs through the first user turn; the next assistant turn is the reference
            reply = next((m["content"] for m in turns[first_user + 1:] if m["role"] == "assistant"), None)
            if key == "messages" and turns[-1]["role"] == "user":  # a chat prompt: keep its history
                return ChatSample(turns, rec.get("reference") or rec.get("answer"), output_len)
            return ChatSample(turns[: first_user + 1], reply, output_len)
    if "instruction" in rec:  # alpaca (seed tasks carry `instances`, the 52k set `input`/`output`)
        inst = rec.get("instances") or [{"input": rec.get("input", ""), "output": rec.get("output")}]
        first = inst[0] if inst and isinstance(inst[0], dict) else {}
        text = str(rec["instruction"]).strip()
        if first.get("input"):
            text += "\n\n" + str(first["input"]).strip()
        return ChatSample([{"role": "user", "content": text}], first.get("output"), output_len)
    for key in ("question", "prompt", "text", "input"):
        if isinstance(rec.get(key), str):
            ref = next((rec[k] for k in ("answer", "output", "response", "completion", "reference")
                        if isinstance(rec.get(k), str)), None)
            return ChatSample([{"role": "user", "content": rec[key]}], ref, output_len)
    return None


def load_chat_samples(path: Path) -> list[ChatSample]:
    samples = [s for s in (sample_from_record(r) for r in read_jsonl_or_json(path)) if s is not None]
    if not samples:
        raise ValueError(f"{path}: no usable prompts (expected messages/conversations, question, "
                         "prompt, text or instruction fields)")
    return samples


def default_dataset_path(name: str) -> Path:
    if name not in DEFAULT_DATA:
        raise ValueError(f"--dataset-path is required for the {name!r} dataset")
    return DEFAULT_DATA[name]


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer: Any, messages: Messages) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def rows_from_samples(
    samples: Sequence[ChatSample], tokenizer: Any, apply_chat_template: bool, fixed_output_len: int | None,
    default_output_len: int, max_prompt_len: int | None = None, max_total_len: int | None = None,
) -> list[DatasetRow]:
    rows = []
    for s in samples:
        multi = len(s.messages) > 1
        # a multi-turn prompt has no faithful plain-text form: it always gets the template
        prompt = render_chat(tokenizer, s.messages) if (apply_chat_template or multi) else s.messages[-1]["content"]
        prompt_len = len(encode(tokenizer, prompt))
        if fixed_output_len is not None:
            out_len = fixed_output_len
        elif s.output_len is not None:
            out_len = s.output_len
        elif s.reference:
            out_len = len(encode(tokenizer, s.reference))
        else:
            out_len = default_output_len
        if prompt_len < 2 or out_len < 2:
            continue
        if max_prompt_len is not None and prompt_len > max_prompt_len:
            continue
        if max_total_len is not None and prompt_len + out_len > max_total_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, out_len, list(s.messages)))
    return rows


def sample_random_rows(
    tokenizer: Any, num_prompts: int, input_len: int, output_len: int, range_ratio: float,
    apply_chat_template: bool, rng: np.random.Generator,
) -> list[DatasetRow]:
    """Prompts of random (non-special) token ids, lengths uniform in [len * ratio, len]."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    in_lens = rng.integers(max(int(input_len * range_ratio), 1), input_len + 1, size=num_prompts)
    out_lens = rng.integers(max(int(output_len * range_ratio), 1), output_len + 1, size=num_prompts)
    rows = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = rng.choice(len(vocab), size=int(n_in))
        text = tokenizer.decode([vocab[int(i)] for i in ids])
        messages = [{"role": "user", "content": text}]
        prompt = render_chat(tokenizer, messages) if apply_chat_template else text
        rows.append(DatasetRow(prompt, len(encode(tokenizer, prompt)), int(n_out), messages))
    return rows


def get_dataset(args: argparse.Namespace, tokenizer: Any) -> list[DatasetRow]:
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "random":
        return sample_random_rows(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                  args.random_range_ratio, args.apply_chat_template, rng)
    path = Path(args.dataset_path) if args.dataset_path else default_dataset_path(args.dataset_name)
    samples = load_chat_samples(path)
    if args.dataset_name == "sharegpt":
        random.Random(args.seed).shuffle(samples)
        # SGLang's limits for ShareGPT unless the output length is fixed
        limits: tuple[int | None, int | None] = (1024, 2048) if args.sharegpt_output_len is None else (None, None)
    else:
        limits = (None, None)
    rows: list[DatasetRow] = []
    # tokenize lazily: only as many samples as needed (ShareGPT files are large)
    step = max(args.num_prompts, 64)
    for start in range(0, len(samples), step):
        rows += rows_from_samples(samples[start:start + step], tokenizer, args.apply_chat_template,
                                  args.sharegpt_output_len, args.random_output_len, *limits)
        if len(rows) >= args.num_prompts:
            break
    if len(rows) < args.num_prompts:
        print(f"warning: {path} gives {len(rows)} usable prompts, fewer than --num-prompts "
              f"{args.num_prompts}", file=sys.stderr)
    return rows[: args.num_prompts]


# ---- requests -----------------------------------------------------------------------------------
@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    generated_text: str = ""
    prompt_len: int = 0  # the server's count when reported, else the client's
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    start: float = 0.0  # perf_counter at send
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each content chunk
    spec_verify_ct: int | None = None
    spec_emitted: float | None = None  # accept length * verify steps = tokens emitted by verify steps


@dataclass
class Target:
    backend: str
    base_url: str
    model: str | None
    headers: dict[str, str]
    stream: bool
    ignore_eos: bool
    extra_body: dict[str, Any]


def _sse_payload(line: str) -> str | None:
    line = line.strip()
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _record_spec(out: RequestOutput, meta: dict[str, Any] | None) -> None:
    if not meta:
        return
    ct = meta.get("spec_verify_ct")
    if not isinstance(ct, (int, float)) or ct <= 0:
        return
    out.spec_verify_ct = int(ct)
    length = meta.get("spec_accept_length")
    if isinstance(length, (int, float)) and length > 0:
        out.spec_emitted = float(length) * int(ct)
    elif isinstance(meta.get("completion_tokens"), int):  # SGLang: completion tokens / verify steps
        out.spec_emitted = float(meta["completion_tokens"])


def _chunk(out: RequestOutput, now: float, tokens: int) -> None:
    if not out.chunk_times:
        out.ttft = now - out.start
    else:
        out.itl.append(now - out.chunk_times[-1])
    out.chunk_times.append(now)
    out.chunk_tokens.append(tokens)


def _error_text(status: int, body: bytes) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = body.decode("utf-8", "replace")[:500]
    return f"HTTP {status}: {msg}"


async def request_native(client: Any, t: Target, row: DatasetRow, tokenizer: Any) -> RequestOutput:
    """SGLang's /generate; stream chunks carry the cumulative text and completion_tokens."""
    payload: dict[str, Any] = {
        "text": row.prompt,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": row.output_len, "ignore_eos": t.ignore_eos},
        "stream": t.stream,
        **t.extra_body,
    }
    out = RequestOutput(prompt_len=row.prompt_len, start=time.perf_counter())
    if not t.stream:
        resp = await client.post(f"{t.base_url}/generate", json=payload, headers=t.headers)
        now = time.perf_counter()
        if resp.status_code != 200:
            out.error = _error_text(resp.status_code, resp.content)
            return out
        data = resp.json()
        meta = data.get("meta_info") or {}
        out.generated_text = data.get("text", "")
        out.output_len = int(meta.get("completion_tokens") or len(encode(tokenizer, out.generated_text)))
        _chunk(out, now, out.output_len)
        out.prompt_len = int(meta.get("prompt_tokens") or row.prompt_len)
        _record_spec(out, meta)
        out.latency = now - out.start
        out.success = True
        return out
    async with client.stream("POST", f"{t.base_url}/generate", json=payload, headers=t.headers) as resp:
        if resp.status_code != 200:
            out.error = _error_text(resp.status_code, await resp.aread())
            return out
        text = ""
        tokens = 0
        meta = {}
        async for line in resp.aiter_lines():
            data = _sse_payload(line)
            if data is None or data == "[DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(data)
            meta = chunk.get("meta_info") or {}
            new_text = chunk.get("text", "")
            count = meta.get("completion_tokens")
            if isinstance(count, int):  # the server's cumulative count
                new_tokens, tokens = count - tokens, count
            else:
                new_tokens = len(encode(tokenizer, new_text[len(text):])) if new_text != text else 0
                tokens += new_tokens
            if new_tokens > 0:
                _chunk(out, now, new_tokens)
            text = new_text
        out.latency = time.perf_counter() - out.start
    out.generated_text = text
    count = meta.get("completion_tokens")
    out.output_len = int(count) if isinstance(count, int) else len(encode(tokenizer, text))
    out.prompt_len = int(meta.get("prompt_tokens") or row.prompt_len)
    _record_spec(out, meta)
    out.success = True
    return out


async def request_openai(client: Any, t: Target, row: DatasetRow, tokenizer: Any) -> RequestOutput:
    """/v1/completions or /v1/chat/completions (backend openai-chat)."""
    chat = t.backend == "openai-chat"
    payload: dict[str, Any] = {"temperature": 0.0, "max_tokens": row.output_len, "stream": t.stream,
                               "ignore_eos": t.ignore_eos}
    if t.model:
        payload["model"] = t.model
    if chat:
        payload["messages"] = row.messages or [{"role": "user", "content": row.prompt}]
    else:
        payload["prompt"] = row.prompt
    if t.stream:
        payload["stream_options"] = {"include_usage": True}
    payload.update(t.extra_body)
    url = f"{t.base_url}/v1/chat/completions" if chat else f"{t.base_url}/v1/completions"
    out = RequestOutput(prompt_len=row.prompt_len, start=time.perf_counter())
    usage: dict[str, Any] = {}
    metadata: dict[str, Any] | None = None
    if not t.stream:
        resp = await client.post(url, json=payload, headers=t.headers)
        now = time.perf_counter()
        if resp.status_code != 200:
            out.error = _error_text(resp.status_code, resp.content)
            return out
        data = resp.json()
        choice = (data.get("choices") or [{}])[0]
        out.generated_text = ((choice.get("message") or {}).get("content") or "") if chat else choice.get("text", "")
        usage = data.get("usage") or {}
        metadata = data.get("metadata")
        out.output_len = int(usage.get("completion_tokens") or len(encode(tokenizer, out.generated_text)))
        _chunk(out, now, out.output_len)
        out.latency = now - out.start
    else:
        async with client.stream("POST", url, json=payload, headers=t.headers) as resp:
            if resp.status_code != 200:
                out.error = _error_text(resp.status_code, await resp.aread())
                return out
            parts: list[str] = []
            async for line in resp.aiter_lines():
                data = _sse_payload(line)
                if data is None or data == "[DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                metadata = chunk.get("metadata") or metadata
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                delta = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
                if delta:
                    _chunk(out, now, max(1, len(encode(tokenizer, delta))))
                    parts.append(delta)
            out.latency = time.perf_counter() - out.start
        out.generated_text = "".join(parts)
        out.output_len = int(usage.get("completion_tokens") or len(encode(tokenizer, out.generated_text)))
    out.prompt_len = int(usage.get("prompt_tokens") or row.prompt_len)
    _record_spec(out, metadata)
    out.success = True
    return out


async def send(client: Any, t: Target, row: DatasetRow, tokenizer: Any) -> RequestOutput:
    fn = request_native if t.backend in NATIVE_BACKENDS else request_openai
    try:
        return await fn(client, t, row, tokenizer)
    except Exception as e:  # one failed request must not stop the run
        out = RequestOutput(prompt_len=row.prompt_len)
        out.error = f"{type(e).__name__}: {e}" if str(e) else traceback.format_exc(limit=2)
        return out


# ---- server information -------------------------------------------------------------------------
async def get_json(client: Any, url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        resp = await client.get(url, headers=headers, timeout=10)
        if resp.status_code == 200:
            data = resp.json()
            return data if isinstance(data, dict) else None
    except Exception:
        return None
    return None


def server_accept_stats(info: dict[str, Any] | None) -> tuple[float | None, int | None, list[int] | None]:
    """(avg accept length, verify steps, accepted-at-depth counts) from /get_server_info."""
    if not info:
        return None, None, None
    if isinstance(info.get("decode"), list) and info["decode"] and isinstance(info["decode"][0], dict):
        info = info["decode"][0]  # SGLang's PD layout
    metrics: dict[str, Any] = info.get("metrics") or {}
    avg = info.get("avg_spec_accept_length")
    states = info.get("internal_states")
    if avg is None and isinstance(states, list) and states and isinstance(states[0], dict):
        avg = states[0].get("avg_spec_accept_length")
    ct = metrics.get("spec_verify_ct")
    depth = metrics.get("spec_accepted_at_depth")
    return (float(avg) if isinstance(avg, (int, float)) else None,
            int(ct) if isinstance(ct, int) else None,
            [int(x) for x in depth] if isinstance(depth, list) else None)


def run_accept_length(
    outputs: Sequence[RequestOutput], before: dict[str, Any] | None, after: dict[str, Any] | None
) -> tuple[float | None, str | None]:
    ok = [o for o in outputs if o.success and o.spec_verify_ct and o.spec_emitted is not None]
    if ok:
        steps = sum(o.spec_verify_ct or 0 for o in ok)
        return sum(o.spec_emitted or 0.0 for o in ok) / steps, "requests"
    avg0, ct0, _ = server_accept_stats(before)
    avg1, ct1, _ = server_accept_stats(after)
    if avg1 is not None and ct1 is not None and avg0 is not None and ct0 is not None:
        if ct1 > ct0:  # the server's counters moved: this run's share
            return (avg1 * ct1 - avg0 * ct0) / (ct1 - ct0), "server_info_delta"
        return None, None
    if avg1:  # no counters (SGLang): the engine-wide average
        return avg1, "server_info"
    return None, None


# ---- metrics ------------------------------------------------------------------------------------
def _stats(values: Sequence[float], prefix: str) -> dict[str, float]:
    arr = np.asarray(values if len(values) else [0.0], dtype=float) * 1000.0
    return {
        f"mean_{prefix}_ms": float(arr.mean()),
        f"median_{prefix}_ms": float(np.median(arr)),
        f"std_{prefix}_ms": float(arr.std()),
        f"p95_{prefix}_ms": float(np.percentile(arr, 95)),
        f"p99_{prefix}_ms": float(np.percentile(arr, 99)),
        f"max_{prefix}_ms": float(arr.max()),
    }


def peak_output_throughput(outputs: Sequence[RequestOutput], start: float) -> float:
    """Most tokens streamed in one 1-second window of the run (tok/s)."""
    buckets: dict[int, int] = {}
    for o in outputs:
        if not o.success:
            continue
        for t, n in zip(o.chunk_times, o.chunk_tokens):
            b = int(max(t - start, 0.0))
            buckets[b] = buckets.get(b, 0) + n
    return float(max(buckets.values(), default=0))


def calculate_metrics(outputs: Sequence[RequestOutput], duration: float, start: float) -> dict[str, Any]:
    ok = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_len for o in ok)
    e2e = [o.latency for o in ok]
    ttfts = [o.ttft for o in ok]
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1]
    itls = [x for o in ok for x in o.itl]
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "duration": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "peak_output_throughput": peak_output_throughput(ok, start),
        "total_throughput": (total_input + total_output) / duration,
        "concurrency": sum(e2e) / duration,
    }
    m.update(_stats(e2e, "e2e_latency"))
    m.update(_stats(ttfts, "ttft"))
    m.update(_stats(tpots, "tpot"))
    m.update(_stats(itls, "itl"))
    return m


def format_result(backend: str, request_rate: float, max_concurrency: int | None, m: dict[str, Any]) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40} {format(value, fmt) if fmt else str(value):<10}")

    row("Backend:", backend)
    row("Traffic request rate:", request_rate)
    row("Max request concurrency:", max_concurrency if max_concurrency else "not set")
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration"], ".2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], ".2f")
    row("Input token throughput (tok/s):", m["input_throughput"], ".2f")
    row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", m["peak_output_throughput"], ".2f")
    row("Total token throughput (tok/s):", m["total_throughput"], ".2f")
    row("Concurrency:", m["concurrency"], ".2f")
    if m.get("accept_length"):
        row("Accept length:", m["accept_length"], ".2f")
    for title, key, name in (("End-to-End Latency", "e2e_latency", "E2E Latency"),
                             ("Time to First Token", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             ("Inter-Token Latency", "itl", "ITL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {name} (ms):", m[f"mean_{key}_ms"], ".2f")
        row(f"Median {name} (ms):", m[f"median_{key}_ms"], ".2f")
        row(f"P95 {name} (ms):", m[f"p95_{key}_ms"], ".2f")
        row(f"P99 {name} (ms):", m[f"p99_{key}_ms"], ".2f")
        if key == "itl":
            row("Max ITL (ms):", m["max_itl_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------
def _make_client() -> Any:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(6 * 3600.0, connect=30.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def benchmark(args: argparse.Namespace, target: Target, rows: list[DatasetRow], tokenizer: Any) -> dict[str, Any]:
    from tqdm import tqdm

    async with _make_client() as client:
        if args.warmup_requests > 0:
            w = rows[0]
            warm = DatasetRow(w.prompt, w.prompt_len, min(w.output_len, 32), w.messages)
            outs = await asyncio.gather(*(send(client, target, warm, tokenizer) for _ in range(args.warmup_requests)))
            if not any(o.success for o in outs):
                raise RuntimeError(f"warmup failed: {outs[0].error}")
        info_before = await get_json(client, f"{target.base_url}/get_server_info", target.headers)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        pbar = tqdm(total=len(rows), disable=args.disable_tqdm, file=sys.stderr)

        async def one(row: DatasetRow) -> RequestOutput:
            if sem is None:
                out = await send(client, target, row, tokenizer)
            else:
                async with sem:
                    out = await send(client, target, row, tokenizer)
            pbar.update(1)
            return out

        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        tasks = []
        for i, row in enumerate(rows):
            tasks.append(asyncio.create_task(one(row)))
            if math.isfinite(args.request_rate) and i + 1 < len(rows):
                await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        pbar.close()
        info_after = await get_json(client, f"{target.base_url}/get_server_info", target.headers)
    m = calculate_metrics(outputs, duration, start)
    m["accept_length"], m["accept_length_source"] = run_accept_length(outputs, info_before, info_after)
    m["_outputs"] = outputs
    return m


def resolve_base_url(args: argparse.Namespace) -> str:
    if args.base_url:
        return str(args.base_url).rstrip("/")
    return f"http://{args.host}:{args.port}"


def load_tokenizer(args: argparse.Namespace, base_url: str, headers: dict[str, str]) -> Any:
    """--tokenizer, else the server's /get_model_info tokenizer path, else the embedded model."""
    import httpx
    from transformers import AutoTokenizer

    candidates: list[str] = []
    if args.tokenizer:
        candidates.append(args.tokenizer)
    else:
        try:
            info = httpx.get(f"{base_url}/get_model_info", headers=headers, timeout=10).json()
            path = info.get("tokenizer_path") or info.get("model_path")
            if isinstance(path, str) and path:
                candidates.append(path)
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
    for name in candidates:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            if args.tokenizer:
                raise
            print(f"warning: cannot load the server's tokenizer {name!r} ({e}); using the embedded "
                  "model's", file=sys.stderr)
    from specdec.target.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(str(ensure_embedded_model()))


def resolve_model(args: argparse.Namespace, base_url: str, headers: dict[str, str]) -> str | None:
    if args.model:
        return str(args.model)
    import httpx

    try:
        data = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()
        return str(data["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def result_record(args: argparse.Namespace, m: dict[str, Any], rows: Sequence[DatasetRow]) -> dict[str, Any]:
    outputs: list[RequestOutput] = m["_outputs"]
    rec: dict[str, Any] = {
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "num_prompts": len(rows),
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "sharegpt_output_len": args.sharegpt_output_len,
        "seed": args.seed,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rec.update({k: v for k, v in m.items() if not k.startswith("_")})
    rec["input_lens"] = [o.prompt_len for o in outputs]
    rec["output_lens"] = [o.output_len if o.success else 0 for o in outputs]
    rec["ttfts"] = [o.ttft for o in outputs]
    rec["e2e_latencies"] = [o.latency for o in outputs]
    rec["errors"] = [o.error for o in outputs]
    if args.output_details:
        rec["itls"] = [o.itl for o in outputs]
        rec["generated_texts"] = [o.generated_text for o in outputs]
    return rec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench_serving",
                                description="Benchmark online serving (sglang.bench_serving's flags).")
    p.add_argument("--backend", choices=BACKENDS, default="specdec",
                   help="specdec/sglang: native /generate; openai/vllm: /v1/completions; "
                   "openai-chat: /v1/chat/completions")
    p.add_argument("--base-url", default=None, help="Server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="Model name for OpenAI routes (default: the server's first)")
    p.add_argument("--tokenizer", default=None,
                   help="Tokenizer name or folder (default: the server's /get_model_info, else the embedded model)")
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT json/jsonl, chat-prompt jsonl (custom) or gsm8k jsonl "
                   "(default for gsm8k, alpaca and chat: the files shipped in specdec.bench.data)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024,
                   help="Output length of random prompts, and of dataset prompts without a reference reply")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="Random lengths are drawn uniformly from [len * ratio, len]")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="Fix the output length of dataset prompts (default: the reference reply's length)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Requests per second with Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="Max requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="Append one JSON line with the results to this file")
    p.add_argument("--output-details", action="store_true", help="Also write ITLs and texts per request")
    p.add_argument("--disable-stream", action="store_true", help="Non-streaming requests (TTFT = E2E)")
    p.add_argument("--disable-ignore-eos", action="store_true", help="Let requests stop at EOS")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="Wrap prompts in the tokenizer's chat template (text backends)")
    p.add_argument("--warmup-requests", type=int, default=1, help="Untimed requests before the run")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--extra-request-body", default=None, metavar='\'{"key": value}\'',
                   help="JSON merged into every request body")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer token (default: $OPENAI_API_KEY)")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        p.error("--num-prompts must be >= 1")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        p.error("--random-range-ratio must be in [0, 1]")
    if args.request_rate <= 0:
        p.error("--request-rate must be > 0 (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    if args.random_input_len < 1 or args.random_output_len < 1:
        p.error("--random-input-len and --random-output-len must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = resolve_base_url(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    random.seed(args.seed)
    np.random.seed(args.seed)
    tokenizer = load_tokenizer(args, base_url, headers)
    rows = get_dataset(args, tokenizer)
    if not rows:
        print("error: the dataset gave no prompts", file=sys.stderr)
        return 2
    model = resolve_model(args, base_url, headers) if args.backend not in NATIVE_BACKENDS else args.model
    target = Target(args.backend, base_url, model, headers, not args.disable_stream,
                    not args.disable_ignore_eos, extra)
    print(f"{args.backend} at {base_url}: {len(rows)} prompts ({args.dataset_name}), "
          f"request rate {args.request_rate}, max concurrency {args.max_concurrency or 'not set'}",
          file=sys.stderr)
    try:
        m = asyncio.run(benchmark(args, target, rows, tokenizer))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_result(args.backend, args.request_rate, args.max_concurrency, m), flush=True)
    errors = [o.error for o in m["_outputs"] if not o.success]
    if errors:
        print(f"{len(errors)} request(s) failed; first error: {errors[0]}", file=sys.stderr)
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(result_record(args, m, rows)) + "\n")
    return 0 if m["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
