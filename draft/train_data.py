"""Data pipeline for training an EAGLE3 head by self-distillation from its target.

Stages (each resumable: finished work is kept on disk and skipped on a re-run):

1. prompts: GSM8K train questions + Alpaca seed tasks (+ instances), shuffled by seed; a
   held-out split is set aside first and never trained on; plus prompts the target writes
   itself (the chat template up to the user header `<|im_start|>user\\n`, sampled until EOS).
2. responses: the target answers every training prompt through `specdec.Engine` (batched,
   greedy and sampled, some conversations two turns; draft/chat_generate.py).
3. draft vocabulary: the most frequent response tokens (`hot_ids`, ascending target ids).
4. features: one teacher-forced target pass over prompt + response capturing the three aux
   hidden states (inputs of layers `capture_layers`) and the final normed hidden state; the
   trainer turns the latter into the target's next-token distribution over the draft vocab.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta
from specdec.kernels.kv_pool import KVPool
from specdec.kernels.torch_backend import TorchAttentionBackend
from specdec.target.llama4 import Llama4ForCausalLM

log = logging.getLogger("specdec.train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# ---- prompts -------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def gsm8k_prompts(path: Path) -> list[dict[str, Any]]:
    return [{"source": f"gsm8k_train:{i}", "prompt": r["question"].strip()}
            for i, r in enumerate(read_jsonl(path))]


def alpaca_prompts(path: Path) -> list[dict[str, Any]]:
    """One prompt per seed task (its first instance's input appended when it has one)."""
    out = []
    for r in read_jsonl(path):
        inst = (r.get("instances") or [{}])[0]
        text = r["instruction"].strip()
        if inst.get("input", "").strip():
            text += "\n\n" + inst["input"].strip()
        out.append({"source": f"alpaca_seed:{r['id']}", "prompt": text})
    return out


@dataclass(frozen=True)
class PromptSplit:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


def split_prompts(
    data_dir: Path, seed: int, n_gsm8k: int, n_alpaca: int, heldout_gsm8k: int, heldout_alpaca: int
) -> PromptSplit:
    """Deterministic by `seed`: the held-out prompts are drawn first, then the training ones."""
    rng = random.Random(seed)
    missing = [n for n in ("gsm8k_train.jsonl", "alpaca_seed_tasks.jsonl") if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"training data not found: {', '.join(str(data_dir / n) for n in missing)} "
                                "(the recipe reads the project's ../shared/data; pass --data-dir)")
    gsm = gsm8k_prompts(data_dir / "gsm8k_train.jsonl")
    alp = alpaca_prompts(data_dir / "alpaca_seed_tasks.jsonl")
    rng.shuffle(gsm)
    rng.shuffle(alp)
    heldout = gsm[:heldout_gsm8k] + alp[:heldout_alpaca]
    train = gsm[heldout_gsm8k : heldout_gsm8k + n_gsm8k] + alp[heldout_alpaca : heldout_alpaca + n_alpaca]
    rng.shuffle(train)
    return PromptSplit(train, heldout)


def user_header_prefix(template: Any) -> str:
    """The chat template rendered up to an open user turn: `...<|im_start|>user\\n`."""
    marker = "\x00MARK\x00"
    text: str = template.render([{"role": "user", "content": marker}], add_generation_prompt=False)
    return text[: text.index(marker)]


def self_written_prompts(engine: Any, template: Any, n: int, seed: int, batch: int = 64) -> list[dict[str, Any]]:
    """Prompts the target writes itself: sample a user turn after the user header."""
    if n <= 0:
        return []
    prefix = engine.encode(user_header_prefix(template))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    k = 0
    while len(out) < n and k < 6 * n:
        m = min(batch, 2 * (n - len(out)))
        params = [{"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 64, "seed": seed * 100003 + k + i}
                  for i in range(m)]
        k += m
        for r in engine.generate(input_ids=[prefix] * m, sampling_params=params):
            text = r["text"].strip()
            reason = r["meta_info"]["finish_reason"] or {}
            if reason.get("type") != "stop" or len(text) < 12 or text in seen:
                continue
            seen.add(text)
            out.append({"source": "self", "prompt": text})
            if len(out) >= n:
                break
    return out


# ---- draft vocabulary ----------------------------------------------------------------------------
def response_spans(record: dict[str, Any]) -> list[tuple[int, int]]:
    """[start, end) of every assistant turn of a row (rows without spans: all after prompt_len)."""
    spans = record.get("spans") or [[record["prompt_len"], len(record["input_ids"])]]
    return [(int(a), int(b)) for a, b in spans]


def response_tokens(record: dict[str, Any]) -> list[int]:
    """The assistant tokens of a row, every turn."""
    ids = record["input_ids"]
    return [t for a, b in response_spans(record) for t in ids[a:b]]


def choose_draft_vocab(records: Sequence[dict[str, Any]], size: int, vocab_size: int) -> Tensor:
    """The `size` most frequent response tokens (ties by id), topped up with the lowest unused ids
    when fewer distinct tokens occur; returned sorted ascending: hot_ids [size] int64."""
    if size >= vocab_size:
        return torch.arange(vocab_size)
    counts: Counter[int] = Counter()
    for r in records:
        counts.update(response_tokens(r))
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    chosen = set(ranked)
    fill = (t for t in range(vocab_size) if t not in chosen)
    while len(ranked) < size:
        ranked.append(next(fill))
    return torch.tensor(sorted(ranked), dtype=torch.long)


def vocab_coverage(records: Sequence[dict[str, Any]], hot_ids: Tensor) -> float:
    hot = set(hot_ids.tolist())
    toks = [t for r in records for t in response_tokens(r)]
    return sum(t in hot for t in toks) / max(1, len(toks))


# ---- target features -----------------------------------------------------------------------------
@torch.inference_mode()
def target_features(
    model: Llama4ForCausalLM, seqs: Sequence[Sequence[int]], capture_layers: tuple[int, ...]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One packed causal forward over `seqs`; per sequence (aux [T, 3 * H], hidden [T, H],
    top1 [T]) where aux concatenates the captured layer inputs in `fc` order, hidden is the
    final normed state (the target's logits are `compute_logits(hidden)`) and top1 the
    target's argmax token over its full vocabulary."""
    cfg = model.cfg
    total = sum(len(s) for s in seqs)
    dtype = next(model.parameters()).dtype
    pool = KVPool(cfg.num_layers, total, cfg.num_kv_heads, cfg.head_dim, dtype)
    metas, positions, start = [], [], 0
    for s in seqs:
        n = len(s)
        slots = torch.arange(start, start + n)
        pos = torch.arange(n)
        metas.append(SeqAttnMeta(start, n, slots, pos, pos, None))
        positions.append(pos)
        start += n
    batch = ForwardBatch(AttentionMeta(torch.arange(total), tuple(metas)), pool.k, pool.v,
                         TorchAttentionBackend(), capture_layers)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    out = model(ids, torch.cat(positions), batch)
    aux = torch.cat(out.aux_hidden, dim=-1)  # [total, 3H]
    top1 = torch.cat([model.compute_logits(h).argmax(-1) for h in out.hidden.split(512)])  # [total]
    lens = [len(s) for s in seqs]
    return list(zip(aux.split(lens), out.hidden.split(lens), top1.split(lens), strict=True))


def _feature_items(
    model: Llama4ForCausalLM, group: Sequence[dict[str, Any]], capture_layers: tuple[int, ...], max_len: int
) -> list[dict[str, Tensor]]:
    items = []
    feats = target_features(model, [g["input_ids"][:max_len] for g in group], capture_layers)
    for g, (aux, hid, top1) in zip(group, feats, strict=True):
        ids = torch.tensor(g["input_ids"][:max_len], dtype=torch.long)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for a, b in response_spans(g):
            mask[a:b] = True  # cut at max_len by the slice
        items.append({"input_ids": ids, "loss_mask": mask, "top1": top1.to(torch.int32),
                      "aux": aux.to(torch.bfloat16), "hidden": hid.to(torch.bfloat16)})
    return items


def build_feature_shards(
    model: Llama4ForCausalLM,
    records: Sequence[dict[str, Any]],
    capture_layers: tuple[int, ...],
    shard_dir: Path,
    shard_size: int = 64,
    pack_tokens: int = 2048,
    max_len: int = 1024,
    progress: Any = None,
) -> tuple[list[Path], int]:
    """Shard i holds records [i * shard_size, (i + 1) * shard_size): a list of dicts with
    input_ids [T], loss_mask [T] (1 on response tokens), top1 [T] int32 (target argmax),
    aux [T, 3H] bf16, hidden [T, H] bf16.
    Existing shards are kept (resume). Returns the shard paths and the tokens this call computed."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    computed = 0
    for si, s in enumerate(range(0, len(records), shard_size)):
        path = shard_dir / f"shard_{si:05d}.pt"
        paths.append(path)
        part = records[s : s + shard_size]
        if path.exists() and len(torch.load(path, weights_only=True)) == len(part):
            if progress is not None:
                progress.update(len(part))
            continue
        items: list[dict[str, Tensor]] = []
        group: list[dict[str, Any]] = []

        for r in part:
            if group and sum(min(len(g["input_ids"]), max_len) for g in group) + len(r["input_ids"]) > pack_tokens:
                items.extend(_feature_items(model, group, capture_layers, max_len))
                if progress is not None:
                    progress.update(len(group))
                group = []
            group.append(r)
        if group:
            items.extend(_feature_items(model, group, capture_layers, max_len))
            if progress is not None:
                progress.update(len(group))
        computed += sum(int(x["input_ids"].numel()) for x in items)
        tmp = path.with_suffix(".tmp")
        torch.save(items, tmp)
        tmp.rename(path)
    return paths, computed


def load_shards(paths: Sequence[Path]) -> list[dict[str, Tensor]]:
    items: list[dict[str, Tensor]] = []
    for p in paths:
        items.extend(torch.load(p, weights_only=True))
    return items


def length_batches(
    lengths: Sequence[int], max_tokens: int, max_seqs: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of sequence indices with similar lengths (little padding), in a seeded random order."""
    rng = random.Random(seed * 1000 + epoch)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1 > max_seqs or (len(cur) + 1) * max(lengths[j] for j in [*cur, i]) > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right-padded batch: input_ids/loss_mask/top1 [B, T], aux [B, T, 3H], hidden [B, T, H] (fp32),
    lengths [B]."""
    T = max(int(x["input_ids"].shape[0]) for x in items)
    B = len(items)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    aux = torch.zeros(B, T, items[0]["aux"].shape[-1])
    hid = torch.zeros(B, T, items[0]["hidden"].shape[-1])
    top1 = torch.zeros(B, T, dtype=torch.long)
    lens = torch.zeros(B, dtype=torch.long)
    for b, x in enumerate(items):
        n = int(x["input_ids"].shape[0])
        ids[b, :n] = x["input_ids"]
        top1[b, :n] = x["top1"].long()
        mask[b, :n] = x["loss_mask"]
        aux[b, :n] = x["aux"].float()
        hid[b, :n] = x["hidden"].float()
        lens[b] = n
    return {"input_ids": ids, "loss_mask": mask, "top1": top1, "aux": aux, "hidden": hid, "lengths": lens}


def iter_batches(
    items: Sequence[dict[str, Tensor]], max_tokens: int, max_seqs: int, seed: int, epoch: int
) -> Iterator[dict[str, Tensor]]:
    lengths = [int(x["input_ids"].shape[0]) for x in items]
    for idx in length_batches(lengths, max_tokens, max_seqs, seed, epoch):
        yield collate([items[i] for i in idx])
