"""Few-shot GSM8K accuracy against a running server, like `sglang.test.few_shot_gsm8k`.

Each prompt is `--num-shots` solved examples from the training split followed by the test
question, in the "Question: ...\\nAnswer: ..." format; generation is greedy and stops at
"Question:" or a blank-line run. The prediction is the last number of the answer, compared
with the number after `####` in the reference.

    python -m specdec.bench.few_shot_gsm8k --port 30000 --num-questions 200 --parallel 8

Requests go to SGLang's native `/generate` (`--backend specdec` / `sglang`) or to
`/v1/completions` (`--backend openai`, e.g. vLLM). Prints Accuracy, Invalid (share of answers
without a number), Latency and Output throughput; `--output-file` appends one JSON line.
Speculative decoding is lossless, so accuracy must not depend on the speculative settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdec.bench.bench_serving import BENCH_DATA

STOP = ["Question:", "\n\n\n"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def example(rec: dict[str, Any], with_answer: bool) -> str:
    text = "Question: " + str(rec["question"]).strip() + "\nAnswer:"
    if with_answer:
        text += " " + str(rec["answer"]).strip()
    return text


def few_shot_prefix(shots: Sequence[dict[str, Any]]) -> str:
    return "".join(example(r, True) + "\n\n" for r in shots)


def last_number(text: str) -> float | None:
    """The last number in the text (thousands separators removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def label_of(answer: str) -> float | None:
    return last_number(answer.split("####")[-1])


@dataclass
class Result:
    completion: str
    output_tokens: int
    error: str | None = None


async def ask(client: Any, args: argparse.Namespace, base_url: str, headers: dict[str, str], prompt: str) -> Result:
    try:
        if args.backend == "openai":
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": args.max_new_tokens,
                                    "temperature": args.temperature, "stop": STOP}
            if args.model:
                body["model"] = args.model
            resp = await client.post(f"{base_url}/v1/completions", json=body, headers=headers)
            resp.raise_for_status()
            data = resp.json()
            text = data["choices"][0]["text"]
            tokens = (data.get("usage") or {}).get("completion_tokens")
        else:
            body = {"text": prompt, "sampling_params": {"max_new_tokens": args.max_new_tokens,
                                                        "temperature": args.temperature, "stop": STOP}}
            resp = await client.post(f"{base_url}/generate", json=body, headers=headers)
            resp.raise_for_status()
            data = resp.json()
            text = data["text"]
            tokens = (data.get("meta_info") or {}).get("completion_tokens")
        return Result(text, tokens if isinstance(tokens, int) else 0)  # servers report the count
    except Exception as e:  # counted as invalid; the run goes on
        return Result("", 0, f"{type(e).__name__}: {e}")


async def run_all(args: argparse.Namespace, base_url: str, prompts: list[str]) -> tuple[list[Result], float]:
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.parallel)
    pbar = tqdm(total=len(prompts), disable=args.disable_tqdm, file=sys.stderr)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0)) as client:

        async def one(prompt: str) -> Result:
            async with sem:
                r = await ask(client, args, base_url, headers, prompt)
            pbar.update(1)
            return r

        t0 = time.perf_counter()
        results = list(await asyncio.gather(*(one(p) for p in prompts)))
        latency = time.perf_counter() - t0
    pbar.close()
    return results, latency


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.few_shot_gsm8k",
                                description="Few-shot GSM8K accuracy against a running server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-questions", type=int, default=200)
    p.add_argument("--num-shots", type=int, default=5, help="Solved examples from the training split")
    p.add_argument("--parallel", type=int, default=8, help="Requests in flight")
    p.add_argument("--data-path", default=str(BENCH_DATA / "gsm8k_test.jsonl"),
                   help="Test questions (default: GSM8K's test split, shipped in specdec.bench.data)")
    p.add_argument("--train-path", default=str(BENCH_DATA / "gsm8k_shots.jsonl"),
                   help="Source of the shots, taken in order (default: the first 16 training questions)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--backend", choices=("specdec", "sglang", "openai"), default="specdec",
                   help="specdec/sglang: /generate; openai: /v1/completions")
    p.add_argument("--model", default=None, help="Model name for --backend openai")
    p.add_argument("--base-url", default=None, help="Server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--output-file", default=None, help="Append one JSON line with the results")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_questions", "parallel", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_shots < 0:
        p.error("--num-shots must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    try:
        tests = read_jsonl(Path(args.data_path))[: args.num_questions]
        shots = read_jsonl(Path(args.train_path))[: args.num_shots] if args.num_shots else []
    except OSError as e:
        print(f"few_shot_gsm8k: error: {e}", file=sys.stderr)
        return 2
    prefix = few_shot_prefix(shots)
    prompts = [prefix + example(r, False) for r in tests]
    labels = [label_of(str(r["answer"])) for r in tests]
    results, latency = asyncio.run(run_all(args, base_url, prompts))
    preds = [last_number(r.completion) if r.error is None else None for r in results]
    correct = sum(p is not None and lab is not None and math.isclose(p, lab, abs_tol=1e-6)
                  for p, lab in zip(preds, labels))
    n = len(tests)
    accuracy = correct / n if n else 0.0
    invalid = sum(p is None for p in preds) / n if n else 0.0
    failed = [r.error for r in results if r.error is not None]
    output_tokens = sum(r.output_tokens for r in results)
    throughput = output_tokens / latency if latency > 0 else 0.0
    print(f"Accuracy: {accuracy:.3f}")
    print(f"Invalid: {invalid:.3f}")
    print(f"Latency: {latency:.3f} s")
    print(f"Output throughput: {throughput:.3f} token/s")
    if failed:
        print(f"Failed requests: {len(failed)} (first: {failed[0]})", file=sys.stderr)
    if args.output_file:
        record = {
            "task": "gsm8k", "backend": args.backend, "base_url": base_url, "num_questions": n,
            "num_shots": len(shots), "parallel": args.parallel, "max_new_tokens": args.max_new_tokens,
            "accuracy": accuracy, "invalid": invalid, "latency": latency, "output_throughput": throughput,
            "output_tokens": output_tokens, "num_requests": n, "failed": len(failed),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if len(failed) < n else 1


if __name__ == "__main__":
    sys.exit(main())
