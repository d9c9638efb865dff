"""Batch-1 greedy decode, head to head, in one invocation, on the same held-out chat prompts:

  (a) HF transformers `generate` in bfloat16 (the baseline of the ratios);
  (b) specdec without speculation;
  (c) specdec with EAGLE3, one entry per `--trees` setting (steps,topk,draft tokens);
  (d) llama.cpp through llama-cpp-python on the bundled GGUF file (Q4_1 or whatever the wheel
      ships), when `llama_cpp` is importable (pip install llama-cpp-python); otherwise the
      table says it was skipped and why.

Every contestant runs in its own process (bench/contestants.py: a crash, such as llama.cpp's
AMX path on some Xeons, is reported with its signal and the rest of the table is printed) and
answers every prompt (chat template applied, greedy, stops at EOS or `--max-new-tokens`);
contestants alternate within each repeat so machine noise hits all of them; tok/s = generated
tokens / wall seconds (timed inside the contestant), summed over prompts, median over repeats.
Speculative outputs are checked token for token against (b) (same dtype and quantisation).
The default prompts are the held-out chat prompts of every category shipped in
specdec.bench.data (chat_heldout.jsonl, categories in turn).

    python -m specdec.bench.head_to_head --num-prompts 8 --max-new-tokens 128 \\
        --quantization w8a16 --trees 5,4,8 3,1,4 --json results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench_serving import DEFAULT_DATA
from .contestants import Answer, Contestant, ContestantFailed, serve_answers

HF_BF16 = "hf-bf16"


@dataclass
class Result:
    name: str
    tokens: list[int] = field(default_factory=list)  # per repeat: total new tokens
    seconds: list[float] = field(default_factory=list)
    accept: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # first repeat, per prompt
    failure: str | None = None  # why the contestant's process stopped (its signal), if it did

    @property
    def tok_s(self) -> float:
        done = [t / s for t, s in zip(self.tokens, self.seconds) if s > 0]
        return statistics.median(done) if done and self.failure is None else float("nan")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from specdec.draft.heads import shipped_head_for_embedded

    head = shipped_head_for_embedded()
    p = argparse.ArgumentParser(prog="python -m specdec.bench.head_to_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=DEFAULT_DATA["chat"],
                   help="jsonl with a 'prompt' field per line (default: held-out chat prompts of every category)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="specdec's dtype (default float32)")
    p.add_argument("--quantization", default="w8a16", help="specdec's --quantization; 'none' for off")
    p.add_argument("--draft-model-path", default=None if head is None else str(head))
    p.add_argument("--trees", nargs="*", default=["adaptive", "2,1,3", "5,4,8"],
                   help="EAGLE3 trees as steps,topk,draft_tokens, or adaptive (make run's default: "
                   "shapes chosen per step); empty: no speculation")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    p.add_argument("--device", default="auto", help="specdec's and transformers' device: auto (cuda when "
                   "visible), cpu, cuda, cuda:N")
    p.add_argument("--attention-backend", default="auto", help="specdec's --attention-backend")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the bundled one)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--contestant", default=None, help=argparse.SUPPRESS)  # internal: run one contestant
    return p.parse_args(argv)


def load_prompts(path: Path, n: int, tokenizer: Any) -> list[list[int]]:
    from .bench_decode import chat_prompt_ids

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [chat_prompt_ids(tokenizer, row["prompt"]) for row in rows]


def ours(dtype: str, quantization: str | None, max_new: int, device: str = "auto", attention_backend: str = "auto",
         **spec: Any) -> Answer:
    from specdec import Engine

    engine = Engine(dtype=dtype, quantization=quantization, log_level="warning", device=device,
                    attention_backend=attention_backend, **spec)

    def answer(ids: list[int]) -> tuple[list[int], float]:
        out: Any = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_new})
        return list(out["output_ids"]), float(out["meta_info"].get("spec_accept_length") or 1.0)

    return answer


def hf_bf16(model_dir: Path, eos: Sequence[int], pad: int | None, max_new: int, device: str = "auto") -> Answer:
    from transformers import AutoModelForCausalLM

    from specdec.engine import resolve_device

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval().to(dev)

    def answer(ids: list[int]) -> tuple[list[int], float]:
        x = torch.tensor([ids], device=dev)
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


def make_answer(spec: dict[str, Any]) -> Answer:
    """Build one contestant inside its own process from its JSON spec."""
    torch.set_num_threads(int(spec["threads"]))
    kind, max_new = spec["kind"], int(spec["max_new_tokens"])
    if kind == "hf":
        return hf_bf16(Path(spec["model_dir"]), spec["eos"], spec["pad"], max_new, spec.get("device", "auto"))
    if kind == "ours":
        return ours(spec["dtype"], spec["quantization"], max_new, spec.get("device", "auto"),
                    spec.get("attention_backend", "auto"), **spec["spec"])
    if kind == "llama.cpp":
        return llama_cpp(Path(spec["gguf"]), spec["eos"], max_new, int(spec["threads"]))
    raise ValueError(f"unknown contestant kind {kind!r}")


def run(contestants: dict[str, Contestant], prompts: list[list[int]], repeats: int) -> dict[str, Result]:
    """Alternate the contestants over the prompts, `repeats` times (after one warm-up prompt each);
    a contestant whose process dies keeps its failure and drops out."""
    results = {name: Result(name) for name in contestants}

    def ask(name: str, ids: list[int]) -> Any:
        result = results[name]
        if result.failure is not None:
            return None
        try:
            return contestants[name].ask(ids)
        except ContestantFailed as e:
            result.failure = str(e)
            print(f"[head_to_head] {name}: {e}", file=sys.stderr, flush=True)
            return None

    for name in contestants:  # warm-up
        ask(name, prompts[0])
    for rep in range(repeats):
        for r in results.values():
            r.tokens.append(0)
            r.seconds.append(0.0)
        for ids in prompts:
            for name in contestants:
                reply = ask(name, ids)
                if reply is None:
                    continue
                results[name].seconds[-1] += reply.seconds
                results[name].tokens[-1] += len(reply.new)
                results[name].accept.append(reply.accept)
                if rep == 0:
                    results[name].outputs.append(reply.new)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.contestant is not None:
        return serve_answers(lambda: make_answer(json.loads(args.contestant)))
    from transformers import AutoTokenizer

    from specdec.target.embedded import embedded_gguf_path, ensure_embedded_model

    model_dir = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = load_prompts(args.prompts, args.num_prompts, tok)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").exists() else {}
    eos = gen_cfg.get("eos_token_id", tok.eos_token_id)
    eos = list(eos) if isinstance(eos, list) else [eos]
    quant = None if args.quantization in ("none", "") else args.quantization
    label = f"specdec {args.dtype}{'' if quant is None else ' ' + quant}"

    common = {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "device": args.device}
    specs: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    if not args.skip_hf:
        specs[HF_BF16] = {**common, "kind": "hf", "model_dir": str(model_dir), "eos": eos, "pad": tok.pad_token_id}
    ours_spec = {**common, "kind": "ours", "dtype": args.dtype, "quantization": quant,
                 "attention_backend": args.attention_backend}
    specs[label] = {**ours_spec, "spec": {}}
    for tree in args.trees:
        eagle = {"speculative_algorithm": "EAGLE3", "speculative_draft_model_path": args.draft_model_path}
        if tree == "adaptive":
            specs[f"{label} + EAGLE3 adaptive"] = {**ours_spec, "spec": {**eagle, "speculative_adaptive": "on"}}
            continue
        steps, topk, ndt = (int(v) for v in tree.split(","))
        specs[f"{label} + EAGLE3 ({steps},{topk},{ndt})"] = {**ours_spec, "spec": {
            **eagle, "speculative_num_steps": steps, "speculative_eagle_topk": topk,
            "speculative_num_draft_tokens": ndt}}
    gguf = args.gguf or embedded_gguf_path()
    if importlib.util.find_spec("llama_cpp") is None:
        notes.append("llama.cpp: skipped, llama-cpp-python is not installed (pip install llama-cpp-python)")
    else:
        specs[f"llama.cpp ({gguf.name})"] = {**common, "kind": "llama.cpp", "gguf": str(gguf), "eos": eos}

    contestants: dict[str, Contestant] = {}
    failed_to_start: dict[str, str] = {}
    for name, spec in specs.items():
        print(f"[head_to_head] starting {name} ...", file=sys.stderr, flush=True)
        argv_c = [sys.executable, "-m", "specdec.bench.head_to_head", "--contestant", json.dumps(spec)]
        try:
            contestants[name] = Contestant(name, argv_c)
        except ContestantFailed as e:
            failed_to_start[name] = str(e)
            print(f"[head_to_head] {name}: {e}", file=sys.stderr, flush=True)
    try:
        results = run(contestants, prompts, args.repeats) if contestants else {}
    finally:
        for c in contestants.values():
            c.close()
    for name, why in failed_to_start.items():
        results[name] = Result(name, failure=why)
    results = {name: results[name] for name in specs}  # table order

    base = results.get(HF_BF16)
    plain = results[label]
    print(f"{len(prompts)} held-out chat prompts, <= {args.max_new_tokens} new tokens, greedy, batch 1, "
          f"{args.threads} threads, median of {args.repeats} repeats")
    print(f"{'contestant':<48} {'tokens':>7} {'tok/s':>7} {'vs HF bf16':>10} {'vs plain':>9} {'accept':>7}  lossless")
    for r in results.values():
        if r.failure is not None:
            print(f"{r.name:<48} failed: {r.failure}")
            continue
        lossless = ""
        if r.name.startswith(label + " +"):
            lossless = "yes" if r.outputs == plain.outputs else "NO"
        vs_hf = f"{r.tok_s / base.tok_s:>9.2f}x" if base else f"{'-':>10}"  # (--skip-hf)
        print(f"{r.name:<48} {r.tokens[0]:>7} {r.tok_s:>7.1f} "
              f"{vs_hf} {r.tok_s / plain.tok_s:>8.2f}x "
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
    ours_failed = [r.name for r in results.values() if r.name.startswith(label) and r.failure is not None]
    bad = [r.name for r in results.values()
           if r.name.startswith(label + " +") and r.failure is None and r.outputs != plain.outputs]
    if bad:
        print(f"error: speculative output differs from plain decoding: {bad}", file=sys.stderr)
    if ours_failed:
        print(f"error: specdec contestants failed: {ours_failed}", file=sys.stderr)
    return 1 if bad or ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
