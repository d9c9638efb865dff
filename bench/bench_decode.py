"""Batch-1 greedy decode speed: the specdec engine vs Hugging Face `generate`, in one run.

Both engines load the same checkpoint (the bundled SmolLM2-135M-Instruct by default) in the
same dtype, get the same chat-templated prompt, and must produce exactly `--max-new-tokens`
tokens. Runs alternate between the engines so that noise on a shared machine hits both.

Reported per engine (medians over `--repeats`):

* e2e tok/s    = new tokens / wall time of one generate call (prefill included);
* TTFT         = wall time of a generate call with max_new_tokens=1 (prefill + one token);
* decode tok/s = (new tokens - 1) / (e2e time - TTFT): the pure decode rate.

    python -m specdec.bench.bench_decode --dtype float32 --max-new-tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MESSAGE = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
OURS, HF = "specdec", "hf"

Generate = Callable[[int], list[int]]
"""max_new_tokens -> the new token ids of one batch-1 greedy generation."""


@dataclass(frozen=True)
class EngineReport:
    engine: str
    dtype: str
    new_tokens: int
    e2e_seconds: list[float]  # one per repeat, max_new_tokens = new_tokens
    ttft_seconds: list[float]  # one per repeat, max_new_tokens = 1
    e2e_tok_s: float  # median
    decode_tok_s: float  # median
    ttft_ms: float  # median


# ---- command line ---------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (decode rate needs 2+ tokens), got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m specdec.bench.bench_decode",
        description="Batch-1 greedy decode throughput: specdec.Engine vs HF transformers generate.",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16",
        help="weight/activation dtype of both engines (default: bfloat16)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=2,
        help="torch.set_num_threads value for both engines (default: 2)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_at_least_two, default=128,
        help="tokens generated per call, forced for both engines (default: 128)",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3,
        help="timed runs per engine; medians are reported (default: 3)",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=1,
        help="untimed runs per engine before timing (default: 1)",
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_MESSAGE,
        help="the user message; the tokenizer's chat template is applied to it",
    )
    parser.add_argument(
        "--model-path", default=None,
        help="HF model folder (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH",
        help="also write the results as JSON to PATH",
    )
    return parser.parse_args(argv)


# ---- setup --------------------------------------------------------------------------------------
def resolve_model_dir(model_path: str | None) -> Path:
    from specdec.target.embedded import ensure_embedded_model

    return ensure_embedded_model() if model_path is None else Path(model_path).expanduser()


def chat_prompt_ids(tokenizer: Any, message: str) -> list[int]:
    """The user message through the tokenizer's chat template (generation prompt appended)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    # the template already emits the special tokens; the engine encodes the same way
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_ours(model_dir: Path, dtype: str, prompt_ids: list[int]) -> Generate:
    from specdec import Engine

    engine = Engine(model_path=str(model_dir), dtype=dtype, log_level="warning")

    def generate(max_new_tokens: int) -> list[int]:
        params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        out = engine.generate(input_ids=prompt_ids, sampling_params=params)
        assert isinstance(out, dict)
        return list(out["output_ids"])

    return generate


def load_hf(model_dir: Path, dtype: str, prompt_ids: list[int], pad_token_id: int | None) -> Generate:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).eval()
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    # explicit: SmolLM2's pad id equals its eos id, which also occurs inside the chat prompt
    attention_mask = torch.ones_like(input_ids)

    def generate(max_new_tokens: int) -> list[int]:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            # No EOS at all: `min_new_tokens` alone would *suppress* the EOS logit and change
            # the greedy path; with `ignore_eos` our engine emits EOS and carries on. An empty
            # list (unlike None, which falls back to the model's EOS) neither stops nor masks.
            eos_token_id=[],
            pad_token_id=pad_token_id,
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
        return [int(t) for t in out[0, input_ids.shape[1]:]]

    return generate


# ---- measurement ----------------------------------------------------------------------------------
def timed(generate: Generate, max_new_tokens: int) -> tuple[float, list[int]]:
    gc.collect()
    start = time.perf_counter()
    tokens = generate(max_new_tokens)
    seconds = time.perf_counter() - start
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"asked for {max_new_tokens} tokens, got {len(tokens)}")
    return seconds, tokens


