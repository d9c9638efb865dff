"""EAGLE3 draft-head configuration, parsed from the checkpoint format SGLang and vLLM load.

Accepted: `architectures: ["LlamaForCausalLMEagle3"]` (also `Eagle3LlamaForCausalLM`), or a
`LlamaForCausalLM` config carrying `draft_vocab_size` (how EAGLE3 heads are often saved).

Aux hidden-state layers (`eagle_config.eagle_aux_hidden_state_layer_ids`): SGLang's
convention is that id `i` means *the output of target layer i*, which is the input of layer
`i + 1`. Without the field, SGLang captures the inputs of layers `[2, L // 2, L - 3]`
(i.e. the outputs of layers 1, L//2 - 1 and L - 4). `capture_layers` returns the
layer-input indices our target model captures (`ForwardBatch.capture_layers`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdec.target.config import ConfigError, RopeConfig, _parse_rope

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclass(frozen=True, slots=True)
class Eagle3Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of the draft's MLP (intermediate_size_mlp for llama4_text)
    rms_norm_eps: float
    vocab_size: int  # the target's vocabulary (embedding rows)
    draft_vocab_size: int  # lm_head rows; d2t maps them to target ids
    target_hidden_size: int
    rope: RopeConfig
    tie_word_embeddings: bool
    aux_layer_ids: tuple[int, ...] | None  # SGLang's ids (outputs of these layers), if given

    def capture_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """Target layer *inputs* to capture, in the order `fc` concatenates them."""
        ids: tuple[int, ...]
        if self.aux_layer_ids is None:
            ids = (2, num_target_layers // 2, num_target_layers - 3)
        else:
            ids = tuple(i + 1 for i in self.aux_layer_ids)
        bad = [i for i in ids if not 0 < i <= num_target_layers]
        if bad:
            raise ConfigError(
                f"EAGLE3 aux hidden-state layers {ids} fall outside a {num_target_layers}-layer target"
            )
        return ids

    @classmethod
    def from_path(cls, path: str | Path) -> Eagle3Config:
        cfg_file = Path(path) / "config.json"
        try:
            raw = json.loads(cfg_file.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json in draft model path {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> Eagle3Config:
        archs = list(raw.get("architectures") or [])
        is_eagle3 = any(a in EAGLE3_ARCHITECTURES for a in archs)
        if not is_eagle3 and not ("LlamaForCausalLM" in archs and "draft_vocab_size" in raw):
            raise ConfigError(
                f"not an EAGLE3 draft config (architectures={archs}); expected "
                "LlamaForCausalLMEagle3, or LlamaForCausalLM with draft_vocab_size"
            )
        if int(raw.get("num_hidden_layers", 1)) != 1:
            raise ConfigError("only single-layer EAGLE3 heads are supported (num_hidden_layers=1)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {raw.get('hidden_act')!r} in draft config")
        hidden = int(raw["hidden_size"])
        n_heads = int(raw["num_attention_heads"])
        n_kv = int(raw.get("num_key_value_heads") or n_heads)
        head_dim = raw.get("head_dim")
        inter = raw.get("intermediate_size_mlp") if raw.get("model_type") == "llama4_text" else None
        inter = raw["intermediate_size"] if inter is None else inter
        vocab = int(raw["vocab_size"])
        draft_vocab = raw.get("draft_vocab_size")
        eagle = raw.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids")
        if aux is not None and len(aux) != 3:
            raise ConfigError(f"eagle_aux_hidden_state_layer_ids must list 3 layers, got {aux}")
        return cls(
            hidden_size=hidden,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=hidden // n_heads if head_dim is None else int(head_dim),
            intermediate_size=int(inter),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            vocab_size=vocab,
            draft_vocab_size=vocab if draft_vocab is None else int(draft_vocab),
            target_hidden_size=int(raw.get("target_hidden_size") or hidden),
            rope=_parse_rope(raw, default_theta=10000.0),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            aux_layer_ids=None if aux is None else tuple(int(i) for i in aux),
        )
