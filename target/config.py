"""Model configuration: one frozen dataclass for Llama 4 text and dense Llama.

`ModelConfig.from_hf_dict` parses a checkpoint's `config.json` for

* `Llama4ForConditionalGeneration` (model_type `llama4`: the text model sits in `text_config`),
* `Llama4ForCausalLM` (model_type `llama4_text`),
* `LlamaForCausalLM` (model_type `llama`): a dense Llama maps onto the same fields with every
  layer using RoPE, no MoE, no QK norm, no chunked attention and no temperature tuning.

Derived defaults follow `transformers.Llama4TextConfig` (tested against it). Anything the
engine cannot run exactly (unknown architecture, rope type, activation, ...) raises
`ConfigError` naming the field instead of being silently approximated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint configuration the engine refuses to run."""


class CheckpointLayout(str, Enum):
    """How tensor names are laid out in the checkpoint (drives the loader's name table)."""

    LLAMA4_CONDITIONAL = "llama4_conditional"  # language_model.model.layers.N...
    LLAMA4_CAUSAL = "llama4_causal"  # model.layers.N... with feed_forward.*
    LLAMA = "llama"  # model.layers.N... with mlp.*, q/k in the half-split RoPE layout


SUPPORTED_ARCHITECTURES: dict[str, CheckpointLayout] = {
    "Llama4ForConditionalGeneration": CheckpointLayout.LLAMA4_CONDITIONAL,
    "Llama4ForCausalLM": CheckpointLayout.LLAMA4_CAUSAL,
    "LlamaForCausalLM": CheckpointLayout.LLAMA,
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_type` default | linear | llama3)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> list[float]:
        """Inverse frequencies (one per adjacent pair), as transformers computes them."""
        base = [1.0 / (self.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        if self.rope_type == "default":
            return base
        if self.rope_type == "linear":
            return [f / self.factor for f in base]
        # llama3: long wavelengths divided by `factor`, short kept, smooth in between.
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = (old_len / wavelen - self.low_freq_factor) / (
                    self.high_freq_factor - self.low_freq_factor
                )
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model code needs; each Llama 4 quirk is a named field."""

    architecture: str
    layout: CheckpointLayout
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # routed and shared experts
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # True = RoPE layer; False = NoPE layer (no_rope_layers == 0)
    attention_chunk_size: int | None  # chunked local attention on RoPE layers
    use_qk_norm: bool  # weightless L2 norm of q and k on RoPE layers
    attn_temperature_tuning: bool  # query scaling on NoPE layers
    floor_scale: float
    attn_scale: float
    rope: RopeConfig
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    torch_dtype: str | None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.rope_layers) != self.num_layers:
            raise ConfigError(
                f"no_rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers {bad} outside [0, {self.num_layers})")
        if self.moe_layers and self.num_experts_per_tok > self.num_experts:
            raise ConfigError("num_experts_per_tok exceeds num_local_experts")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    # ---- derived per-layer facts -------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer]

    def chunk_size(self, layer: int) -> int | None:
        """Chunked local attention applies to RoPE layers only; NoPE layers see everything."""
        return self.attention_chunk_size if self.rope_layers[layer] else None

    def qk_norm(self, layer: int) -> bool:
        return self.use_qk_norm and self.rope_layers[layer]

    def temperature_tuning(self, layer: int) -> bool:
        return self.attn_temperature_tuning and not self.rope_layers[layer]

    @property
    def permute_qk(self) -> bool:
        """A dense Llama's q/k rows are half-split per head; our RoPE rotates adjacent pairs."""
        return self.layout is CheckpointLayout.LLAMA

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Elements (not bytes) of K plus V for one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim

    # ---- parsing ------------------------------------------------------------------------
    @classmethod
    def from_path(cls, model_path: str | Path) -> ModelConfig:
        path = Path(model_path) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json in {model_path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        arch = _pick_architecture(archs, model_type)
        layout = SUPPORTED_ARCHITECTURES[arch]
        if layout is CheckpointLayout.LLAMA4_CONDITIONAL:
            text = raw.get("text_config")
            if not isinstance(text, Mapping):
                raise ConfigError("Llama4ForConditionalGeneration config has no text_config")
            return _parse_llama4_text(arch, layout, text, outer=raw)
        if layout is CheckpointLayout.LLAMA4_CAUSAL:
            return _parse_llama4_text(arch, layout, raw, outer=raw)
        return _parse_dense_llama(arch, raw)


def _pick_architecture(archs: list[str], model_type: str | None) -> str:
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    by_type = {
        "llama4": "Llama4ForConditionalGeneration",
        "llama4_text": "Llama4ForCausalLM",
        "llama": "LlamaForCausalLM",
    }
    if not archs and model_type in by_type:
        return by_type[model_type]
    raise ConfigError(
        f"unsupported architecture {archs or model_type!r}; supported: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def _parse_rope(raw: Mapping[str, Any], default_theta: float) -> RopeConfig:
    """Read `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "rope_theta" in raw:
            params["rope_theta"] = raw["rope_theta"]
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    missing = [
        k
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k not in params
    ]
    if missing:
        raise ConfigError(f"llama3 rope scaling is missing {missing}")
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _check_act(raw: Mapping[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")


def _dtype(raw: Mapping[str, Any], outer: Mapping[str, Any]) -> str | None:
    for src in (raw, outer):
        for key in ("dtype", "torch_dtype"):
            if isinstance(src.get(key), str):
                return str(src[key])
    return None


def _parse_llama4_text(
    arch: str, layout: CheckpointLayout, raw: Mapping[str, Any], outer: Mapping[str, Any]
) -> ModelConfig:
    _check_act(raw)
    n_layers = int(raw.get("num_hidden_layers", 48))
    n_heads = int(raw.get("num_attention_heads", 40))
    n_kv = raw.get("num_key_value_heads", 8)
    n_kv = n_heads if n_kv is None else int(n_kv)
    hidden = int(raw.get("hidden_size", 5120))
    head_dim = raw.get("head_dim", 128)
    head_dim = hidden // n_heads if head_dim is None else int(head_dim)
    interval = int(raw.get("no_rope_layer_interval", 4))
    # transformers: a missing *or empty* no_rope_layers falls back to every `interval`-th NoPE.
    no_rope = raw.get("no_rope_layers") or [
        int((i + 1) % interval != 0) for i in range(n_layers)
    ]
    step = int(raw.get("interleave_moe_layer_step", 1))
    moe_layers = raw.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step))
    top_k = int(raw.get("num_experts_per_tok", 1))
    chunk = raw.get("attention_chunk_size", 8192)
    # the text config's own field (transformers' default False), never the outer config's
    tie = raw.get("tie_word_embeddings", False)
    return ModelConfig(
        architecture=arch,
        layout=layout,
        vocab_size=int(raw.get("vocab_size", 202048)),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=int(raw.get("intermediate_size", 8192)),
        intermediate_size_mlp=int(raw.get("intermediate_size_mlp", 16384)),
        num_experts=int(raw.get("num_local_experts", 16)),
        num_experts_per_tok=top_k,
        moe_layers=tuple(int(i) for i in moe_layers),
        rope_layers=tuple(bool(int(v)) for v in no_rope),
        attention_chunk_size=None if chunk is None else int(chunk),
        use_qk_norm=bool(raw.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(raw.get("attn_temperature_tuning", True)),
        floor_scale=float(raw.get("floor_scale", 8192)),
        attn_scale=float(raw.get("attn_scale", 0.1)),
        rope=_parse_rope(raw, default_theta=500000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(tie),
        attention_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096 * 32)),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_ids=_eos_ids(raw.get("eos_token_id", 2)),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=_dtype(raw, outer),
    )


def _parse_dense_llama(arch: str, raw: Mapping[str, Any]) -> ModelConfig:
    _check_act(raw)
    if raw.get("mlp_bias", False):
        raise ConfigError("mlp_bias=True is not supported")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError("pretraining_tp != 1 is not supported")
    n_layers = int(raw["num_hidden_layers"])
    n_heads = int(raw["num_attention_heads"])
    n_kv = raw.get("num_key_value_heads")
    n_kv = n_heads if n_kv is None else int(n_kv)
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim")
    head_dim = hidden // n_heads if head_dim is None else int(head_dim)
    inter = int(raw["intermediate_size"])
    return ModelConfig(
        architecture=arch,
        layout=CheckpointLayout.LLAMA,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        intermediate_size_mlp=inter,
        num_experts=0,
        num_experts_per_tok=0,
        moe_layers=(),
        rope_layers=(True,) * n_layers,
        attention_chunk_size=None,
        use_qk_norm=False,
        attn_temperature_tuning=False,
        floor_scale=8192.0,
        attn_scale=0.1,
        rope=_parse_rope(raw, default_theta=10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=_dtype(raw, raw),
    )
