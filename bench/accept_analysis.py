"""Acceptance-rate analysis of speculative decoding over a prompt set and tree configurations.

For each speculative config (`--configs steps,topk,draft_tokens ...`, or a `--sweep` over
steps x topk x draft tokens) the prompts run through the offline engine (a fresh
`specdec.Engine` per config, same model) and every verify step is recorded through
`SpecWorker.trace`: tokens accepted and emitted, the tree depth and the position along the
response. A non-speculative baseline runs on the same prompts in the same process, so the
tokens/s ratio compares like with like.

    python -m specdec.bench.accept_analysis --dataset gsm8k --num-prompts 20 --max-new-tokens 128 \\
        --speculative-algorithm EAGLE3 --configs 5,4,8 3,1,4 6,8,32 --output-dir accept_out
    python -m specdec.bench.accept_analysis --sweep --speculative-algorithm NGRAM --num-prompts 8
    python -m specdec.bench.accept_analysis --base-url http://127.0.0.1:30000 --num-prompts 20

With `--base-url` the prompts go to a running server instead (its one configuration): each
streamed `/generate` chunk after the first is one verify step (specdec publishes once per
step), per-depth acceptance comes from the change of `/get_server_info` over the run, and a
baseline is measured only against `--baseline-base-url`.

Reported per config: accept length (emitted tokens / verify steps, SGLang's definition),
accept rate (accepted drafts / tree depth), the distribution of tokens per step, acceptance by
tree depth (share of steps whose accepted path reached depth d), per-request accept lengths,
accept length along the response (position buckets of `--position-bucket` tokens), tokens/s
and the speedup over the baseline. Outputs in `--output-dir`: `accept_analysis.json`,
`accept_analysis.md`, and PNG plots (`accept_length_hist.png`, `accept_by_depth.png`,
`tokens_per_s_vs_accept_length.png`, `accept_by_position.png`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.bench.bench_serving import (
    DEFAULT_DATA,
    ChatSample,
    get_json,
    load_chat_samples,
    render_chat,
    server_accept_stats,
)

DATASETS = ("chat", "gsm8k", "alpaca", "custom")
ALGORITHMS = ("EAGLE3", "EAGLE", "NGRAM")


# ---- configurations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeConfig:
    num_steps: int
    topk: int
    num_draft_tokens: int

    @property
    def label(self) -> str:
        return f"{self.num_steps},{self.topk},{self.num_draft_tokens}"


def parse_config(text: str) -> TreeConfig:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a config is steps,topk,draft_tokens (e.g. 5,4,8); got {text!r}")
    return TreeConfig(*(int(p) for p in parts))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def validate_config(algorithm: str, cfg: TreeConfig) -> str | None:
    """None when SGLang's rules accept the config, else the reason."""
    from specdec.spec_config import SpecConfig

    try:
        SpecConfig(algorithm, None, cfg.num_steps, cfg.topk, cfg.num_draft_tokens)
    except ValueError as e:
        return str(e)
    return None


def sweep_configs(
    algorithm: str, steps: Sequence[int], topks: Sequence[int], drafts: Sequence[int]
) -> tuple[list[TreeConfig], list[dict[str, str]]]:
    """The valid combinations; topk 1 is a chain, so its draft tokens become steps + 1 (as SGLang
    adjusts them). Invalid combinations are returned with the reason."""
    configs: list[TreeConfig] = []
    skipped: list[dict[str, str]] = []
    for s, k, n in itertools.product(steps, topks, drafts):
        cfg = TreeConfig(s, k, s + 1 if k == 1 else n)
        if cfg in configs:
            continue
        reason = validate_config(algorithm, cfg)
        if reason is None:
            configs.append(cfg)
        elif all(d["config"] != cfg.label for d in skipped):
            skipped.append({"config": cfg.label, "reason": reason})
    return configs, skipped


# ---- records ------------------------------------------------------------------------------------
@dataclass
class Step:
    position: int  # output tokens before the step
    accepted: int
    emitted: int
    depth: int | None  # tree depth (unknown against a server)


@dataclass
class RequestRecord:
    output_ids: list[int]
    output_tokens: int
    steps: list[Step]
    accept_length: float | None  # the engine's / server's per-request figure


@dataclass
class Run:
    label: str
    algorithm: str | None  # None: the non-speculative baseline
    config: TreeConfig | None
    seconds: float
    requests: list[RequestRecord]
    # against a server: per-depth counts and verify steps of this run (from /get_server_info)
    server_depth_counts: list[int] | None = None
    server_verify_ct: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


