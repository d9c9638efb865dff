"""Llama 4 text model (dense Llama included) over a paged KV cache.

Per layer: RMSNorm -> attention (GQA; RoPE + L2 QK norm + chunked local attention on RoPE
layers; full attention + temperature tuning on NoPE layers) -> residual -> RMSNorm ->
MoE (top-k sigmoid router scaling the expert *input*, plus the shared expert) or a dense
MLP of `intermediate_size_mlp` -> residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.kernels import cpu_kernels
from specdec.kernels.backend import ForwardBatch
from specdec.kernels.torch_backend import FAST_MAX_QUERIES

from .config import ModelConfig
from .tp import ExpertPart, TPShard

if TYPE_CHECKING:
    from specdec.distributed import TPGroup
from .layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rope_cis, l2_norm


class ModelOutput(NamedTuple):
    hidden: Tensor  # [T, hidden] after the final norm
    aux_hidden: list[Tensor]  # one [T, hidden] per captured layer, in capture order


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.use_rope = cfg.uses_rope(layer_id)
        self.qk_norm = cfg.qk_norm(layer_id)
        self.temperature_tuning = cfg.temperature_tuning(layer_id)
        self.chunk_size = cfg.chunk_size(layer_id)
        self.floor_scale = cfg.floor_scale
        self.attn_scale = cfg.attn_scale
        self.eps = cfg.rms_norm_eps
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv = Linear(cfg.hidden_size, (q_size, kv_size, kv_size), bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, (cfg.hidden_size,), bias=cfg.attention_bias)
        # fp8 KV (--kv-cache-dtype): (k_scale, v_scale, the fp8 format's largest value); K/V are
        # stored divided by their scale and the scales folded into the softmax scale and the
        # output, so every backend only upcasts. None: K/V stored as computed.
        self.kv_scales: tuple[float, float, float] | None = None
        self.checkpoint_kv_scales: dict[str, float] = {}  # "k"/"v" -> the checkpoint's k_scale / v_scale
        self.tp: TPGroup | None = None  # --tp: this rank's heads; o_proj's outputs are partial sums

    def forward(
        self,
        x: Tensor,  # [T, hidden]
        positions: Tensor,  # [T]
        rope: Tensor,  # cos + i sin [T, D/2] complex
        batch: ForwardBatch,
    ) -> Tensor:
        T = x.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [T, q + 2 kv]
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, D)
        qk = qkv[:, : self.q_size + self.kv_size].view(T, H + Hkv, D)
        if self.use_rope:
            qk = apply_rope_cis(qk, rope)  # q and k heads in one call
            if self.qk_norm:
                qk = l2_norm(qk, self.eps)
        q, k = qk[:, :H], qk[:, H:]
        if not self.use_rope and self.temperature_tuning:
            # NoPE layers: q *= 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale))
            q = (q * (scales * self.attn_scale + 1.0)[:, None, None]).to(q.dtype)
        scale = self.scale
        if self.kv_scales is not None:  # fp8 KV: stored = value / scale, saturated to the format
            k_scale, v_scale, top = self.kv_scales
            k = (k * (1.0 / k_scale)).clamp(-top, top)
            v = (v * (1.0 / v_scale)).clamp(-top, top)
            scale = scale * k_scale
        out = batch.backend.forward(
            q,
            k,
            v,
            batch.kv_k[self.layer_id],
            batch.kv_v[self.layer_id],
            batch.attn_for(self.chunk_size),
            scale,
            self.chunk_size,
        )  # [T, H, D]
        if self.kv_scales is not None:
            out = out * self.kv_scales[1]
        out = self.o_proj(out.reshape(T, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class Experts(nn.Module):
    """Stacked routed experts: w13 [E, 2I, H] (gate rows first), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)

        self.quantized: nn.ModuleList | None = None  # per expert (w13, w2) after `quantize`

    def quantize(self, scheme: str) -> int:
        """Replace the stacked weights by one quantised (w13, w2) pair per expert."""
        from .quant import QuantWeight

        self.quantized = nn.ModuleList(
            nn.ModuleList((QuantWeight(self.w13.data[e], scheme), QuantWeight(self.w2.data[e], scheme)))
            for e in range(self.w13.shape[0])
        )
        del self.w13, self.w2
        return 2 * len(self.quantized)

    def forward_one(self, e: int, x: Tensor) -> Tensor:  # x [N, H] -> [N, H]
        if self.quantized is not None:
            pair: Any = self.quantized[e]
            gate, up = pair[0](x).split(self.inter, dim=-1)
            return pair[1](F.silu(gate) * up)
        gate, up = F.linear(x, self.w13[e]).split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])


