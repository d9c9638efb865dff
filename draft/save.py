"""Write an EAGLE3 head in the checkpoint format SGLang and vLLM load.

config.json: `architectures: ["LlamaForCausalLMEagle3"]`, Llama fields, `draft_vocab_size`,
`target_hidden_size`, `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang's ids: outputs
of those target layers). model.safetensors: `fc.weight`, `midlayer.*` (q/k rows back in
Llama's half-split RoPE layout), `norm.weight`, `lm_head.weight`, `d2t` (int64 offsets,
target = draft + d2t[draft]) and `t2d` (bool mask over the target vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .eagle3 import Eagle3Draft


def pairs_to_half_split(t: Tensor, num_heads: int) -> Tensor:
    """Inverse of the loader's half-split -> adjacent-pairs row permutation."""
    d = t.shape[0] // num_heads
    return t.reshape(num_heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def eagle3_config_dict(draft: Eagle3Draft, dtype: torch.dtype) -> dict[str, object]:
    c = draft.cfg
    rope: dict[str, object] = {"rope_type": c.rope.rope_type, "rope_theta": c.rope.theta}
    if c.rope.rope_type != "default":
        rope.update(factor=c.rope.factor, low_freq_factor=c.rope.low_freq_factor,
                    high_freq_factor=c.rope.high_freq_factor,
                    original_max_position_embeddings=c.rope.original_max_position_embeddings)
    out: dict[str, object] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "tie_word_embeddings": False,
        "rope_theta": c.rope.theta,
        "rope_scaling": None if c.rope.rope_type == "default" else rope,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if c.aux_layer_ids is not None:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids)}
    return out


def save_eagle3(draft: Eagle3Draft, path: str | Path, dtype: torch.dtype | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = draft.cfg
    dtype = dtype or draft.fc.weight.dtype
    q, k, v = draft.qkv.weight.detach().split((draft.q_size, draft.kv_size, draft.kv_size))
    gate, up = draft.mlp.gate_up.weight.detach().split(c.intermediate_size)
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[draft.to_target_ids(torch.arange(c.draft_vocab_size))] = True
    tensors: dict[str, Tensor] = {
        "fc.weight": draft.fc.weight,
        "midlayer.input_layernorm.weight": draft.input_layernorm.weight,
        "midlayer.hidden_norm.weight": draft.hidden_norm.weight,
        "midlayer.self_attn.q_proj.weight": pairs_to_half_split(q, c.num_heads),
        "midlayer.self_attn.k_proj.weight": pairs_to_half_split(k, c.num_kv_heads),
        "midlayer.self_attn.v_proj.weight": v,
        "midlayer.self_attn.o_proj.weight": draft.o_proj.weight,
        "midlayer.post_attention_layernorm.weight": draft.post_attention_layernorm.weight,
        "midlayer.mlp.gate_proj.weight": gate,
        "midlayer.mlp.up_proj.weight": up,
        "midlayer.mlp.down_proj.weight": draft.mlp.down.weight,
        "norm.weight": draft.norm.weight,
        "lm_head.weight": draft.lm_head.weight,
    }
    if draft.embed_tokens is not None:
        tensors["embed_tokens.weight"] = draft.embed_tokens.weight
    out = {k: t.detach().to(dtype).contiguous() for k, t in tensors.items()}
    out["d2t"] = draft.d2t.detach().to(torch.int64).contiguous()
    out["t2d"] = t2d
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(eagle3_config_dict(draft, dtype), indent=2) + "\n")
