"""Random EAGLE3 heads in the real (SGLang/vLLM) checkpoint format, for tiny targets."""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.draft.eagle3 import Eagle3Draft
from specdec.draft.eagle3_config import Eagle3Config
from specdec.draft.save import save_eagle3
from specdec.target.config import RopeConfig


def make_random_eagle3(
    path: Path,
    target_hidden: int,
    vocab: int,
    seed: int = 0,
    draft_vocab: int | None = None,
    aux_layer_ids: tuple[int, ...] | None = (0, 1, 1),
    own_embedding: bool = False,
    scale: float = 0.3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Eagle3Config:
    g = torch.Generator().manual_seed(seed)
    dv = draft_vocab or vocab
    cfg = Eagle3Config(
        hidden_size=target_hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=8,
        intermediate_size=40,
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        draft_vocab_size=dv,
        target_hidden_size=target_hidden,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=False,
        aux_layer_ids=aux_layer_ids,
    )
    draft = Eagle3Draft(cfg, own_embedding=own_embedding)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name == "d2t":
                hot = torch.sort(torch.randperm(vocab, generator=g)[:dv]).values
                p.copy_(hot - torch.arange(dv))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_eagle3(draft, path, torch.float32)
    return cfg
