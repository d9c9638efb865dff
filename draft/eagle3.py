"""The EAGLE3 draft head: one Llama decoder layer over [embedding ; target features].

    features = fc(concat(aux_0, aux_1, aux_2))      # [T, 3 * H_target] -> [T, H]   (first use)
             | previous draft hidden                # [T, H]                       (tree steps)
    x        = cat(input_layernorm(embed(ids)), hidden_norm(features))   # [T, 2H]
    h        = features + o_proj(attn(qkv(x)))      # residual is the *features*
    h        = h + mlp(post_attention_layernorm(h))
    logits   = lm_head(norm(h))                     # [T, draft_vocab]; target id = id + d2t[id]
    next features = h                               # pre-norm, fed to the next tree step

Position p of the draft pairs the target feature at p with the token at p + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.distributed import TPGroup
from specdec.kernels.backend import ForwardBatch
from specdec.target.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rope_cis
from specdec.target.llama4 import FusedLayer, fast_path, fused_layer_weights, packed_seqs

from .eagle3_config import Eagle3Config


class DraftOutput(NamedTuple):
    logits_hidden: Tensor  # [T, H] normed, for the lm_head
    hidden: Tensor  # [T, H] pre-norm, the next step's features


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config, own_embedding: bool) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # None: the target's embedding is used (set with `share_embedding`)
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, h) if own_embedding else None
        self._shared_embedding: Tensor | None = None
        self.fc = Linear(3 * cfg.target_hidden_size, (h,))
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv = Linear(2 * h, (self.q_size, self.kv_size, self.kv_size))
        self.o_proj = Linear(self.q_size, (h,))
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = GatedMLP(h, cfg.intermediate_size)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = Linear(h, (cfg.draft_vocab_size,))
        self.d2t = nn.Parameter(torch.zeros(cfg.draft_vocab_size, dtype=torch.long), requires_grad=False)
        self.rotary = RotaryEmbedding(cfg.rope.inv_freq(cfg.head_dim))
        self.scale = cfg.head_dim**-0.5
        self._fused: FusedLayer | bool | None = None  # None: not yet decided; False: no
        # --tp (draft/eagle3_tp.py shard_eagle3): this rank's heads, fc's input columns, the
        # target's vocabulary-parallel embedding; partial sums all-reduced, logits all-gathered
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.tp: TPGroup | None = None
        self.fc_cols: tuple[int, int] | None = None
        self.target_embed: Callable[[Tensor], Tensor] | None = None

    def fused_weights(self) -> FusedLayer | None:
        """Weights for the one-call CPU kernel (`cpu_kernels` eagle3_layer), or None when the
        layer's weights are not float32 / AVX2-int8/int4 on the CPU, or the head is split over
        --tp ranks (the one-call layer has no all-reduce inside)."""
        if self.tp is not None:
            return None
        if self._fused is None:
            self._fused = fused_layer_weights(
                (self.input_layernorm.weight, self.hidden_norm.weight), self.qkv, self.o_proj, self.mlp,
                self.post_attention_layernorm.weight,
            ) or False
        return self._fused if isinstance(self._fused, FusedLayer) else None

    def share_embedding(self, weight: Tensor) -> None:
        if weight.shape != (self.cfg.vocab_size, self.cfg.hidden_size):
            raise ValueError(
                f"target embedding {tuple(weight.shape)} does not fit the draft "
                f"({self.cfg.vocab_size}, {self.cfg.hidden_size})"
            )
        self._shared_embedding = weight

    def embed(self, ids: Tensor) -> Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(ids)
        if self.target_embed is not None:
            return self.target_embed(ids)
        assert self._shared_embedding is not None, "call share_embedding() first"
        return F.embedding(ids, self._shared_embedding)

    def project_features(self, aux: list[Tensor]) -> Tensor:
        """Three captured target hidden states [T, H_t] each -> draft features [T, H]."""
        x = torch.cat(aux, dim=-1).to(self.norm.weight.dtype)
        if self.fc_cols is not None:
            x = x[:, self.fc_cols[0] : self.fc_cols[1]]
        return self._reduce(self.fc(x))

    def _reduce(self, partial: Tensor) -> Tensor:  # --tp: the ranks' partial sums added
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def forward(
        self,
        input_ids: Tensor,  # [T]
        features: Tensor,  # [T, H]
        positions: Tensor,  # [T]
        batch: ForwardBatch,
        input_embeds: Tensor | None = None,  # [T, H] instead of embed(input_ids) (image positions)
    ) -> DraftOutput:
        """Inference over the paged KV: K/V go to the draft pool, `batch.attn` decides visibility."""
        fast = fast_path(features, batch)
        fused = self.fused_weights() if fast is not None else None
        if fast is not None and fused is not None:  # the whole layer in one C++ call, all requests at once
            packed = packed_seqs(batch)
            rope = torch.view_as_real(self.rotary.cis(positions))  # [T, D/2, 2] (cos, sin)
            c = self.cfg
            emb = self.embed(input_ids) if input_embeds is None else input_embeds
            h = fast.eagle3_layer_seqs(
                emb.contiguous(), features.contiguous(), rope, *fused.weights, c.rms_norm_eps, c.num_heads,
                c.num_kv_heads, c.head_dim, batch.kv_k[0], batch.kv_v[0], batch.attn.out_slots, packed.starts,
                packed.slots, packed.masks, self.scale, fused.act_bits,
            )
            return DraftOutput(self.norm(h), h)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [T, H|Hkv, D] -> [T, H, D]
            return batch.backend.forward(q, k, v, batch.kv_k[0], batch.kv_v[0], batch.attn, self.scale, None)

        return self.layer(input_ids, features, positions, attend, input_embeds)

    def layer(
        self,
        input_ids: Tensor,  # [*, T]
        features: Tensor,  # [*, T, H]
        positions: Tensor,  # [*, T]
        attend: Callable[[Tensor, Tensor, Tensor], Tensor],  # q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]
        input_embeds: Tensor | None = None,  # [*, T, H] instead of embed(input_ids)
    ) -> DraftOutput:
        """The decoder layer with attention left to `attend`; leading dims are flattened to N rows
        around it (inference passes [T], training [B, T] with its own TTT attention)."""
        lead = input_ids.shape
        N = input_ids.numel()
        emb = self.embed(input_ids) if input_embeds is None else input_embeds
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(features)), dim=-1)
        q, k, v = self.qkv(x.reshape(N, -1)).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        cis = self.rotary.cis(positions.reshape(N))  # [N, D/2] complex
        q = apply_rope_cis(q.view(N, self.num_heads, self.cfg.head_dim), cis)
        k = apply_rope_cis(k.view(N, self.num_kv_heads, self.cfg.head_dim), cis)
        v = v.view(N, self.num_kv_heads, self.cfg.head_dim)
        attn = attend(q, k, v)  # [N, H, D]
        h = features + self._reduce(self.o_proj(attn.reshape(N, self.q_size))).view(*lead, -1)
        h = h + self._reduce(self.mlp(self.post_attention_layernorm(h)))
        return DraftOutput(self.norm(h), h)

    def draft_logits(self, logits_hidden: Tensor) -> Tensor:  # [N, H] -> [N, draft_vocab] fp32
        logits = self.lm_head(logits_hidden).float()
        if self.tp is None:
            return logits
        return self.tp.all_gather(logits)[..., : self.cfg.draft_vocab_size]  # (vocabulary slices, padded)

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Draft-vocab ids -> target ids (target = draft + d2t[draft])."""
        return draft_ids + self.d2t[draft_ids]
