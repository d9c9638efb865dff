"""Train an EAGLE3 draft head for a target model by self-distillation.

    python -m specdec.draft.train_eagle3 --recipe smollm2 --out draft/heads/smollm2-135m-instruct-eagle3

Stages (`--stages`, default all; every stage resumes from what is on disk in `--work-dir`):
  prompts    held-out + training prompts: the diverse chat prompts of ../shared/data (every
             source and category, balanced, held-out split removed), GSM8K train, Alpaca seed
             tasks, prompts the target writes itself
  responses  the target answers them (`specdec.Engine`, continuous batching, chat template,
             greedy and sampled); a share become two-turn conversations (the target writes a
             follow-up user turn to its own answer, then answers it)
  features   teacher-forced target pass: aux hidden states + final hidden per token
  train      EAGLE3 training-time test (draft/ttt.py); checkpoints, logs, and the head in `--out`;
             `--train-dtype bfloat16` runs its matmuls under autocast (float32 weights and labels)
  eval       accept length on the held-out prompts (legacy GSM8K/Alpaca split, and with --n-chat the
             shipped held-out chat prompts per category, greedy and at temperature 0.7) -> eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .chat_data import balanced_order, chat_pool
from .chat_generate import GenStats, generate_conversations
from .data_split import prompt_key
from .train_data import (
    DEFAULT_DATA_DIR,
    build_feature_shards,
    choose_draft_vocab,
    read_jsonl,
    response_tokens,
    self_written_prompts,
    split_prompts,
    vocab_coverage,
    write_jsonl,
)

log = logging.getLogger("specdec.train")

SHARD_SIZE = 64  # sequences per feature shard
STAGES = ("prompts", "responses", "features", "train", "eval")


@dataclass
class TrainArgs:
    # data
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    data_dir: str = str(DEFAULT_DATA_DIR)
    seed: int = 0
    n_gsm8k: int = 64
    n_alpaca: int = 16
    n_self: int = 0
    n_chat: int = 0  # diverse chat prompts (balanced over categories); 0: the legacy GSM8K/Alpaca mix
    heldout_gsm8k: int = 48
    heldout_alpaca: int = 16
    max_prompts: int | None = None  # answer only the first N training prompts (None: all)
    max_new_tokens: int = 192
    sample_frac: float = 0.2  # share of conversations sampled (rest greedy)
    sample_temp_min: float = 0.7  # sampled ones draw a temperature from [min, max]
    sample_temp_max: float = 0.7
    multi_turn_frac: float = 0.0  # share of conversations given a second (follow-up) turn
    gen_quantization: str | None = None  # the generation engine's weights (w8a16: the served target)
    gen_batch: int = 32  # concurrent requests during generation
    gen_dtype: str = "float32"
    # the features pass's target weights (None: float32); w8a16: the aux states and labels the
    # served target (`make run`) gives the head, and a faster pass (int8 kernels)
    features_quantization: str | None = None
    max_len: int = 1024  # tokens per training sequence (prompt + response), longer ones cut
    # draft
    draft_vocab_size: int = 8192
    draft_intermediate_size: int | None = None  # None: the target's
    init_from_target: bool = True  # lm_head rows / final norm from the target
    init_head: str | None = None  # warm start from a trained head (a previous piece)
    # with init_head: train on its draft vocabulary (every lm_head row carried over) instead of
    # choosing one from this run's responses (a piece's few new conversations see less of the
    # language than the pieces before it did)
    keep_init_vocab: bool = False
    # optimisation
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    epochs: float = 2.0
    max_steps: int | None = None
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear
    weight_decay: float = 0.0
    val_frac: float = 0.0  # share of sequences held back for validation (by a hash of the prompt)
    max_grad_norm: float = 0.5
    batch_tokens: int = 2048  # padded tokens per optimiser step
    batch_seqs: int = 8
    # float32 | bfloat16: the head's matmuls under autocast (weights, optimiser state, labels and
    # validation stay float32); bfloat16 wants a CPU with avx512_bf16 / amx_bf16 (or a GPU)
    train_dtype: str = "float32"
    device: str = "auto"
    threads: int = 2
    # bookkeeping
    log_every: int = 10
    save_every: int = 100  # optimiser steps between checkpoints (the head is exported too)
    keep_heads: bool = False  # also export every checkpoint's head to <work>/heads/step_N (learning curve)
    save_dtype: str = "bfloat16"
    eval_prompts: int = 64
    eval_max_new_tokens: int = 128
    eval_chat_per_category: int = 4
    # trees measured by the eval stage ("steps,topk,tokens", "+copy" = --speculative-ngram-merge)
    eval_legacy_configs: str = "5,4,8;3,1,4"
    eval_chat_configs: str = "5,4,8;3,1,4;2,1,3;5,4,8+copy;3,1,4+copy"  # greedy
    eval_sampled_configs: str = "5,4,8;5,4,8+copy"  # temperature 0.7


RECIPES: dict[str, dict[str, Any]] = {
    # the shipped head: all 1123 training prompts answered (~153k response tokens), TTT 5,
    # 8 epochs. ~2 h on 2 idle CPU cores (responses ~30-40 min, features ~10 min, training
    # ~62 min at ~1.5 s/step, eval ~5 min); every stage resumes from disk
    "smollm2": {
        "n_gsm8k": 900, "n_alpaca": 159, "n_self": 64, "heldout_gsm8k": 48, "heldout_alpaca": 16,
        "max_new_tokens": 160, "sample_frac": 0.2, "draft_vocab_size": 8192,
        "ttt_steps": 5, "epochs": 8.0, "lr": 2e-3, "warmup_steps": 10, "batch_tokens": 1024,
        "batch_seqs": 4, "save_every": 48, "log_every": 4,
    },
    # diverse chat data (every source and category of ../shared/data, balanced; half of them given a second turn;
    # 30 % sampled at t in [0.7, 1.0]), warm-started from the shipped head. The recipe's prompt
    # list holds enough for ~2M response tokens; a run answers `--max-prompts` of them (the list
    # is balanced in every prefix) and later runs resume the responses where the last stopped.
    "chat": {
        "n_chat": 12000, "n_gsm8k": 600, "n_alpaca": 159, "n_self": 300, "heldout_gsm8k": 48,
        "heldout_alpaca": 16, "max_new_tokens": 192, "sample_frac": 0.3, "sample_temp_min": 0.7,
        "sample_temp_max": 1.0, "multi_turn_frac": 0.5, "gen_quantization": "w8a16", "gen_batch": 48,
        "features_quantization": "w8a16",
        "draft_vocab_size": 8192, "ttt_steps": 6, "epochs": 2.0, "lr": 1e-3, "warmup_steps": 20,
        "batch_tokens": 2048, "batch_seqs": 8, "save_every": 100, "log_every": 10, "val_frac": 0.02,
        "init_head": str(Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-eagle3"),
    },
    # seconds: for tests and smoke runs
    "tiny": {
        "n_gsm8k": 24, "n_alpaca": 8, "n_self": 4, "heldout_gsm8k": 4, "heldout_alpaca": 2,
        "max_new_tokens": 16, "draft_vocab_size": 64, "ttt_steps": 3, "epochs": 4.0,
        "warmup_steps": 2, "batch_tokens": 512, "batch_seqs": 8, "log_every": 1, "save_every": 8,
        "lr": 3e-3,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdec train-eagle3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="preset; explicit flags override it")
    p.add_argument("--out", required=True, help="folder for the head (config.json, model.safetensors)")
    p.add_argument("--work-dir", help="data, features and checkpoints (default: <cache>/train/<out name>)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    for f in fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                           metavar="BOOL")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, type=typ, default=None)
    return p


def resolve_args(ns: argparse.Namespace) -> TrainArgs:
    values: dict[str, Any] = dict(RECIPES[ns.recipe]) if ns.recipe else {}
    for f in fields(TrainArgs):
        v = getattr(ns, f.name)
        if v is not None:
            values[f.name] = v
    if values.get("train_dtype", "float32") not in ("float32", "bfloat16"):
        raise SystemExit(f"--train-dtype {values['train_dtype']!r}: expected float32 or bfloat16")
    args = TrainArgs(**values)
    if args.keep_init_vocab:
        _check_init_vocab(args)
    return args


def _check_init_vocab(args: TrainArgs) -> None:
    """--keep-init-vocab is refused before any stage runs when it cannot be honoured."""
    from .eagle3_config import Eagle3Config

    if not args.init_head:
        raise SystemExit("--keep-init-vocab needs --init-head (the head whose vocabulary to keep)")
    size = Eagle3Config.from_path(Path(args.init_head)).draft_vocab_size
    if size != args.draft_vocab_size:
        raise SystemExit(f"--keep-init-vocab: {args.init_head} has a draft vocabulary of {size}, "
                         f"--draft-vocab-size asks for {args.draft_vocab_size}")


def default_work_dir(out: Path) -> Path:
    from specdec.target.embedded import default_cache_dir

    return default_cache_dir() / "train" / out.resolve().name


class _Progress:
    """tqdm when available and wanted, else a no-op with the same calls."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True,
                             mininterval=2.0 if sys.stderr.isatty() else 30.0)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _engine(args: TrainArgs) -> Any:
    import specdec

    max_total = args.gen_batch * (args.max_len + args.max_new_tokens + 64)
    return specdec.Engine(model_path=args.model_path, dtype=args.gen_dtype, log_level="warning",
                          quantization=args.gen_quantization,
                          max_running_requests=args.gen_batch, max_total_tokens=max_total,
                          random_seed=args.seed)