class MoE(nn.Module):
    """Top-k sigmoid router; the score multiplies the expert *input*; shared expert always on."""

    def __init__(self, cfg: ModelConfig, part: ExpertPart | None = None) -> None:
        """`part` (--tp / --ep-size): the routed experts this rank holds and their width; the
        router stays whole (tokens routed to other ranks' experts add nothing here)."""
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.num_experts
        self.router = Linear(cfg.hidden_size, (cfg.num_experts,))
        self.part = part or ExpertPart(0, cfg.num_experts, cfg.intermediate_size)
        self.experts = Experts(self.part.hi - self.part.lo, cfg.hidden_size, self.part.inter)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

        # "torch": the per-expert loop below; "triton": the grouped top-1 GEMMs of
        # kernels/triton_moe.py (set by the engine on a GPU for unquantised top-1 routing)
        self.kernel = "torch"

    def forward(self, x: Tensor) -> Tensor:  # [T, H]
        logits = self.router(x)  # [T, E]
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
        scores = torch.sigmoid(top_val.float()).to(x.dtype)
        out = self.shared_expert(x)
        if self.kernel == "triton":
            from specdec.kernels.triton_moe import moe_top1_experts

            return out + moe_top1_experts(x, self.experts.w13, self.experts.w2, top_idx[:, 0], scores[:, 0])
        flat_idx = top_idx.flatten()  # [T*k]
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        lo, hi = self.part.lo, self.part.hi
        for e in torch.unique(flat_idx).tolist():
            if not lo <= e < hi:  # another rank's expert (--ep-size)
                continue
            sel = (flat_idx == e).nonzero().squeeze(1)
            tok = token_of[sel]
            routed_in = x[tok] * scores.flatten()[sel, None]
            out.index_add_(0, tok, self.experts.forward_one(e - lo, routed_in))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, part: ExpertPart | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward: nn.Module = (
            MoE(cfg, part) if cfg.is_moe_layer(layer_id) else GatedMLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        )

        self._fused: FusedLayer | bool | None = None  # None: not yet decided; False: no
        self.tp: TPGroup | None = None  # --tp: the feed-forward's outputs are partial sums

    def fused_weights(self) -> FusedLayer | None:
        """Weights for the one-call CPU kernel (`cpu_kernels` decoder_layer), or None when this
        layer is not a plain dense Llama layer with float32 or kernel-packed quantised weights."""
        if self._fused is None:
            self._fused = _fused_weights(self) or False
        return self._fused if isinstance(self._fused, FusedLayer) else None

    def forward(
        self, x: Tensor, positions: Tensor, rope: Tensor, batch: ForwardBatch
    ) -> Tensor:
        h = x + self.attn(self.input_layernorm(x), positions, rope, batch)
        ff = self.feed_forward(self.post_attention_layernorm(h))
        return h + (ff if self.tp is None else self.tp.all_reduce(ff))


@dataclass(frozen=True)
class FusedLayer:
    """What a one-call CPU layer kernel takes besides its activations: the weights in argument
    order and the int8 linears' activation codes (16: w8a16 and float/int4 layers, 8: w8a8_int8)."""

    weights: tuple[Tensor, ...]
    act_bits: int


def _linear_args(module: nn.Module) -> tuple[Tensor, Tensor, int | None] | None:
    """(weight, scale, act_bits) for the fused kernel: packed int8/int4 + scale + the int8
    activation codes (None for int4), or float32 + empty scale + None."""
    if isinstance(module, Linear):
        if module.bias is not None or module.weight.dtype != torch.float32:
            return None
        return module.weight, torch.empty(0), None
    qw = getattr(module, "qw", None)
    if qw is not None and getattr(module, "bias", None) is None and qw.packed:
        if qw.scheme == "w4a16":
            if qw.out_features % cpu_kernels.w4_tile(qw.kernel):
                return None  # the fused layer reads N from the packed int4 rows: no padding allowed
            return qw.qweight, qw.scale, None
        return qw.qweight, qw.scale, qw.act_bits
    return None


def fused_layer_weights(
    in_norms: tuple[Tensor, ...], qkv: nn.Module, o_proj: nn.Module, mlp: GatedMLP, post_norm: Tensor
) -> FusedLayer | None:
    """The weights of a one-call CPU layer kernel in its argument order (input norm(s), QKV,
    O, post-attention norm, gate-up, down; each linear as weight + scale), or None when a norm
    is not float32 on the CPU, a linear has no fused form (`_linear_args`) or the int8 linears
    disagree on their activation codes."""
    norms = (*in_norms, post_norm)
    if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
        return None
    linears = [_linear_args(m) for m in (qkv, o_proj, mlp.gate_up, mlp.down)]
    if any(lin is None for lin in linears):
        return None
    bits = {lin[2] for lin in linears if lin is not None and lin[2] is not None}
    if len(bits) > 1:
        return None
    (q, qs, _), (o, os_, _), (gu, gus, _), (down, downs, _) = (lin for lin in linears if lin is not None)
    return FusedLayer((*in_norms, q, qs, o, os_, post_norm, gu, gus, down, downs), bits.pop() if bits else 16)


