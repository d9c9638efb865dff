"""The longest context one KV budget holds, with hybrid KV on / off and fp8 KV on / off, on a tiny
random Llama 4 whose chunk is small (3 of 4 layers chunked, as in Scout and Maverick). For each
setting the pools are sized from the same byte budget (`specdec.kv_budget.plan_kv`, the rule the
engine applies to its memory budget), the engine is started with them, and one request of the
longest context they allow is run to the end to show that it fits; its greedy tokens are compared
with the single bf16 pool's on a prompt every setting holds.

    python -m specdec.bench.kv_capacity --budget-mib 4 --chunk 64 --ratio 0.05

The window pool must hold one request's window: its chunk so far plus what one forward feeds,
so the bench prefills in chunks of `--chunked-prefill-size` (256): a larger prefill chunk needs a
larger window pool (the engine raises it to one window and says so).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SETTINGS = (("one pool", True, "auto"), ("one pool + fp8", True, "fp8_e4m3"),
            ("hybrid", False, "auto"), ("hybrid + fp8", False, "fp8_e4m3"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.kv_capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="a Llama 4 checkpoint (default: a tiny random one)")
    p.add_argument("--chunk", type=int, default=64, help="attention_chunk_size of the tiny checkpoint")
    p.add_argument("--budget-mib", type=float, default=4.0, help="KV budget (target layers; no draft)")
    p.add_argument("--ratio", type=float, default=0.05, help="--swa-full-tokens-ratio of the hybrid settings")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (the KV's unless fp8)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunked-prefill-size", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the table here")
    return p.parse_args(argv)


def tiny_llama4(path: Path, chunk: int) -> Path:
    """A random Llama 4 text checkpoint: 4 layers, NoPE (full attention) on the last."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        moe_layers=[1, 3], no_rope_layers=[1, 1, 1, 0], attention_chunk_size=chunk, use_qk_norm=True,
        attn_temperature_tuning=True, max_position_embeddings=1 << 20, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False,
    )
    Llama4ForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


def run(args: argparse.Namespace, model_path: str) -> list[dict[str, Any]]:
    from specdec import Engine
    from specdec.kv_budget import plan_kv

    budget = int(args.budget_mib * 2**20)
    common = dict(model_path=model_path, dtype=args.dtype, page_size=args.page_size, skip_tokenizer_init=True,
                  log_level="warning", chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True)
    g = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    probe_prompt: list[int] | None = None
    reference: list[int] | None = None
    for name, one_pool, kv_dtype in SETTINGS:
        kw: dict[str, Any] = dict(common, disable_hybrid_swa_memory=one_pool, kv_cache_dtype=kv_dtype)
        layout = Engine(**kw, max_total_tokens=4 * args.page_size).kv_layout  # what a slot costs here
        plan = plan_kv(layout, args.ratio, budget_bytes=budget)
        ratio = min(1.0, plan.swa_tokens / plan.full_tokens + 1e-9) if plan.swa_tokens else args.ratio
        engine = Engine(**kw, max_total_tokens=plan.full_tokens, swa_full_tokens_ratio=ratio)
        pools = [engine.kv_pool] + ([engine.runner.swa_pool] if engine.runner.swa_pool is not None else [])
        nbytes = sum(t.nbytes for p in pools for t in (*p.k, *p.v))
        assert nbytes <= budget, (name, nbytes, budget)
        vocab = engine.model_config.vocab_size
        longest = engine.max_total_tokens
        prompt = torch.randint(0, vocab, (longest - args.new_tokens,), generator=g).tolist()
        t0 = time.perf_counter()
        out = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": args.new_tokens,
                                                                 "ignore_eos": True})
        seconds = time.perf_counter() - t0
        assert isinstance(out, dict) and len(out["output_ids"]) == args.new_tokens
        if probe_prompt is None:  # the first (smallest) setting's longest prompt: every setting holds it
            probe_prompt = prompt
        probe = engine.generate(input_ids=probe_prompt, sampling_params={"temperature": 0, "max_new_tokens": args.new_tokens,
                                                                         "ignore_eos": True})
        assert isinstance(probe, dict)
        if reference is None:
            reference = probe["output_ids"]
        rows.append({
            "setting": name, "kv_dtype": str(engine.kv_dtype).removeprefix("torch."),
            "full_pool_tokens": plan.full_tokens, "window_pool_tokens": plan.swa_tokens,
            "pool_bytes": nbytes, "longest_context": longest,
            "prefill_and_decode_s": round(seconds, 2),
            "tokens_equal_to_one_pool": sum(a == b for a, b in zip(probe["output_ids"], reference, strict=True)),
        })
    base = rows[0]["longest_context"]
    for r in rows:
        r["x_one_pool"] = round(r["longest_context"] / base, 2)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or str(tiny_llama4(Path(tmp) / "tiny_llama4", args.chunk))
        rows = run(args, path)
    print(f"KV budget {args.budget_mib} MiB, chunk {args.chunk}, ratio {args.ratio}, model dtype {args.dtype}, "
          f"page {args.page_size}, prefill chunks of {args.chunked_prefill_size}; {args.new_tokens} greedy tokens")
    print(f"{'setting':<16} {'KV dtype':<14} {'full pool':>9} {'window':>7} {'MiB':>6} {'context':>8} {'x':>5} "
          f"{'s':>6} {'same tokens':>11}")
    for r in rows:
        print(f"{r['setting']:<16} {r['kv_dtype']:<14} {r['full_pool_tokens']:>9} {r['window_pool_tokens']:>7} "
              f"{r['pool_bytes'] / 2**20:>6.2f} {r['longest_context']:>8} {r['x_one_pool']:>5} "
              f"{r['prefill_and_decode_s']:>6} {r['tokens_equal_to_one_pool']:>5}/{args.new_tokens}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