def _template(engine: Any) -> Any:
    from specdec.server.chat_template import load_chat_template

    return load_chat_template(None, engine.model_path)


def stage_prompts(args: TrainArgs, work: Path, out: Path, engine_fn: Any, progress: bool) -> None:
    prompts_path = work / "prompts.jsonl"
    heldout_path = out / "heldout_prompts.jsonl"
    if prompts_path.exists() and heldout_path.exists():
        return
    split = split_prompts(Path(args.data_dir), args.seed, args.n_gsm8k, args.n_alpaca,
                          args.heldout_gsm8k, args.heldout_alpaca)
    heldout_set = {p["prompt"] for p in split.heldout}
    engine = engine_fn()
    t0 = time.perf_counter()
    own = self_written_prompts(engine, _template(engine), args.n_self, args.seed)
    own = [p for p in own if p["prompt"] not in heldout_set]
    log.info("%d self-written prompts in %.0fs", len(own), time.perf_counter() - t0)
    if args.n_chat > 0:
        # every source and category, balanced in every prefix: GSM8K is one more math source,
        # the Alpaca seeds one more chat source, the self-written prompts their own category
        pool = chat_pool(Path(args.data_dir), exclude=heldout_set)
        pool += [{**p, "category": "math"} for p in split.train if p["source"].startswith("gsm8k")]
        pool += [{**p, "category": "chat"} for p in split.train if p["source"].startswith("alpaca")]
        pool += [{**p, "category": "self"} for p in own]
        train = balanced_order(pool, args.seed)[: args.n_chat + len(split.train) + len(own)]
    else:
        train = split.train + own
        # interleave the self-written ones so any prefix of the file is a fair sample
        random.Random(args.seed + 1).shuffle(train)
    write_jsonl(prompts_path, train)
    write_jsonl(heldout_path, split.heldout)


