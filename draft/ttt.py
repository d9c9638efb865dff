"""EAGLE-3 training-time test (TTT): the draft is unrolled for K steps, each step feeding the
draft's own hidden states of the previous step back in, exactly as the tree drafter does.

Alignment (per sequence, positions p = 0..T-1; f_p = fc(aux_p), t_j = target distribution at
sequence position j, i.e. over token x_{j+1}):

    step 0:  token x_{p+1}, features f_p,          position p      -> predicts x_{p+2} ~ t_{p+1}
    step k:  token x_{p+1+k}, features h_{k-1, p}, position p + k  -> predicts x_{p+2+k} ~ t_{p+1+k}

Step k at index p is the depth-k node of a draft chain whose root is the (committed) step-0 row
p. Its query sees what `Eagle3Proposer` lets that node see: the step-0 keys 0..p (the committed
prefix, the root included) plus the chain's own keys of steps 1..k at index p (its ancestors and
itself). Step-0 scores are one causal [T, T] product; the chain keys add one "diagonal" score per
step. SpecForge builds the same cache; it keeps the position at p for every step, whereas we use
p + k, the position the proposer gives a depth-k node.

Loss per step: forward KL(target || draft) against the target's next-token distribution
restricted to the draft vocabulary (SpecForge's cross-entropy minus the target's entropy), on
response tokens whose target argmax lies in the draft vocabulary; steps weighted `decay ** k`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from specdec.target.llama4 import Llama4ForCausalLM

from .eagle3 import Eagle3Draft
from .eagle3_config import Eagle3Config
from .save import save_eagle3

log = logging.getLogger("specdec.train")


# ---- the draft ----------------------------------------------------------------------------------
def make_draft(
    target: Llama4ForCausalLM,
    hot_ids: Tensor,
    intermediate_size: int | None,
    init_from_target: bool,
    seed: int,
    aux_std: Tensor | None = None,  # [3 * H] per-dim std of the aux features
) -> Eagle3Draft:
    """A fresh fp32 single-layer head shaped like the target's layers, trainable, sharing (and
    freezing) the target's embedding. With `init_from_target` the lm_head starts as (a tenth of)
    the target's output rows of the draft vocabulary. With `aux_std`
    the columns of `fc` are divided by the feature's std: the target's residual stream has a few
    "massive" dims (|x| ~ 2e4 in SmolLM2) that would otherwise swamp the projection at init."""
    tc = target.cfg
    cfg = Eagle3Config(
        hidden_size=tc.hidden_size, num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
        intermediate_size=intermediate_size or tc.intermediate_size_mlp, rms_norm_eps=tc.rms_norm_eps,
        vocab_size=tc.vocab_size, draft_vocab_size=int(hot_ids.numel()), target_hidden_size=tc.hidden_size,
        rope=tc.rope, tie_word_embeddings=False, aux_layer_ids=None,
    )
    g = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(cfg, own_embedding=False)
    for name, p in draft.named_parameters():
        if name == "d2t":
            continue
        p.requires_grad_(True)
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    with torch.no_grad():
        draft.d2t.copy_(hot_ids - torch.arange(hot_ids.numel()))
        if init_from_target:
            out_w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
            # scaled down: the draft must predict one token further than the target's own head
            # (x_{p+2} from f_p), so a full-strength copy starts confidently wrong (KL ~ 20 nats)
            draft.lm_head.weight.copy_(0.1 * out_w[hot_ids].float())
        if aux_std is not None:
            draft.fc.weight.div_(aux_std.float().clamp_min(1e-3)[None, :])
    draft.share_embedding(target.embed_tokens.weight.detach().float())
    return draft


def warm_start(draft: Eagle3Draft, head: Path, target: Llama4ForCausalLM, hot_ids: Tensor) -> dict[str, int]:
    """Start `draft` from a trained head (a piece of an earlier run): every layer weight is
    copied; lm_head rows are copied for the tokens both draft vocabularies hold, the others
    keep `draft`'s init. Returns {"copied_rows", "new_rows"}."""
    from .loader import load_eagle3

    old = load_eagle3(head, target, dtype="float32")
    if (old.cfg.hidden_size, old.cfg.intermediate_size, old.cfg.target_hidden_size) != (
        draft.cfg.hidden_size, draft.cfg.intermediate_size, draft.cfg.target_hidden_size
    ):
        raise ValueError(f"--init-head {head}: its shapes differ from the head being trained")
    mine = dict(draft.named_parameters())
    with torch.no_grad():
        for name, p in old.named_parameters():
            if name in ("lm_head.weight", "d2t") or name not in mine or name.startswith("embed"):
                continue
            mine[name].copy_(p.float())
        old_ids = old.to_target_ids(torch.arange(old.cfg.draft_vocab_size))  # [Vd_old] target ids
        row_of = {int(t): i for i, t in enumerate(old_ids.tolist())}
        new_pos, old_pos = [], []
        for i, t in enumerate(hot_ids.tolist()):
            if t in row_of:
                new_pos.append(i)
                old_pos.append(row_of[t])
        draft.lm_head.weight[torch.tensor(new_pos, dtype=torch.long)] = old.lm_head.weight[
            torch.tensor(old_pos, dtype=torch.long)].float()
    return {"copied_rows": len(new_pos), "new_rows": int(hot_ids.numel()) - len(new_pos)}