def measure(
    engines: dict[str, Generate], max_new_tokens: int, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[int]]]:
    """Per engine: full-length times, 1-token times, and the generated tokens (first run)."""
    for generate in engines.values():
        for _ in range(warmup):
            generate(max_new_tokens)
            generate(1)
    e2e: dict[str, list[float]] = {name: [] for name in engines}
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[int]] = {}
    for _ in range(repeats):  # alternate engines so machine noise hits both
        for name, generate in engines.items():
            seconds, tokens = timed(generate, max_new_tokens)
            e2e[name].append(seconds)
            outputs.setdefault(name, tokens)
    for _ in range(repeats):
        for name, generate in engines.items():
            ttft[name].append(timed(generate, 1)[0])
    return e2e, ttft, outputs


def summarize(
    engine: str, dtype: str, new_tokens: int, e2e: list[float], ttft: list[float]
) -> EngineReport:
    first = statistics.median(ttft)
    decode_rates = [(new_tokens - 1) / max(t - first, 1e-9) for t in e2e]
    return EngineReport(
        engine=engine,
        dtype=dtype,
        new_tokens=new_tokens,
        e2e_seconds=e2e,
        ttft_seconds=ttft,
        e2e_tok_s=statistics.median(new_tokens / t for t in e2e),
        decode_tok_s=statistics.median(decode_rates),
        ttft_ms=first * 1e3,
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# ---- output -------------------------------------------------------------------------------------
def format_table(ours: EngineReport, hf: EngineReport) -> str:
    rows = [
        ("engine", "dtype", "e2e tok/s", "decode tok/s", "TTFT ms"),
        *(
            (r.engine, r.dtype, f"{r.e2e_tok_s:.1f}", f"{r.decode_tok_s:.1f}", f"{r.ttft_ms:.1f}")
            for r in (ours, hf)
        ),
        (
            "ours/HF",
            "",
            f"{ours.e2e_tok_s / hf.e2e_tok_s:.2f}x",
            f"{ours.decode_tok_s / hf.decode_tok_s:.2f}x",
            f"{ours.ttft_ms / hf.ttft_ms:.2f}x",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    def line(row: Sequence[str]) -> str:
        cells = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in rows)


def write_json(
    args: argparse.Namespace,
    model_dir: Path,
    prompt_ids: list[int],
    reports: list[EngineReport],
    outputs: dict[str, list[int]],
    prefix: int,
) -> None:
    import transformers

    ours, hf = reports
    record = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prompt": args.prompt,
        "prompt_tokens": len(prompt_ids),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "engines": [asdict(r) for r in reports],
        "ratio_e2e": ours.e2e_tok_s / hf.e2e_tok_s,
        "ratio_decode": ours.decode_tok_s / hf.decode_tok_s,
        "token_identical": outputs[OURS] == outputs[HF],
        "common_prefix": prefix,
        "output_ids": outputs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    model_dir = resolve_model_dir(args.model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = chat_prompt_ids(tokenizer, args.prompt)
    engines = {
        OURS: load_ours(model_dir, args.dtype, prompt_ids),
        HF: load_hf(model_dir, args.dtype, prompt_ids, tokenizer.pad_token_id),
    }
    print(
        f"model {model_dir.name}, prompt {len(prompt_ids)} tokens, {args.max_new_tokens} new "
        f"tokens, dtype {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats (median), {args.warmup} warmup",
        flush=True,
    )
    e2e, ttft, outputs = measure(engines, args.max_new_tokens, args.repeats, args.warmup)
    ours, hf = (
        summarize(name, args.dtype, args.max_new_tokens, e2e[name], ttft[name]) for name in (OURS, HF)
    )
    prefix = common_prefix(outputs[OURS], outputs[HF])
    identical = outputs[OURS] == outputs[HF]
    print(format_table(ours, hf))
    print(
        f"greedy outputs token-identical: {'yes' if identical else 'no'} "
        f"(common prefix {prefix}/{args.max_new_tokens} tokens)"
    )
    if args.json is not None:
        write_json(args, model_dir, prompt_ids, [ours, hf], outputs, prefix)
        print(f"wrote {args.json}")
    if args.dtype == "float32" and not identical:
        print("error: float32 greedy outputs must be token-identical", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
