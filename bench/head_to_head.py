"""Batch-1 greedy decode, head to head, in one invocation, on the same held-out chat prompts:

  (a) HF transformers `generate` in bfloat16 (the baseline of the ratios);
  (b) specdec without speculation;
  (c) specdec with EAGLE3, one entry per `--trees` setting (steps,topk,draft tokens);
  (d) llama.cpp through llama-cpp-python on the bundled GGUF file (Q4_1 or whatever the wheel
      ships), when `llama_cpp` is importable (pip install llama-cpp-python); otherwise the
      table says it was skipped and why.

Every contestant answers every prompt (chat template applied, greedy, stops at EOS or
`--max-new-tokens`); contestants alternate within each repeat so machine noise hits all of
them; tok/s = generated tokens / wall seconds, summed over prompts, median over repeats.
Speculative outputs are checked token for token against (b) (same dtype and quantisation).

    python -m specdec.bench.head_to_head --num-prompts 4 --max-new-tokens 128 \\
        --quantization w8a16 --trees 5,4,8 3,1,4 --json results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

Answer = Callable[[list[int]], tuple[list[int], float]]  # prompt ids -> (new ids, accept length)
HF_BF16 = "hf-bf16"


@dataclass
class Result:
    name: str
    tokens: list[int] = field(default_factory=list)  # per repeat: total new tokens
    seconds: list[float] = field(default_factory=list)
    accept: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # first repeat, per prompt

    @property
    def tok_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from specdec.draft.heads import shipped_head_for_embedded

    head = shipped_head_for_embedded()
    p = argparse.ArgumentParser(prog="python -m specdec.bench.head_to_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=None if head is None else head / "heldout_prompts.jsonl",
                   help="jsonl with a 'prompt' field per line (default: the shipped head's held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="specdec's dtype (default float32)")
    p.add_argument("--quantization", default="w8a16", help="specdec's --quantization; 'none' for off")
    p.add_argument("--draft-model-path", default=None if head is None else str(head))
    p.add_argument("--trees", nargs="*", default=["5,4,8", "3,1,4"],
                   help="EAGLE3 trees as steps,topk,draft_tokens (empty: no speculation)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the bundled one)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def load_prompts(path: Path, n: int, tokenizer: Any) -> list[list[int]]:
    from .bench_decode import chat_prompt_ids

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [chat_prompt_ids(tokenizer, row["prompt"]) for row in rows]


def ours(dtype: str, quantization: str | None, max_new: int, **spec: Any) -> Answer:
    from specdec import Engine

    engine = Engine(dtype=dtype, quantization=quantization, log_level="warning", **spec)

    def answer(ids: list[int]) -> tuple[list[int], float]:
        out: Any = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_new})
        return list(out["output_ids"]), float(out["meta_info"].get("spec_accept_length") or 1.0)

    return answer


def hf_bf16(model_dir: Path, eos: Sequence[int], pad: int | None, max_new: int) -> Answer:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()

    def answer(ids: list[int]) -> tuple[list[int], float]:
        x = torch.tensor([ids])
        with torch.inference_mode():  # explicit mask: SmolLM2's pad id also occurs in the prompt
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 do_sample=False, eos_token_id=list(eos), pad_token_id=pad)
        new = [int(t) for t in out[0, len(ids):]]
        return new, 1.0

    return answer


def llama_cpp(gguf: Path, eos: Sequence[int], max_new: int, threads: int) -> Answer:
    from llama_cpp import Llama  # optional: pip install llama-cpp-python

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def answer(ids: list[int]) -> tuple[list[int], float]:
        llm.reset()
        new: list[int] = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if tok in eos:
                new.append(int(tok))
                break
            new.append(int(tok))
            if len(new) >= max_new:
                break
        return new, 1.0

    return answer


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from specdec.target.embedded import embedded_gguf_path, ensure_embedded_model

    model_dir = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if args.prompts is None:
        print("error: no prompt file (pass --prompts)", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts, args.num_prompts, tok)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").exists() else {}
    eos = gen_cfg.get("eos_token_id", tok.eos_token_id)
    eos = list(eos) if isinstance(eos, list) else [eos]
    quant = None if args.quantization in ("none", "") else args.quantization
    label = f"specdec {args.dtype}{'' if quant is None else ' ' + quant}"

    contestants: dict[str, Answer] = {}
    notes: list[str] = []
    if not args.skip_hf:
        contestants[HF_BF16] = hf_bf16(model_dir, eos, tok.pad_token_id, args.max_new_tokens)
    contestants[label] = ours(args.dtype, quant, args.max_new_tokens)
    for tree in args.trees:
        steps, topk, ndt = (int(v) for v in tree.split(","))
        contestants[f"{label} + EAGLE3 ({steps},{topk},{ndt})"] = ours(
            args.dtype, quant, args.max_new_tokens, speculative_algorithm="EAGLE3",
            speculative_draft_model_path=args.draft_model_path, speculative_num_steps=steps,
            speculative_eagle_topk=topk, speculative_num_draft_tokens=ndt)
    gguf = args.gguf or embedded_gguf_path()
    if importlib.util.find_spec("llama_cpp") is None:
        notes.append("llama.cpp: skipped, llama-cpp-python is not installed (pip install llama-cpp-python)")
    else:
        contestants[f"llama.cpp ({gguf.name})"] = llama_cpp(gguf, eos, args.max_new_tokens, args.threads)

    results = {name: Result(name) for name in contestants}
    for answer in contestants.values():  # warm-up
        answer(prompts[0])
    for rep in range(args.repeats):
        for r in results.values():
            r.tokens.append(0)
            r.seconds.append(0.0)
        for ids in prompts:
            for name, answer in contestants.items():
                t0 = time.perf_counter()
                new, accept = answer(ids)
                results[name].seconds[-1] += time.perf_counter() - t0
                results[name].tokens[-1] += len(new)
                results[name].accept.append(accept)
                if rep == 0:
                    results[name].outputs.append(new)

    base = results.get(HF_BF16)
    plain = results[label]
    print(f"{len(prompts)} held-out chat prompts, <= {args.max_new_tokens} new tokens, greedy, batch 1, "
          f"{args.threads} threads, median of {args.repeats} repeats")
    print(f"{'contestant':<48} {'tokens':>7} {'tok/s':>7} {'vs HF bf16':>10} {'vs plain':>9} {'accept':>7}  lossless")
    for r in results.values():
        lossless = ""
        if r.name.startswith(label + " +"):
            lossless = "yes" if r.outputs == plain.outputs else "NO"
        print(f"{r.name:<48} {r.tokens[0]:>7} {r.tok_s:>7.1f} "
              f"{(r.tok_s / base.tok_s if base else float('nan')):>9.2f}x {r.tok_s / plain.tok_s:>8.2f}x "
              f"{statistics.mean(r.accept):>7.2f}  {lossless}")
    for note in notes:
        print(note)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": [{**asdict(r), "tok_s": r.tok_s} for r in results.values()],
            "notes": notes,
        }, indent=1) + "\n")
    bad = [r.name for r in results.values() if r.name.startswith(label + " +") and r.outputs != plain.outputs]
    if bad:
        print(f"error: speculative output differs from plain decoding: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