def target_head_weight(target: Llama4ForCausalLM, hot_ids: Tensor) -> Tensor:
    """[Vd, H] fp32: the target's output rows of the draft vocabulary."""
    w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
    return w[hot_ids].detach().float()


# ---- TTT attention -------------------------------------------------------------------------------
class ChainAttention:
    """Attention callable for `Eagle3Draft.layer`, called once per TTT step on a [B, T] batch."""

    def __init__(self, B: int, T: int, start: int, num_heads: int, num_kv_heads: int, scale: float) -> None:
        self.B, self.T = B, T
        self.start = start  # steps >= 1 only run rows [start, T) (earlier rows are never scored)
        self.rep = num_heads // num_kv_heads
        self.scale = scale
        self.keys: list[Tensor] = []  # step 0 [B, H, T, D], later steps [B, H, T - start, D]
        self.values: list[Tensor] = []

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [N, H|Hkv, D] -> [N, H, D]
        B, D = self.B, q.shape[-1]
        Tq = q.shape[0] // B  # T at step 0, T - start later
        qh = q.view(B, Tq, -1, D).transpose(1, 2)  # [B, H, Tq, D]
        kh = k.view(B, Tq, -1, D).transpose(1, 2).repeat_interleave(self.rep, dim=1)  # [B, H, Tq, D]
        vh = v.view(B, Tq, -1, D).transpose(1, 2).repeat_interleave(self.rep, dim=1)
        self.keys.append(kh)
        self.values.append(vh)
        if len(self.keys) == 1:  # step 0: plain causal attention
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
            return out.transpose(1, 2).reshape(B * Tq, -1, D)
        T = self.T
        k0, v0 = self.keys[0], self.values[0]  # [B, H, T, D]
        # query row i (= global row start + i) sees step-0 keys 0..start + i
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[self.start :]  # [Tq, T]
        s0 = (qh @ k0.transpose(-1, -2)) * self.scale  # [B, H, Tq, T]
        s0 = s0.masked_fill(~causal, float("-inf"))
        chain = torch.stack([(qh * kj).sum(-1) for kj in self.keys[1:]], dim=-1) * self.scale  # [B, H, Tq, k]
        p = torch.softmax(torch.cat((s0, chain), dim=-1).float(), dim=-1).to(qh.dtype)
        out = p[..., :T] @ v0  # [B, H, Tq, D]
        vs = torch.stack(self.values[1:], dim=-2)  # [B, H, Tq, k, D]
        out = out + (p[..., T:, None] * vs).sum(-2)
        return out.transpose(1, 2).reshape(B * Tq, -1, D)