def _fused_weights(layer: DecoderLayer) -> FusedLayer | None:
    a, mlp = layer.attn, layer.feed_forward
    if not a.use_rope or a.qk_norm or a.chunk_size is not None or not isinstance(mlp, GatedMLP):
        return None
    return fused_layer_weights((layer.input_layernorm.weight,), a.qkv, a.o_proj, mlp,
                               layer.post_attention_layernorm.weight)


def fast_path(x: Tensor, batch: ForwardBatch) -> Any:
    """The CPU kernel module when this forward can run layers in one call each, else None:
    float32 on the CPU, no autograd, the torch backend, every request's rows packed in order
    and <= 64 new tokens each (decodes, trees and short chunks; longer prefills go to SDPA).
    With several requests only the `_seqs` kernels apply (`packed_seqs`)."""
    meta = batch.attn
    if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() or not meta.seqs
            or batch.backend.name != "torch" or batch.kv_k[0].dtype != torch.float32):
        return None
    at = 0
    for seq in meta.seqs:
        if seq.q_start != at or not 1 <= seq.q_len <= FAST_MAX_QUERIES:
            return None
        at += seq.q_len
    if at != x.shape[0]:
        return None
    return cpu_kernels.extension()


class PackedSeqs(NamedTuple):
    """The `_seqs` kernels' view of a batch: request b owns rows starts[b] .. starts[b + 1] and
    attends over slots[b] with masks[b] (NO_MASK: causal by index)."""

    starts: list[int]  # [B + 1]
    slots: list[Tensor]  # B x [kv_len_b] int64
    masks: list[Tensor]  # B x [q_len_b, kv_len_b] bool or NO_MASK


def packed_seqs(batch: ForwardBatch) -> PackedSeqs:
    """`batch.attn` as the `_seqs` kernels take it (rows already checked by `fast_path`)."""
    seqs = batch.attn.seqs
    return PackedSeqs(
        [s.q_start for s in seqs] + [seqs[-1].q_start + seqs[-1].q_len],
        [s.kv_slots for s in seqs],
        [cpu_kernels.NO_MASK if s.mask is None else s.mask.contiguous() for s in seqs],
    )


