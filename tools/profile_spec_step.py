"""Where a decode step's time goes: plain decoding and EAGLE3 trees, phase by phase.

    python tools/profile_spec_step.py --trees none 3,1,4 5,4,8 --num-prompts 4 --max-new-tokens 128

Runs the offline engine (main thread, greedy, held-out chat prompts) and wraps the engine's
phase functions with wall-clock timers (about a microsecond each; the product code is not
changed): the target forward, the lm_head, verification, the K/V commit, the feature gather,
the draft's extend and propose (its forwards, its logits, the batched top-k of children and
the batching of a step's inputs, masks and slots are phases of their own, so "draft propose"
is the tree bookkeeping around them; the one-call C++ layer kernels are timed apart from the
Python around them, "target forward" and "draft forward"), and the chooser. Each phase's time is
exclusive of the phases timed inside it; "host rest" is the scheduler step minus every timed
phase: Python glue, request bookkeeping, emitting tokens. Figures are ms per decode step and per emitted token,
one request at a time (batch 1); prefill steps are run untimed.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "data" / "chat_heldout.jsonl"


class Timers:
    """Exclusive wall time per phase: a phase's time excludes the timed phases inside it."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [name, time spent in timed callees]
        self.active = True  # off: calls run untimed (prefill steps)

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        if not hasattr(obj, attr):  # a phase another version of the engine does not have
            return
        fn: Callable[..., Any] = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            outer = any(frame[0] == name for frame in self._stack)
            self._stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, inner = self._stack.pop()
                self.own[name] += elapsed - inner
                if not outer:
                    self.calls[name] += 1
                if self._stack:
                    self._stack[-1][1] += elapsed

        setattr(obj, attr, timed)


def instrument(engine: Any, timers: Timers) -> None:
    timers.wrap(engine.scheduler, "step", "step")
    timers.wrap(engine.runner, "extend", "target forward")
    timers.wrap(engine.runner, "verify_trees", "target forward")
    timers.wrap(engine.runner, "logits", "lm_head")
    from specdec import model_worker

    timers.wrap(model_worker, "sample_next", "sample")
    from specdec.kernels import cpu_kernels

    ext = cpu_kernels.extension()
    if ext is not None:  # the one-call kernels, so that a forward's Python glue shows apart
        timers.wrap(ext, "decoder_stack_seqs", "target kernel")
        timers.wrap(ext, "eagle3_layer_seqs", "draft kernel")
    spec = engine.spec
    if spec is None:
        return
    from specdec import spec_worker

    timers.wrap(spec_worker, "verify_others", "verify")  # sampled, penalised or constrained requests
    timers.wrap(spec, "_commit_kv", "kv commit")
    timers.wrap(spec, "choose", "choose")
    prop = spec.proposer
    timers.wrap(prop, "extend", "draft extend")
    timers.wrap(prop, "propose", "draft propose")
    if hasattr(prop, "draft"):
        from specdec.draft import eagle3_proposer

        timers.wrap(prop.draft, "forward", "draft forward")
        timers.wrap(prop.draft, "draft_logits", "draft logits")
        timers.wrap(prop, "_forward_nodes", "draft batching")  # the step's inputs, masks and slots
        timers.wrap(eagle3_proposer, "top_children", "draft top-k")  # (before: inside "draft propose")


def profile(tree: str, prompts: list[list[int]], max_new: int, quantization: str | None) -> dict[str, Any]:
    from specdec import Engine
    from specdec.draft.heads import EMBEDDED_HEAD
    from specdec.sampling_params import SamplingParams

    kwargs: dict[str, Any] = {"dtype": "float32", "quantization": quantization, "log_level": "warning"}
    if tree != "none":
        kwargs.update(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(EMBEDDED_HEAD))
        if tree.split("+")[0] == "adaptive":
            kwargs["speculative_adaptive"] = "on"
        else:
            steps, topk, n = (int(v) for v in tree.split("+")[0].split(","))
            kwargs.update(speculative_num_steps=steps, speculative_eagle_topk=topk,
                          speculative_num_draft_tokens=n, speculative_adaptive="off")
        kwargs["speculative_ngram_merge"] = tree.endswith("+copy")
    engine = Engine(**kwargs)
    params = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    engine.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 8})  # warm-up
    timers = Timers()
    instrument(engine, timers)
    tokens = 0
    accept: list[float] = []
    wall = 0.0
    sp = SamplingParams.from_dict(params)
    for ids in prompts:  # one request at a time; its prefill step is left out of every figure
        req = engine.make_request(ids, sp)
        engine.scheduler.add(req)
        timers.active = False
        engine.scheduler.step()
        timers.active = True
        first = req.output_len
        t0 = time.perf_counter()
        while not req.finished:
            engine.scheduler.step()
        wall += time.perf_counter() - t0
        tokens += req.output_len - first
        out = engine.result(req)
        accept.append(float(out["meta_info"].get("spec_accept_length") or 1.0))
    steps = timers.calls["step"]
    own = dict(timers.own)
    own["host rest"] = own.pop("step")
    return {
        "tree": tree, "tokens": tokens, "steps": steps, "wall_s": wall, "tok_s": tokens / wall,
        "accept_length": sum(accept) / len(accept),
        "ms_per_step": {k: 1000 * v / steps for k, v in sorted(own.items(), key=lambda kv: -kv[1])},
        "calls_per_step": {k: v / steps for k, v in timers.calls.items() if k != "step"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", default=["none", "3,1,4", "5,4,8"],
                   help="none, adaptive, or steps,topk,draft_tokens (append +copy for n-gram merging)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--quantization", default="w8a16", help="'none' for float32 weights")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from specdec.bench.bench_decode import chat_prompt_ids
    from specdec.target.embedded import resolve_model_path

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = [chat_prompt_ids(tok, r["prompt"]) for r in rows[: args.num_prompts]]
    quant = None if args.quantization == "none" else args.quantization
    results = []
    for tree in args.trees:
        r = profile(tree, prompts, args.max_new_tokens, quant)
        results.append(r)
        print(f"\n== {tree}: {r['tok_s']:.1f} tok/s, accept {r['accept_length']:.2f}, "
              f"{r['steps']} steps, {1000 * r['wall_s'] / r['steps']:.2f} ms/step, "
              f"{1000 * r['wall_s'] / r['tokens']:.2f} ms/token")
        for name, ms in r["ms_per_step"].items():
            calls = r["calls_per_step"].get(name)
            print(f"  {name:<15} {ms:7.3f} ms/step" + (f"  ({calls:.2f} calls)" if calls else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