def stage_responses(args: TrainArgs, work: Path, engine_fn: Any, progress: bool) -> None:
    prompts = read_jsonl(work / "prompts.jsonl")[: args.max_prompts]
    out_path = work / "responses.jsonl"
    if out_path.exists() and len(read_jsonl(out_path)) >= len(prompts):
        return
    engine = engine_fn()
    bar = _Progress(len(prompts), "responses", progress)
    stats_path = work / "gen_stats.json"
    prev = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats = GenStats(prev.get("response_tokens", 0), prev.get("user_tokens", 0), prev.get("seconds", 0.0))
    rows = generate_conversations(engine, _template(engine), prompts, out_path, args.max_new_tokens,
                                  args.sample_frac, args.multi_turn_frac, args.seed,
                                  (args.sample_temp_min, args.sample_temp_max), chunk=3 * args.gen_batch,
                                  progress=bar, stats=stats, stats_path=stats_path)
    bar.close()
    n_tok = sum(len(response_tokens(r)) for r in rows)
    log.info("%d conversations, %d response tokens; generation %.0f tok/s (%d response + %d user tokens "
             "in %.0fs over all runs)", len(rows), n_tok, stats.tokens_per_s, stats.response_tokens,
             stats.user_tokens, stats.seconds)


def load_target(args: TrainArgs) -> Any:
    """The target model alone (fp32, no KV cache), for the features and train stages."""
    from specdec.target.embedded import resolve_model_path
    from specdec.target.loader import load_model

    model, _ = load_model(resolve_model_path(args.model_path), "float32")
    return model


