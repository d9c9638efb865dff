"""Strict loading of EAGLE3 draft checkpoints (SGLang / vLLM / SpecForge layouts).

Accepted names (an optional leading `model.` is ignored): `fc.weight`; the decoder layer under
`midlayer.`, `midlayers.0.` or `layers.0.`; `norm.weight`; `lm_head.weight`;
`embed_tokens.weight` (optional: otherwise the target's embedding is shared); `d2t`
(draft -> target id offsets; optional only when the draft vocabulary is the target's);
`t2d` (accepted and unused, as in SGLang). q/k rows are permuted from Llama's half-split
RoPE layout to the adjacent-pair layout our rotary embedding uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from specdec.target.llama4 import Llama4ForCausalLM
from specdec.target.loader import (
    DTYPES,
    SKIP,
    FullEmbeddings,
    LoadError,
    Target,
    checkpoint_files,
    describe_units,
    fill_weights,
    pairs_per_head,
)

from .eagle3 import Eagle3Draft
from .eagle3_config import Eagle3Config

_LAYER_PREFIX = re.compile(r"(?:midlayer|midlayers\.0|layers\.0)\.(.+)")


def _name_table(cfg: Eagle3Config) -> Callable[[str], Target | None]:
    perm_q = perm_k = pairs_per_head(cfg.head_dim)
    layer: dict[str, Target] = {
        "input_layernorm.weight": Target("input_layernorm.weight"),
        "hidden_norm.weight": Target("hidden_norm.weight"),
        "post_attention_layernorm.weight": Target("post_attention_layernorm.weight"),
        "self_attn.q_proj.weight": Target("qkv.weight", 0, False, perm_q),
        "self_attn.k_proj.weight": Target("qkv.weight", 1, False, perm_k),
        "self_attn.v_proj.weight": Target("qkv.weight", 2),
        "self_attn.o_proj.weight": Target("o_proj.weight", 0),
        "mlp.gate_proj.weight": Target("mlp.gate_up.weight", 0),
        "mlp.up_proj.weight": Target("mlp.gate_up.weight", 1),
        "mlp.down_proj.weight": Target("mlp.down.weight", 0),
    }
    top: dict[str, Target] = {
        "fc.weight": Target("fc.weight", 0),
        "norm.weight": Target("norm.weight"),
        "lm_head.weight": Target("lm_head.weight", 0),
        "embed_tokens.weight": Target("embed_tokens.weight"),
        "d2t": Target("d2t"),
        "t2d": SKIP,
    }

    def lookup(name: str) -> Target | None:
        if name.startswith("model."):
            name = name[len("model."):]
        if name in top:
            return top[name]
        m = _LAYER_PREFIX.fullmatch(name)
        return layer.get(m.group(1)) if m else None

    return lookup


def _has_tensor(files: list[Path], suffix: str) -> bool:
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            if any(k == suffix or k.endswith("." + suffix) for k in fh.keys()):
                return True
    return False


def load_eagle3(path: str | Path, target: Llama4ForCausalLM | FullEmbeddings, dtype: str = "auto") -> Eagle3Draft:
    """Load an EAGLE3 head for `target`; every tensor is accounted for or LoadError names it."""
    path = Path(path)
    cfg = Eagle3Config.from_path(path)
    tcfg = target.cfg
    if cfg.target_hidden_size != tcfg.hidden_size:
        raise LoadError(
            f"draft {path} expects target hidden size {cfg.target_hidden_size}, "
            f"the target has {tcfg.hidden_size}"
        )
    if cfg.vocab_size != tcfg.vocab_size:
        raise LoadError(f"draft {path} has vocab_size {cfg.vocab_size}, the target {tcfg.vocab_size}")
    cfg.capture_layers(tcfg.num_layers)  # validates the aux layer ids against the target
    files = checkpoint_files(path)
    own_embedding = _has_tensor(files, "embed_tokens.weight")
    target_dtype = next(target.parameters()).dtype
    torch_dtype = target_dtype if dtype == "auto" else DTYPES[dtype]
    with torch.device("meta"):
        draft = Eagle3Draft(cfg, own_embedding)
    draft = draft.to(dtype=torch_dtype).to_empty(device="cpu")
    draft.requires_grad_(False)
    missing = fill_weights(draft, _name_table(cfg), files, "the EAGLE3 draft")
    same_vocab = cfg.draft_vocab_size == cfg.vocab_size
    for unit in list(missing):
        name = unit[0]
        if name == "d2t" and same_vocab:
            draft.d2t.data.zero_()  # identity map
        elif name == "lm_head.weight" and same_vocab:
            # tied draft heads use the embedding; untied full-vocab heads reuse the target's
            if cfg.tie_word_embeddings:
                src = draft.embed_tokens.weight if draft.embed_tokens is not None else target.embed_tokens.weight
            else:
                src = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
            draft.lm_head.weight.data.copy_(src)
        else:
            continue
        missing.remove(unit)
    if missing:
        raise LoadError(f"draft checkpoint {path} is missing tensors for: {describe_units(missing)}")
    if not own_embedding:
        draft.share_embedding(target.embed_tokens.weight)
    d2t = draft.d2t
    ids = torch.arange(cfg.draft_vocab_size) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise LoadError(f"draft {path}: d2t maps draft ids outside the target vocabulary")
    draft.eval()
    return draft