class Llama4ForCausalLM(nn.Module):
    """Token ids (or input embeddings) in, final hidden states out; logits on demand."""

    def __init__(self, cfg: ModelConfig, shard: TPShard | None = None, tp: TPGroup | None = None) -> None:
        """`shard` / `tp` (--tp N): build this rank's part (target/tp.py) and meet the other
        ranks at the all-reduces; `cfg` stays the whole model's."""
        super().__init__()
        self.cfg = cfg
        self.shard = shard
        self.tp = tp if shard is not None and shard.world > 1 else None
        local = cfg if shard is None else shard.local_config(cfg)
        vocab = cfg.vocab_size if shard is None else shard.vocab[1] - shard.vocab[0]
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        part = None if shard is None or not cfg.moe_layers else shard.expert_part
        self.layers = nn.ModuleList(DecoderLayer(local, i, part) for i in range(cfg.num_layers))
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.tp = layer.attn.tp = self.tp
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, (vocab,))
        )
        self.rotary = RotaryEmbedding(cfg.rope.inv_freq(cfg.head_dim))
        # every layer's fused-kernel weights, flat, when all layers have them (one C++ call for
        # the whole stack); None: not yet decided, False: no. Reset by quantize_model.
        self._fused: FusedLayer | bool | None = None

    def _stack_weights(self) -> FusedLayer | None:
        """Every layer's fused weights, flat (decoder_stack's argument), when all layers have
        them, share their attention shape and their activation codes."""
        if self._fused is None:
            per_layer = [layer.fused_weights() for layer in self.layers if isinstance(layer, DecoderLayer)]
            attn = [layer.attn for layer in self.layers if isinstance(layer, DecoderLayer)]
            same = len({(a.eps, a.num_heads, a.num_kv_heads, a.head_dim, a.scale) for a in attn}) == 1
            fused = [f for f in per_layer if f is not None]
            ok = same and len(fused) == len(self.layers) and len({f.act_bits for f in fused}) == 1
            self._fused = FusedLayer(tuple(t for f in fused for t in f.weights), fused[0].act_bits) if ok else False
        return self._fused if isinstance(self._fused, FusedLayer) else None

    def forward(
        self,
        input_ids: Tensor | None,  # [T]
        positions: Tensor,  # [T]
        batch: ForwardBatch,
        input_embeds: Tensor | None = None,  # [T, hidden] (multimodal early fusion)
    ) -> ModelOutput:
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids and input_embeds")
        x = self.embed(input_ids) if input_ids is not None else input_embeds
        assert x is not None
        rope = self.rotary.cis(positions)  # [T, D/2] complex
        captured: dict[int, Tensor] = {}
        fast: Any = fast_path(x, batch)
        if fast is not None:
            rope_real = torch.view_as_real(rope)  # [T, D/2, 2] (cos, sin)
            stack = self._stack_weights() if self.tp is None else None  # (one call has no all-reduce)
            if stack is not None:  # every layer in one call, all requests' rows at once
                a0: Attention = self.layers[0].attn  # type: ignore[assignment]
                packed = packed_seqs(batch)
                out = fast.decoder_stack_seqs(
                    x.contiguous(), rope_real, list(stack.weights), batch.kv_k, batch.kv_v, a0.eps, a0.num_heads,
                    a0.num_kv_heads, a0.head_dim, batch.attn.out_slots, packed.starts, packed.slots, packed.masks,
                    a0.scale, list(batch.capture_layers), stack.act_bits,
                )
                return ModelOutput(self.norm(out[0]), list(out[1:]))
            if len(batch.attn.seqs) > 1:
                fast = None  # the per-layer kernels below take one request
            else:
                seq = batch.attn.seqs[0]
                mask = cpu_kernels.NO_MASK if seq.mask is None else seq.mask.contiguous()
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            if i in batch.capture_layers:
                captured[i] = x  # the input of layer i
            fused = layer.fused_weights() if fast is not None else None
            if fused is not None:
                a: Attention = layer.attn
                x, w = x.contiguous(), fused.weights
                kv = (batch.kv_k[i], batch.kv_v[i], batch.attn.out_slots, seq.kv_slots, mask, a.scale, fused.act_bits)
                if self.tp is None:
                    x = fast.decoder_layer(x, rope_real, *w, a.eps, a.num_heads, a.num_kv_heads, a.head_dim, *kv)
                else:  # --tp: this rank's heads and MLP slice; the partial sums meet between the halves
                    attn = fast.decoder_layer_attention(x, rope_real, *w[:5], a.eps, a.num_heads, a.num_kv_heads,
                                                        a.head_dim, *kv)
                    h = x + self.tp.all_reduce(attn)
                    x = h + self.tp.all_reduce(fast.decoder_layer_mlp(h, *w[5:], a.eps, fused.act_bits))
            else:
                x = layer(x, positions, rope, batch)
        captured[len(self.layers)] = x
        return ModelOutput(self.norm(x), [captured[i] for i in batch.capture_layers])

    @property
    def kv_heads(self) -> int:
        """KV heads this rank's layers hold (all of them without --tp)."""
        return self.cfg.num_kv_heads if self.shard is None else self.shard.kv_heads[1] - self.shard.kv_heads[0]

    def embed(self, ids: Tensor) -> Tensor:  # [T] -> [T, hidden]
        """Token embeddings; with --tp each rank looks up its vocabulary rows (zeros for the
        other ranks' ids) and the ranks' rows are summed."""
        if self.tp is None or self.shard is None:
            return self.embed_tokens(ids)
        lo, hi = self.shard.vocab
        mine = (ids >= lo) & (ids < hi)
        x = self.embed_tokens(torch.where(mine, ids - lo, 0)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:  # [N, hidden] -> [N, vocab] fp32
        if self.lm_head is None:
            logits = F.linear(hidden, self.embed_tokens.weight).float()
        else:
            logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.all_gather(logits)  # (ranks hold vocabulary slices)

    def use_triton_moe(self) -> int:
        """Route the MoE layers' experts through the Triton top-1 kernel (top_k == 1,
        unquantised experts, all of them on this rank); returns how many layers switched."""
        n = 0
        for layer in self.layers:
            ff = getattr(layer, "feed_forward", None)
            if (isinstance(ff, MoE) and ff.top_k == 1 and ff.experts.quantized is None
                    and ff.part.hi - ff.part.lo == ff.num_experts):
                ff.kernel = "triton"
                n += 1
        return n

    def tie_lm_head(self, scheme: str) -> None:
        """Quantisation: tied embeddings get a quantised copy as the lm_head (the embedding
        itself stays in the model dtype for lookups)."""
        from .quant import QuantLinear

        if self.lm_head is None:
            self.lm_head = QuantLinear.from_weight(self.embed_tokens.weight.data, scheme)