def stage_features(args: TrainArgs, work: Path, target: Any | None, progress: bool) -> list[Path]:
    """Feature shards of every response, from `target` (float32) or, with
    `features_quantization`, from a quantised target loaded here. Writes features_stats.json
    (tokens and seconds of the shards computed, accumulated over runs)."""
    from specdec.target.quant import quantize_model

    records = read_jsonl(work / "responses.jsonl")[: args.max_prompts]
    model = target
    if model is None or args.features_quantization is not None:
        model = load_target(args)
        quantize_model(model, args.features_quantization)
    capture = default_capture_layers(model.cfg.num_layers)
    bar = _Progress(len(records), "features", progress)
    stats_path = work / "features_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"tokens": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    paths, n_tok = build_feature_shards(model, records, capture, work / "features", shard_size=SHARD_SIZE,
                                        max_len=args.max_len, progress=bar)
    dt = time.perf_counter() - t0
    bar.close()
    if n_tok:
        stats = {"tokens": stats["tokens"] + n_tok, "seconds": stats["seconds"] + dt,
                 "quantization": args.features_quantization}
        stats["tokens_per_s"] = stats["tokens"] / max(1e-9, stats["seconds"])
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    log.info("features of %d sequences in %d shards (%.0fs; %d tokens computed, %.0f tok/s)", len(records),
             len(paths), dt, n_tok, n_tok / max(1e-9, dt))
    return paths


EVAL_CONFIGS = ((5, 4, 8), (3, 1, 4))


def _accept(outs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ct = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    emitted = sum(o["meta_info"]["spec_accept_length"] * o["meta_info"]["spec_verify_ct"] for o in outs)
    return {"accept_length": emitted / max(1, ct), "verify_steps": ct, "prompts": len(outs)}


def evaluate_head(
    head: Path, prompts: Sequence[dict[str, Any]], model_path: str | None, max_new_tokens: int,
    configs: Sequence[tuple[int, int, int]] = EVAL_CONFIGS, batch: int = 16, temperature: float = 0.0,
    quantization: str | None = None, ngram_merge: bool = False,
) -> dict[str, Any]:
    """Accept length of `head` on chat prompts at each (steps, topk, draft tokens): emitted
    tokens / verify steps summed over all prompts (SGLang's spec_accept_length), overall and by
    category (or source); sampled with a fixed seed per prompt when `temperature` > 0."""
    import specdec

    results: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                               "temperature": temperature, "quantization": quantization}
    for steps, topk, ndraft in configs:
        engine = specdec.Engine(model_path=model_path, dtype="float32", log_level="warning", quantization=quantization,
                                speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                                speculative_num_steps=steps, speculative_eagle_topk=topk,
                                speculative_num_draft_tokens=ndraft, max_running_requests=batch,
                                speculative_ngram_merge=ngram_merge,
                                max_total_tokens=batch * 1024)
        template = _template(engine)
        ids = [engine.encode(template.render([{"role": "user", "content": p["prompt"]}])) for p in prompts]
        t0 = time.perf_counter()
        params = [{"temperature": temperature, "max_new_tokens": max_new_tokens,
                   **({"seed": 1000 + i} if temperature > 0 else {})} for i in range(len(ids))]
        outs: Any = engine.generate(input_ids=ids, sampling_params=params)
        dt = time.perf_counter() - t0
        key = f"{steps},{topk},{ndraft}" + ("+copy" if ngram_merge else "")
        results[key] = {
            **_accept(outs),
            "mean_request_accept_length": sum(o["meta_info"]["spec_accept_length"] for o in outs) / len(outs),
            "completion_tokens": sum(o["meta_info"]["completion_tokens"] for o in outs),
            "seconds": round(dt, 1),
            "by_group": {
                g: _accept([o for o, p in zip(outs, prompts, strict=True) if _group(p) == g])
                for g in sorted({_group(p) for p in prompts})
            },
        }
        log.info("eval (%s): accept length %.3f over %d prompts (%.0fs)", key,
                 results[key]["accept_length"], len(prompts), dt)
    return results