# ---- prompts ------------------------------------------------------------------------------------
def load_prompts(args: argparse.Namespace) -> list[ChatSample]:
    if args.dataset == "custom" and not args.dataset_path:
        raise ValueError("--dataset custom needs --dataset-path (a jsonl of chat prompts)")
    path = Path(args.dataset_path) if args.dataset_path else DEFAULT_DATA[args.dataset]
    samples = load_chat_samples(path)
    if len(samples) < args.num_prompts:
        print(f"warning: {path} has {len(samples)} prompts, fewer than --num-prompts {args.num_prompts}",
              file=sys.stderr)
    return samples[: args.num_prompts]


# ---- offline engine ---------------------------------------------------------------------------
def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": args.dtype, "log_level": "warning", "quantization": args.quantization}
    if args.model_path:
        kw["model_path"] = args.model_path
    if args.max_total_tokens:
        kw["max_total_tokens"] = args.max_total_tokens
    if args.random_seed is not None:
        kw["random_seed"] = args.random_seed
    return kw


def run_offline(
    args: argparse.Namespace, prompts: list[list[int]], algorithm: str | None, cfg: TreeConfig | None
) -> Run:
    from specdec import Engine

    kw = engine_kwargs(args)
    if algorithm is not None and cfg is not None:
        kw.update(speculative_algorithm=algorithm, speculative_num_steps=cfg.num_steps,
                  speculative_eagle_topk=cfg.topk, speculative_num_draft_tokens=cfg.num_draft_tokens)
        if algorithm != "NGRAM":
            kw["speculative_draft_model_path"] = args.speculative_draft_model_path
    label = "baseline" if cfg is None else cfg.label
    print(f"[accept_analysis] {label}: loading the engine ...", file=sys.stderr, flush=True)
    engine = Engine(**kw)
    params: dict[str, Any] = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                              "ignore_eos": args.ignore_eos}
    if args.temperature > 0:
        params["seed"] = args.seed
    try:
        if args.warmup:
            engine.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 4})
        spec = engine.spec
        if spec is not None:
            spec.trace = []
        outs: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            res = engine.generate(input_ids=prompts[i:i + args.batch_size], sampling_params=params)
            assert isinstance(res, list)
            outs.extend(res)
        seconds = time.perf_counter() - t0
        trace = list(spec.trace or []) if spec is not None else []
        if spec is not None:
            spec.trace = None
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    by_rid: dict[str, list[Step]] = defaultdict(list)
    for r in trace:
        by_rid[r.rid].append(Step(r.position, r.accepted, r.emitted, r.depth))
    requests = []
    for out in outs:
        meta = out["meta_info"]
        al = meta.get("spec_accept_length") if meta.get("spec_verify_ct") else None
        requests.append(RequestRecord(list(out["output_ids"]), int(meta["completion_tokens"]),
                                      by_rid.get(meta["id"], []), al))
    print(f"[accept_analysis] {label}: {sum(r.output_tokens for r in requests)} tokens in {seconds:.2f} s",
          file=sys.stderr, flush=True)
    return Run(label, algorithm, cfg, seconds, requests)