# ---- the loss ------------------------------------------------------------------------------------
def _shift(x: Tensor, k: int, fill: float | int = 0) -> Tensor:
    """x[:, j + k] at column j (right end filled): [B, T, ...] -> same shape."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out


def ttt_forward(
    draft: Eagle3Draft,
    batch: dict[str, Tensor],
    head_w: Tensor,  # [Vd, H] target output rows of the draft vocab
    in_vocab: Tensor,  # [V] bool: target id is in the draft vocab (t2d)
    steps: int,
    decay: float,
) -> tuple[Tensor, list[float], list[float], int]:
    """Returns (weighted loss, per-step losses, per-step top-1 accuracies, tokens scored)."""
    ids, resp, top1 = batch["input_ids"], batch["loss_mask"], batch["top1"]  # [B, T]
    B, T = ids.shape
    lengths = batch["lengths"]
    pos = torch.arange(T, device=ids.device)[None, :].expand(B, T)  # [B, T]
    inside = pos < lengths[:, None]  # [B, T]
    # row j scores token x_{j+1}: a response token, and the target's argmax at j is draftable
    scored = _shift(resp & inside, 1, False) & in_vocab[top1] & inside  # [B, T] over target rows j
    features = draft.project_features([batch["aux"]])  # [B, T, H]
    # rows before `start` are never scored at steps >= 1: those steps skip them as queries
    has = scored.any(-1)
    first = int(torch.where(has, scored.float().argmax(-1), T).min())
    start = max(0, min(T - 1, first - steps))
    attend = ChainAttention(B, T, start, draft.cfg.num_heads, draft.cfg.num_kv_heads, draft.scale)
    norm_count = int(_shift(scored, 1, False).sum())
    # the target's distribution over the draft vocab, once per batch for every scored row j;
    # step k reads rows p + 1 + k of it
    sb, sj = scored.nonzero(as_tuple=True)
    with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):  # labels in fp32 always
        tp_all = torch.softmax(batch["hidden"][sb, sj].float() @ head_w.T, dim=-1)  # [S, Vd]
        neg_entropy = (tp_all * torch.log(tp_all.clamp_min(1e-30))).sum(-1)  # [S]
        t_top1 = tp_all.argmax(-1)  # [S]
    row_of = torch.full((B, T), -1, dtype=torch.long, device=ids.device)  # [B, T] -> row of tp_all
    row_of[sb, sj] = torch.arange(sb.numel(), device=ids.device)
    total = torch.zeros((), device=ids.device)
    losses: list[float] = []
    accs: list[float] = []
    for k in range(steps):
        s = 0 if k == 0 else start
        tokens = _shift(ids, 1 + k)[:, s:]  # x_{p+1+k}   [B, T - s]
        out = draft.layer(tokens, features, pos[:, s:] + k, attend)
        features = out.hidden if k > 0 else out.hidden[:, start:]
        valid = _shift(scored, 1 + k, False)[:, s:]  # target row p + 1 + k is scored
        n = int(valid.sum())
        if n == 0:
            losses.append(0.0)
            accs.append(0.0)
            continue
        b, p = valid.nonzero(as_tuple=True)
        logits = draft.draft_logits(out.logits_hidden[b, p])  # [n, Vd]
        r = row_of[b, s + p + 1 + k]  # [n] the target's row p + 1 + k
        # forward KL(target || draft) = sum tp log tp - sum tp log q
        kl = neg_entropy[r] - (tp_all[r] * torch.log_softmax(logits, dim=-1)).sum(-1)  # [n]
        loss_k = kl.sum() / max(1, norm_count)
        total = total + (decay**k) * loss_k
        losses.append(float(kl.detach().mean()))
        accs.append(float((logits.argmax(-1) == t_top1[r]).float().mean()))
    return total, losses, accs, norm_count


# ---- the training loop ---------------------------------------------------------------------------
@torch.no_grad()
def validate(
    draft: Eagle3Draft, items: Sequence[dict[str, Tensor]], args: Any, head_w: Tensor, in_vocab: Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """TTT loss and per-step top-1 accuracy on held-back sequences, token-weighted."""
    from .train_data import iter_batches

    was = draft.training
    draft.eval()
    tot, n_tok = 0.0, 0
    acc = [0.0] * args.ttt_steps
    for batch in iter_batches(items, args.batch_tokens, args.batch_seqs, args.seed, 0):
        loss, _, accs, ntok = ttt_forward(draft, _to(batch, device), head_w, in_vocab, args.ttt_steps,
                                          args.ttt_decay)
        tot += float(loss) * ntok
        n_tok += ntok
        acc = [a + b * ntok for a, b in zip(acc, accs, strict=True)]
    draft.train(was)
    return {"val_loss": tot / max(1, n_tok), "val_acc": [a / max(1, n_tok) for a in acc], "val_tokens": n_tok}


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - frac)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    """The CPU has native bf16 dot products (AVX-512 BF16 or AMX-BF16)."""
    from specdec.kernels.cpu_isa import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def export_head(draft: Eagle3Draft, out: Path, dtype: torch.dtype) -> None:
    cpu = draft if next(draft.parameters()).device.type == "cpu" else _cpu_copy(draft)
    save_eagle3(cpu, out, dtype)
    (out / "model.safetensors").chmod(0o644)


def _cpu_copy(draft: Eagle3Draft) -> Eagle3Draft:
    copy = Eagle3Draft(draft.cfg, own_embedding=False)
    copy.load_state_dict({k: v.cpu() for k, v in draft.state_dict().items()})
    return copy


def train(
    args: Any,
    target: Llama4ForCausalLM,
    hot_ids: Tensor,
    shards: Sequence[Path],
    work: Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    val_mask: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Train on the feature shards; writes checkpoints to work/ckpt, logs to out/train_log.jsonl
    (and work/), and the head (SGLang/vLLM format) to `out` at every checkpoint. With
    `val_mask` (one flag per sequence) the flagged sequences are never trained on: their loss is
    logged at every checkpoint and the head in `out` is the checkpoint with the lowest one."""
    from .train_data import iter_batches, length_batches, load_shards

    device = _device(args.device)
    train_dtype = getattr(args, "train_dtype", "float32")
    if train_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--train-dtype {train_dtype!r}: expected float32 or bfloat16")
    # bfloat16: the head's matmuls run under autocast (forward and backward); the weights, Adam's
    # state, the target's labels, the loss's log-softmax and validation stay float32
    bf16 = train_dtype == "bfloat16"
    if bf16 and device.type == "cpu" and not _cpu_has_bf16():
        log.warning("--train-dtype bfloat16 on a CPU without avx512_bf16/amx_bf16: emulated, likely slower")
    all_items = load_shards(shards)
    if not all_items:
        raise SystemExit(f"no training features in {work}; run the features stage first")
    flags = list(val_mask) if val_mask is not None else [False] * len(all_items)
    if len(flags) != len(all_items):
        raise ValueError(f"val_mask has {len(flags)} flags for {len(all_items)} sequences")
    items = [x for x, v in zip(all_items, flags, strict=True) if not v]
    val_items = [x for x, v in zip(all_items, flags, strict=True) if v]
    del all_items
    lengths = [int(x["input_ids"].shape[0]) for x in items]
    per_epoch = len(length_batches(lengths, args.batch_tokens, args.batch_seqs, args.seed, 0))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * per_epoch))
    aux_std = torch.cat([x["aux"].float() for x in items[:64]]).std(0)  # [3H]
    draft = make_draft(target, hot_ids, args.draft_intermediate_size, args.init_from_target, args.seed, aux_std)
    if getattr(args, "init_head", None):
        ws = warm_start(draft, Path(args.init_head), target, hot_ids)
        log.info("warm start from %s: %d lm_head rows copied, %d new", args.init_head, ws["copied_rows"],
                 ws["new_rows"])
    draft.to(device)
    if device.type != "cpu":
        draft.share_embedding(target.embed_tokens.weight.detach().float().to(device))
    params = [p for n, p in draft.named_parameters() if p.requires_grad and n != "d2t"]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule, args.min_lr_ratio)
    )
    head_w = target_head_weight(target, hot_ids).to(device)
    in_vocab = torch.zeros(target.cfg.vocab_size, dtype=torch.bool)
    in_vocab[hot_ids] = True
    in_vocab = in_vocab.to(device)
    ckpt_dir = work / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"
    step = 0
    tokens_seen = 0  # loss tokens trained on so far (all epochs)
    best_val = math.inf
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if not torch.equal(state["hot_ids"], hot_ids):
            raise SystemExit("checkpoint draft vocabulary differs from the data's; cannot resume")
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        best_val = float(state.get("best_val", math.inf))
        tokens_seen = int(state.get("tokens_seen", 0))
        log.info("resumed from %s at step %d", ckpt_path, step)
    elif resume:
        log.info("no checkpoint at %s; starting fresh", ckpt_path)
    save_dtype = getattr(torch, args.save_dtype)
    log_files = [work / "train_log.jsonl", out / "train_log.jsonl"]
    if step == 0:
        for f in log_files:
            f.unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        nonlocal best_val
        export = True
        if val_items:
            val = validate(draft, val_items, args, head_w, in_vocab, device)
            export = val["val_loss"] < best_val
            best_val = min(best_val, val["val_loss"])
            rec = {"step": step, **val, "best": export}
            for f in log_files:
                with f.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            log.info("step %d validation loss %.4f acc %s%s", step, val["val_loss"],
                     " ".join(f"{a:.3f}" for a in val["val_acc"]), " (best: exported)" if export else "")
        state = {"model": {k: v for k, v in draft.state_dict().items()}, "optim": opt.state_dict(),
                 "sched": sched.state_dict(), "step": step, "hot_ids": hot_ids, "best_val": best_val,
                 "tokens_seen": tokens_seen}
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.rename(ckpt_path)
        if export:
            export_head(draft, out, save_dtype)
        if getattr(args, "keep_heads", False):  # every checkpoint's head, for draft/learning_curve.py
            kept = work / "heads" / f"step_{step:06d}"
            kept.mkdir(parents=True, exist_ok=True)
            export_head(draft, kept, save_dtype)
            (kept / "trained.json").write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}) + "\n")

    from .train_eagle3 import _Progress

    bar = _Progress(total_steps, "train", progress)
    bar.update(step)
    log.info("validation: %d sequences held back", len(val_items))
    log.info("training: %d sequences, %d batches/epoch, %d steps, TTT %d, draft vocab %d, %.1fM params",
             len(items), per_epoch, total_steps, args.ttt_steps, hot_ids.numel(),
             sum(p.numel() for p in params) / 1e6)
    t0 = time.perf_counter()
    window: dict[str, Any] = {"loss": 0.0, "n": 0, "tokens": 0, "losses": [], "accs": []}
    draft.train()
    epoch = step // per_epoch
    skip = step % per_epoch
    last: dict[str, Any] = {}
    while step < total_steps:
        for bi, batch in enumerate(iter_batches(items, args.batch_tokens, args.batch_seqs, args.seed, epoch)):
            if bi < skip:
                continue
            if step >= total_steps:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, losses, accs, ntok = ttt_forward(draft, _to(batch, device), head_w, in_vocab,
                                                       args.ttt_steps, args.ttt_decay)
            opt.zero_grad(set_to_none=True)
            if ntok:
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
                opt.step()
            else:
                gnorm = 0.0
            sched.step()
            step += 1
            window["loss"] += float(loss.detach())
            window["n"] += 1
            window["tokens"] += ntok
            tokens_seen += ntok
            window["losses"].append(losses)
            window["accs"].append(accs)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc0=f"{accs[0]:.2f}", accK=f"{accs[-1]:.2f}")
            if step % args.log_every == 0 or step == total_steps:
                n = window["n"]
                rec = {
                    "step": step, "epoch": round(step / per_epoch, 3), "lr": sched.get_last_lr()[0],
                    "loss": window["loss"] / n, "grad_norm": gnorm,
                    "step_loss": [sum(x[k] for x in window["losses"]) / n for k in range(args.ttt_steps)],
                    "step_acc": [sum(x[k] for x in window["accs"]) / n for k in range(args.ttt_steps)],
                    "tokens": window["tokens"], "elapsed_s": round(time.perf_counter() - t0, 1),
                }
                for f in log_files:
                    with f.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                log.info("step %d/%d loss %.4f acc %s lr %.2e", step, total_steps, rec["loss"],
                         " ".join(f"{a:.3f}" for a in rec["step_acc"]), rec["lr"])
                last = rec
                window = {"loss": 0.0, "n": 0, "tokens": 0, "losses": [], "accs": []}
            if step % args.save_every == 0:
                checkpoint(step)
        epoch += 1
        skip = 0
    bar.close()
    checkpoint(step)
    log.info("done: %d steps in %.0fs; head written to %s", step, time.perf_counter() - t0, out)
    return last
