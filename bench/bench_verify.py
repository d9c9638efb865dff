"""Cost of one target forward over N query tokens (a verify step over an N-node draft) relative
to a one-token decode step, at batch 1, on the same cached prefix; logits included (verification
needs all N rows, decoding one).

    python -m specdec.bench.bench_verify --quantization w8a16 --tokens 1 2 4 8 16 32

The tree is a chain (each node sees the prefix and its ancestors); for the target's forward the
shape of the tree does not change the cost, only N does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.bench_verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default="w8a16", help="'none' for unquantised weights")
    p.add_argument("--context", type=int, default=256, help="cached prefix length")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from specdec import Engine
    from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta

    quant = None if args.quantization in ("none", "") else args.quantization
    engine = Engine(model_path=args.model_path, dtype=args.dtype, quantization=quant, log_level="warning",
                    max_total_tokens=4096, disable_hybrid_swa_memory=True)  # one pool: every layer, these slots
    model, pool, backend = engine.model, engine.kv_pool, engine.runner.backend
    vocab = engine.model_config.vocab_size
    ctx, longest = args.context, max(args.tokens)
    slots = torch.arange(ctx + longest)  # the engine is idle: these pool slots are free
    g = torch.Generator().manual_seed(0)

    def forward(start: int, n: int, mask: torch.Tensor | None) -> None:
        ids = torch.randint(0, vocab, (n,), generator=g)
        kv = slots[: start + n]
        pos = torch.arange(start, start + n)
        seq = SeqAttnMeta(0, n, kv, pos, torch.arange(start + n), mask)
        batch = ForwardBatch(AttentionMeta(slots[start : start + n], (seq,)), pool.k, pool.v, backend)
        with torch.inference_mode():
            out = model(ids, pos, batch)
            model.compute_logits(out.hidden)

    forward(0, ctx, None)  # the cached prefix
    results: dict[int, float] = {}
    for n in args.tokens:
        mask = None
        if n > 1:  # a chain: prefix + ancestors
            mask = torch.ones(n, ctx + n, dtype=torch.bool)
            mask[:, ctx:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        for _ in range(3):
            forward(ctx, n, mask)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            forward(ctx, n, mask)
            times.append(time.perf_counter() - t0)
        results[n] = statistics.median(times)
    base = results[min(results)]
    print(f"{engine.model_path.name}, {args.dtype}, quantization {quant}, prefix {ctx} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'tokens':>6} {'ms':>8} {'vs 1 token':>10} {'ms/token':>9}")
    for n, sec in results.items():
        print(f"{n:>6} {sec * 1e3:>8.2f} {sec / base:>9.2f}x {sec * 1e3 / n:>9.2f}")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