# ---- server ---------------------------------------------------------------------------------------
async def _stream_one(client: Any, base_url: str, headers: dict[str, str], text: str,
                      params: dict[str, Any]) -> RequestRecord:
    payload = {"text": text, "sampling_params": params, "stream": True}
    steps: list[Step] = []
    tokens = 0
    chunks = 0
    meta: dict[str, Any] = {}
    output_ids: list[int] = []
    async with client.stream("POST", f"{base_url}/generate", json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            meta = chunk.get("meta_info") or {}
            output_ids = list(chunk.get("output_ids") or output_ids)
            count = int(meta.get("completion_tokens", tokens))
            new = count - tokens
            if new <= 0:
                continue
            if chunks:  # the first chunk is the prefill's token; every later one a verify step
                steps.append(Step(tokens, new - 1, new, None))
            chunks += 1
            tokens = count
    al = meta.get("spec_accept_length") if meta.get("spec_verify_ct") else None
    return RequestRecord(output_ids, tokens, steps, al)


def server_label(info: dict[str, Any] | None) -> tuple[str, str | None, TreeConfig | None]:
    from specdec.spec_config import DEFAULT_NUM_DRAFT_TOKENS, DEFAULT_NUM_STEPS, DEFAULT_TOPK

    info = info or {}
    algo = info.get("speculative_algorithm")
    if not algo or str(algo).upper() == "NONE":
        return "server", None, None
    steps = info.get("speculative_num_steps") or DEFAULT_NUM_STEPS
    topk = info.get("speculative_eagle_topk") or DEFAULT_TOPK
    drafts = info.get("speculative_num_draft_tokens") or (steps + 1 if topk == 1 else DEFAULT_NUM_DRAFT_TOKENS)
    cfg = TreeConfig(int(steps), int(topk), int(drafts))
    return f"server {algo} {cfg.label}", str(algo), cfg


async def _run_server_async(args: argparse.Namespace, base_url: str, texts: list[str], label: str | None) -> Run:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    params: dict[str, Any] = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                              "ignore_eos": args.ignore_eos}
    if args.temperature > 0:
        params["seed"] = args.seed
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0)) as client:
        before = await get_json(client, f"{base_url}/get_server_info", headers)
        name, algo, cfg = server_label(before)
        sem = asyncio.Semaphore(args.batch_size)

        async def one(text: str) -> RequestRecord:
            async with sem:
                return await _stream_one(client, base_url, headers, text, params)

        t0 = time.perf_counter()
        requests = list(await asyncio.gather(*(one(t) for t in texts)))
        seconds = time.perf_counter() - t0
        after = await get_json(client, f"{base_url}/get_server_info", headers)
    run = Run(label or name, algo, cfg, seconds, requests)
    _, ct0, d0 = server_accept_stats(before)
    _, ct1, d1 = server_accept_stats(after)
    if ct0 is not None and ct1 is not None and d0 is not None and d1 is not None:
        run.server_verify_ct = ct1 - ct0
        run.server_depth_counts = [b - (d0[i] if i < len(d0) else 0) for i, b in enumerate(d1)]
    return run


def run_server(args: argparse.Namespace, base_url: str, texts: list[str], label: str | None = None) -> Run:
    print(f"[accept_analysis] {label or base_url}: {len(texts)} prompts ...", file=sys.stderr, flush=True)
    return asyncio.run(_run_server_async(args, base_url, texts, label))