def parse_eval_configs(text: str) -> list[tuple[tuple[int, int, int], bool]]:
    """"5,4,8;2,1,3+copy" -> [((5, 4, 8), False), ((2, 1, 3), True)]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        copy = item.endswith("+copy")
        steps, topk, ndt = (int(v) for v in item.removesuffix("+copy").split(","))
        out.append(((steps, topk, ndt), copy))
    return out


def run_eval(args: TrainArgs, out: Path) -> dict[str, Any]:
    """The eval stage: each suite's trees one at a time, eval.json rewritten after each (a long
    eval keeps what it measured)."""
    path = out / "eval.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    suites: list[tuple[str, list[dict[str, Any]], float, str]] = [
        ("legacy_heldout", read_jsonl(out / "heldout_prompts.jsonl")[: args.eval_prompts], 0.0,
         args.eval_legacy_configs)]
    if args.n_chat > 0:
        chat = chat_eval_prompts(args.eval_chat_per_category)
        suites += [("chat_t0.0", chat, 0.0, args.eval_chat_configs),
                   ("chat_t0.7", chat, 0.7, args.eval_sampled_configs)]
    for name, prompts, temp, configs in suites:
        for tree, copy in parse_eval_configs(configs):
            r = evaluate_head(out, prompts, args.model_path, args.eval_max_new_tokens, [tree], temperature=temp,
                              quantization=args.gen_quantization, ngram_merge=copy)
            suite = res.setdefault(name, {})
            suite.update(r)
            path.write_text(json.dumps(res, indent=2) + "\n")
    return res


def _group(p: dict[str, Any]) -> str:
    return str(p.get("category") or p["source"].split(":")[0])


def chat_eval_prompts(per_category: int) -> list[dict[str, Any]]:
    """The first `per_category` prompts of every category of the shipped held-out chat set
    (bench/data/chat_heldout.jsonl: drawn from the hash held-out split, never trained on)."""
    from specdec.bench.bench_serving import BENCH_DATA

    rows = read_jsonl(BENCH_DATA / "chat_heldout.jsonl")
    out: list[dict[str, Any]] = []
    for cat in sorted({r["category"] for r in rows}):
        out += [r for r in rows if r["category"] == cat][:per_category]
    return out


def default_capture_layers(num_layers: int) -> tuple[int, int, int]:
    """SGLang's default aux layers (no `eagle_aux_hidden_state_layer_ids` in the head's config):
    the *inputs* of layers 2, L // 2 and L - 3, as `Eagle3Config.capture_layers` returns."""
    return (2, num_layers // 2, num_layers - 3)


def write_provenance(
    args: TrainArgs, work: Path, out: Path, records: Sequence[dict[str, Any]], hot: torch.Tensor
) -> None:
    """out/training_data.json: where every training sequence came from, and the recipe."""
    sources: dict[str, int] = {}
    categories: dict[str, int] = {}
    for r in records:
        kind = r["source"].split(":")[0] if not r["source"].startswith("chat:") else r["source"]
        kind += "/greedy" if r["temperature"] == 0 else "/sampled"
        sources[kind] = sources.get(kind, 0) + 1
        if r.get("category"):
            categories[r["category"]] = categories.get(r["category"], 0) + 1
    stats_path = work / "gen_stats.json"
    info = {
        "target": args.model_path or "SmolLM2-135M-Instruct (bundled, specdec.target.embedded)",
        "sequences": len(records),
        "response_tokens": sum(len(response_tokens(r)) for r in records),
        "two_turn_conversations": sum(1 for r in records if r.get("turns", 1) > 1),
        "sampled_conversations": sum(1 for r in records if r["temperature"] > 0),
        "categories": categories,
        "generation": json.loads(stats_path.read_text()) if stats_path.exists() else None,
        "features": (json.loads((work / "features_stats.json").read_text())
                     if (work / "features_stats.json").exists() else None),
        "sources": sources,
        "draft_vocab_size": int(hot.numel()),
        "draft_vocab_coverage": vocab_coverage(records, hot),
        "heldout": "heldout_prompts.jsonl (never trained on; drawn first from the same shuffles)",
        "args": asdict(args),
    }
    (out / "training_data.json").write_text(json.dumps(info, indent=2) + "\n")


def init_head_vocab(args: TrainArgs, target: Any) -> torch.Tensor:
    """--keep-init-vocab: the init head's draft vocabulary, hot_ids [Vd] int64 ascending."""
    from .loader import load_eagle3

    _check_init_vocab(args)
    assert args.init_head is not None
    old = load_eagle3(args.init_head, target, dtype="float32")
    return old.to_target_ids(torch.arange(old.cfg.draft_vocab_size)).long().sort().values


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    args = resolve_args(ns)
    logging.basicConfig(level=logging.INFO, format="[specdec.train %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out = Path(ns.out)
    work = Path(ns.work_dir) if ns.work_dir else default_work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in ns.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; choose from {STAGES}")
    (work / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    progress = not ns.no_progress
    engine_box: list[Any] = []

    def engine_fn() -> Any:
        if not engine_box:
            engine_box.append(_engine(args))
        return engine_box[0]

    if "prompts" in stages:
        stage_prompts(args, work, out, engine_fn, progress)
    if "responses" in stages:
        stage_responses(args, work, engine_fn, progress)
    engine_box.clear()  # free the generation engine's KV cache
    # the float32 target: for training, and for features unless they come from a quantised one
    fp32_features = "features" in stages and args.features_quantization is None
    target: Any = load_target(args) if "train" in stages or fp32_features else None
    if "features" in stages:
        stage_features(args, work, target, progress)
    if "train" in stages:
        from .ttt import train

        records = read_jsonl(work / "responses.jsonl")[: args.max_prompts]
        hot = (init_head_vocab(args, target) if args.keep_init_vocab
               else choose_draft_vocab(records, args.draft_vocab_size, target.cfg.vocab_size))
        log.info("draft vocab %d covers %.2f%% of response tokens", len(hot),
                 100 * vocab_coverage(records, hot))
        n_shards = -(-len(records) // SHARD_SIZE)
        shards = [work / "features" / f"shard_{i:05d}.pt" for i in range(n_shards)]
        missing = [p for p in shards if not p.exists()]
        if missing:
            raise SystemExit(f"missing feature shards {missing[:3]}...; run the features stage")
        val_mask = [prompt_key(r["prompt"] or r["key"]) % 10000 < args.val_frac * 10000 for r in records]
        train(args, target, hot, shards, work, out, resume=ns.resume, progress=progress, val_mask=val_mask)
        write_provenance(args, work, out, records, hot)
    if "eval" in stages:
        run_eval(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