# ---- summaries ----------------------------------------------------------------------------------
def summarize(run: Run, bucket: int, baseline: Run | None) -> dict[str, Any]:
    steps = [s for r in run.requests for s in r.steps]
    out: dict[str, Any] = {
        "label": run.label,
        "algorithm": run.algorithm,
        "num_steps": run.config.num_steps if run.config else None,
        "topk": run.config.topk if run.config else None,
        "num_draft_tokens": run.config.num_draft_tokens if run.config else None,
        "num_prompts": len(run.requests),
        "output_tokens": run.output_tokens,
        "seconds": run.seconds,
        "tokens_per_s": run.tokens_per_s,
        "speedup": run.tokens_per_s / baseline.tokens_per_s if baseline and baseline.tokens_per_s else None,
        **run.extra,
    }
    if baseline is not None:
        same = sum(a.output_ids == b.output_ids for a, b in zip(run.requests, baseline.requests))
        out["outputs_identical_to_baseline"] = f"{same}/{len(run.requests)}"
    if run.algorithm is None:
        return out
    n = len(steps)
    emitted = sum(s.emitted for s in steps)
    accepted = sum(s.accepted for s in steps)
    known_depth = [s for s in steps if s.depth is not None]
    out["verify_steps"] = n
    out["accept_length"] = emitted / n if n else None
    out["accept_rate"] = (accepted / sum(s.depth or 0 for s in known_depth)
                          if known_depth and sum(s.depth or 0 for s in known_depth) else None)
    hist = Counter(s.emitted for s in steps)
    out["tokens_per_step_hist"] = {str(k): hist[k] for k in sorted(hist)}
    # acceptance by depth: share of verify steps whose accepted path reached depth d
    by_depth = []
    if known_depth:
        max_depth = max(s.depth or 0 for s in known_depth)
        for d in range(1, max_depth + 1):
            reached = sum(s.accepted >= d for s in known_depth)
            tried = sum((s.depth or 0) >= d for s in known_depth)
            prev = sum(s.accepted >= d - 1 and (s.depth or 0) >= d for s in known_depth)
            by_depth.append({"depth": d, "reached": reached, "rate": reached / n,
                             "rate_given_depth": reached / tried if tried else None,
                             "conditional_rate": reached / prev if prev else None})
    elif run.server_depth_counts is not None and run.server_verify_ct:
        prev_count = run.server_verify_ct
        for i, reached in enumerate(run.server_depth_counts):
            by_depth.append({"depth": i + 1, "reached": reached, "rate": reached / run.server_verify_ct,
                             "rate_given_depth": None,
                             "conditional_rate": reached / prev_count if prev_count else None})
            prev_count = reached
    out["acceptance_by_depth"] = by_depth
    per_req = [r.accept_length if r.accept_length is not None else
               (sum(s.emitted for s in r.steps) / len(r.steps) if r.steps else None) for r in run.requests]
    vals = [float(v) for v in per_req if v is not None]
    out["per_request_accept_length"] = per_req
    out["per_request_accept_length_summary"] = {
        "mean": statistics.fmean(vals) if vals else None,
        "median": statistics.median(vals) if vals else None,
        "min": min(vals, default=None),
        "max": max(vals, default=None),
    }
    buckets: dict[int, list[Step]] = defaultdict(list)
    for s in steps:
        buckets[s.position // bucket].append(s)
    out["accept_length_by_position"] = [
        {"start": b * bucket, "end": (b + 1) * bucket, "steps": len(v),
         "accept_length": sum(s.emitted for s in v) / len(v)}
        for b, v in sorted(buckets.items())
    ]
    return out


# ---- reports ------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    lines = [
        "# Acceptance-rate analysis", "",
        f"{s['num_prompts']} prompts ({s['dataset']}), max {s['max_new_tokens']} new tokens, temperature "
        f"{s['temperature']}, batch size {s['batch_size']}, mode {s['mode']}, algorithm {s['algorithm']}.", "",
    ]
    base = report.get("baseline")
    if base:
        lines += [f"Baseline (no speculation): {base['tokens_per_s']:.2f} tok/s "
                  f"({base['output_tokens']} tokens in {base['seconds']:.2f} s).", ""]
    lines += ["| config (steps,topk,draft) | accept length | accept rate | per-request AL mean (min–max) "
              "| verify steps | tokens | tok/s | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for c in report["configs"]:
        pr = c.get("per_request_accept_length_summary") or {}
        lines.append(
            f"| {c['label']} | {_fmt(c.get('accept_length'))} | {_fmt(c.get('accept_rate'))} | "
            f"{_fmt(pr.get('mean'))} ({_fmt(pr.get('min'))}–{_fmt(pr.get('max'))}) | "
            f"{_fmt(c.get('verify_steps'))} | {c['output_tokens']} | {c['tokens_per_s']:.2f} | "
            f"{_fmt(c.get('speedup'))} |")
    depth_rows = [c for c in report["configs"] if c.get("acceptance_by_depth")]
    if depth_rows:
        max_d = max(len(c["acceptance_by_depth"]) for c in depth_rows)
        lines += ["", "Share of verify steps whose accepted path reached depth d:", "",
                  "| config | " + " | ".join(f"d={d}" for d in range(1, max_d + 1)) + " |",
                  "|---|" + "---|" * max_d]
        for c in depth_rows:
            cells = [_fmt(x["rate"]) for x in c["acceptance_by_depth"]] + ["–"] * (max_d - len(c["acceptance_by_depth"]))
            lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    best = report.get("best")
    if best:
        lines += ["", f"Best tokens/s: **{best['label']}** ({best['tokens_per_s']:.2f} tok/s"
                  + (f", {best['speedup']:.2f}x the baseline" if best.get("speedup") else "") + ")."]
    if report.get("skipped"):
        lines += ["", "Skipped combinations: " + "; ".join(f"{d['config']} ({d['reason']})" for d in report["skipped"])]
    lines += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for p in report.get("plots", []))]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in report["configs"] if c.get("verify_steps")]
    paths: list[str] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))

    # 1. tokens emitted per verify step
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(configs), 1)
    for i, c in enumerate(configs):
        hist = {int(k): v for k, v in c["tokens_per_step_hist"].items()}
        total = sum(hist.values())
        xs = sorted(hist)
        ax.bar([x + (i - (len(configs) - 1) / 2) * width for x in xs], [hist[x] / total for x in xs],
               width=width, label=f"{c['label']} (AL {c['accept_length']:.2f})")
    ax.set_xlabel("tokens emitted per verify step (accept length)")
    ax.set_ylabel("share of verify steps")
    ax.set_title("Accept length per verify step")
    if configs:
        ax.legend(fontsize=8)
    save(fig, "accept_length_hist.png")

    # 2. acceptance by tree depth
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in configs:
        rows = c.get("acceptance_by_depth") or []
        if rows:
            ax.plot([r["depth"] for r in rows], [r["rate"] for r in rows], marker="o", label=c["label"])
    ax.set_xlabel("tree depth d")
    ax.set_ylabel("share of steps accepting depth >= d")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance by tree depth")
    if configs:
        ax.legend(fontsize=8)
    save(fig, "accept_by_depth.png")

    # 3. tokens/s vs accept length
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in configs:
        ax.scatter([c["accept_length"]], [c["tokens_per_s"]])
        ax.annotate(c["label"], (c["accept_length"], c["tokens_per_s"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    base = report.get("baseline")
    if base:
        ax.axhline(base["tokens_per_s"], color="gray", linestyle="--", label="no speculation")
        ax.scatter([1.0], [base["tokens_per_s"]], color="gray", marker="s")
        ax.legend(fontsize=8)
    ax.set_xlabel("accept length (tokens per verify step)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs accept length")
    save(fig, "tokens_per_s_vs_accept_length.png")

    # 4. accept length along the response
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in configs:
        rows = c.get("accept_length_by_position") or []
        if rows:
            ax.plot([r["start"] for r in rows], [r["accept_length"] for r in rows], marker=".", label=c["label"])
    ax.set_xlabel(f"position in the response (buckets of {report['setup']['position_bucket']} tokens)")
    ax.set_ylabel("accept length")
    ax.set_title("Accept length along the response")
    if configs:
        ax.legend(fontsize=8)
    save(fig, "accept_by_position.png")
    return paths


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.accept_analysis",
                                description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="chat",
                   help="chat (held-out chat prompts of every category), gsm8k (test split), alpaca: shipped "
                   "in specdec.bench.data; custom: a jsonl of prompts (--dataset-path)")
    p.add_argument("--dataset-path", default=None, help="Overrides the dataset's default file")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="Always generate --max-new-tokens tokens")
    p.add_argument("--batch-size", type=int, default=1,
                   help="Prompts run together (offline) / requests in flight (server)")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed when --temperature > 0")
    p.add_argument("--configs", nargs="+", type=parse_config, default=None, metavar="STEPS,TOPK,DRAFT",
                   help="Tree configs (default: 5,4,8)")
    p.add_argument("--speculative-algorithm", type=str.upper, choices=ALGORITHMS, default=None,
                   help="Default: EAGLE3 with the shipped head for the embedded model, else NGRAM")
    p.add_argument("--speculative-draft-model-path", default=None)
    p.add_argument("--sweep", action="store_true", help="Run every valid steps x topk x draft-tokens combination")
    p.add_argument("--sweep-steps", type=_int_list, default=[1, 2, 3, 4, 5])
    p.add_argument("--sweep-topk", type=_int_list, default=[1, 2, 4])
    p.add_argument("--sweep-draft-tokens", type=_int_list, default=[4, 8, 16])
    p.add_argument("--no-baseline", action="store_true", help="Skip the non-speculative baseline")
    p.add_argument("--position-bucket", type=int, default=32, help="Tokens per position bucket")
    p.add_argument("--warmup", type=int, default=1, choices=(0, 1), help="One untimed generation per engine")
    g = p.add_argument_group("offline engine")
    g.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    g.add_argument("--quantization", default=None, choices=("w8a16", "w8a8_int8", "w4a16"),
                   help="weight-only quantisation of target and draft (default: none)")
    g.add_argument("--max-total-tokens", type=int, default=None)
    g.add_argument("--random-seed", type=int, default=None)
    g = p.add_argument_group("server mode")
    g.add_argument("--base-url", default=None, help="Measure a running server instead of the offline engine")
    g.add_argument("--host", default=None, help="With --port: the server's host (implies server mode)")
    g.add_argument("--port", type=int, default=None, help="The server's port (implies server mode)")
    g.add_argument("--baseline-base-url", default=None, help="A non-speculative server for the baseline")
    g.add_argument("--api-key", default=None)
    g.add_argument("--tokenizer", default=None,
                   help="For the chat template (default: the server's /get_model_info, else the embedded model)")
    p.add_argument("--output-dir", default="accept_analysis_out")
    args = p.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "batch_size", "position_bucket"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.base_url is None and (args.host is not None or args.port is not None):
        args.base_url = f"http://{args.host or '127.0.0.1'}:{args.port or 30000}"
    return args


def resolve_algorithm(args: argparse.Namespace) -> str:
    algo = args.speculative_algorithm
    if algo in (None, "EAGLE3", "EAGLE") and args.speculative_draft_model_path is None and args.model_path is None:
        from specdec.draft.heads import shipped_head_for_embedded

        head = shipped_head_for_embedded()
        if head is not None:
            args.speculative_draft_model_path = str(head)
            return algo or "EAGLE3"
        if algo is None:
            print("[accept_analysis] no shipped EAGLE3 head: using NGRAM", file=sys.stderr)
            return "NGRAM"
    if algo is None:
        return "NGRAM" if args.speculative_draft_model_path is None else "EAGLE3"
    if algo != "NGRAM" and args.speculative_draft_model_path is None:
        raise ValueError(f"--speculative-algorithm {algo} needs --speculative-draft-model-path")
    return str(algo)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        samples = load_prompts(args)
    except (ValueError, OSError) as e:
        print(f"accept_analysis: error: {e}", file=sys.stderr)
        return 2
    skipped: list[dict[str, str]] = []
    runs: list[Run] = []
    baseline: Run | None = None
    if args.base_url:
        from specdec.bench.bench_serving import load_tokenizer

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        tokenizer = load_tokenizer(args, args.base_url.rstrip("/"), headers)
        texts = [render_chat(tokenizer, s.messages) for s in samples]
        if args.configs or args.sweep:
            print("[accept_analysis] server mode measures the server's own configuration; "
                  "--configs / --sweep are ignored", file=sys.stderr)
        if args.baseline_base_url:
            baseline = run_server(args, args.baseline_base_url.rstrip("/"), texts, "baseline")
        runs.append(run_server(args, args.base_url.rstrip("/"), texts))
        mode, algorithm = "server", runs[0].algorithm or "none"
    else:
        from transformers import AutoTokenizer

        from specdec.server.chat_template import load_chat_template
        from specdec.target.embedded import resolve_model_path

        try:
            algorithm = resolve_algorithm(args)
        except ValueError as e:
            print(f"accept_analysis: error: {e}", file=sys.stderr)
            return 2
        if args.sweep:
            configs, skipped = sweep_configs(algorithm, args.sweep_steps, args.sweep_topk, args.sweep_draft_tokens)
        else:
            configs = args.configs or [TreeConfig(5, 4, 8)]
            for cfg in configs:
                reason = validate_config(algorithm, cfg)
                if reason is not None:
                    print(f"accept_analysis: error: config {cfg.label}: {reason}", file=sys.stderr)
                    return 2
        model_path = resolve_model_path(args.model_path)
        template = load_chat_template(None, model_path)
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        prompts = [list(tokenizer.encode(template.render(s.messages), add_special_tokens=False)) for s in samples]
        if not args.no_baseline:
            baseline = run_offline(args, prompts, None, None)
        for cfg in configs:
            runs.append(run_offline(args, prompts, algorithm, cfg))
        mode = "offline"
    position_bucket = args.position_bucket
    report: dict[str, Any] = {
        "setup": {"mode": mode, "dataset": args.dataset if not args.dataset_path else args.dataset_path,
                  "num_prompts": len(samples), "max_new_tokens": args.max_new_tokens,
                  "temperature": args.temperature, "batch_size": args.batch_size, "algorithm": algorithm,
                  "draft_model_path": args.speculative_draft_model_path, "model_path": args.model_path,
                  "position_bucket": position_bucket, "sweep": args.sweep,
                  "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "baseline": summarize(baseline, position_bucket, None) if baseline else None,
        "configs": [summarize(r, position_bucket, baseline) for r in runs],
        "skipped": skipped,
    }
    spec_runs = [c for c in report["configs"] if c.get("verify_steps")]
    if spec_runs:
        best = max(spec_runs, key=lambda c: c["tokens_per_s"])
        report["best"] = {k: best[k] for k in ("label", "tokens_per_s", "speedup", "accept_length")}
    report["plots"] = plot(report, out_dir)
    (out_dir / "accept_analysis.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out_dir / "accept_analysis.md").write_text(md)
    print(md)
    if report.get("best") and (args.sweep or len(spec_runs) > 1):
        b = report["best"]
        print(f"best config by tokens/s: {b['label']} ({b['tokens_per_s']:.2f} tok/s)")
    print(f"wrote {out_dir / 'accept_analysis.json'}, {out_dir / 'accept_analysis.md'} and "
          f"{len(report['plots'])} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
