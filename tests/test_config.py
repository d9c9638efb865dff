"""`ModelConfig` parsing agrees with the defaults transformers derives, and refuses what we cannot
run with a clear `ConfigError`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Llama4Config, Llama4TextConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

from specdec.target.config import CheckpointLayout, ConfigError, ModelConfig, RopeConfig

from .tiny_models import TINY_VISION

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Minimal Llama4TextConfig kwargs; transformers derives the rest.
LLAMA4_TEXT_KWARGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "small": {"num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 8},
    "no_rope_interval_3": {"num_hidden_layers": 7, "no_rope_layer_interval": 3},
    "no_rope_interval_1": {"num_hidden_layers": 3, "no_rope_layer_interval": 1},
    "interleave_moe_2": {"num_hidden_layers": 6, "interleave_moe_layer_step": 2},
    "interleave_moe_3": {"num_hidden_layers": 7, "interleave_moe_layer_step": 3},
    "explicit_moe_layers": {
        "num_hidden_layers": 5,
        "moe_layers": [0, 3],
        "interleave_moe_layer_step": 2,  # ignored when moe_layers is given
    },
    "no_moe": {"num_hidden_layers": 3, "moe_layers": []},
    "empty_no_rope_layers": {"num_hidden_layers": 4, "no_rope_layers": []},
    "explicit_no_rope_layers": {"num_hidden_layers": 4, "no_rope_layers": [1, 0, 0, 1]},
    "head_dim_none": {"hidden_size": 96, "num_attention_heads": 8, "head_dim": None},
    "kv_heads_none": {"num_attention_heads": 8, "num_key_value_heads": None},
    "chunk_none": {"attention_chunk_size": None},
    "chunk_small": {"attention_chunk_size": 16, "num_hidden_layers": 4},
    "features_off": {
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "floor_scale": 2,
        "attn_scale": 0.5,
    },
    "top2_tied_bias": {
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
        "tie_word_embeddings": True,
        "attention_bias": True,
    },
    "tokens": {"bos_token_id": 5, "eos_token_id": [7, 9], "pad_token_id": 3},
    "rope_theta_new": {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}},
    "llama3_new": {"rope_parameters": LLAMA3_ROPE},
    "llama3_old": {
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    },
    "linear_old": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "eps_positions": {"rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "vocab_size": 1000},
}


def hf_text_config(kw: dict[str, Any]) -> Llama4TextConfig:
    """`Llama4TextConfig(**kw)`. transformers 5's strict validation rejects an explicit None for
    head_dim / num_key_value_heads although its `__post_init__` derives them from None (as
    config.json files written by older versions may hold), so those go in past the validator."""
    nones = [k for k in ("head_dim", "num_key_value_heads") if k in kw and kw[k] is None]
    hf = Llama4TextConfig(**{k: v for k, v in kw.items() if k not in nones})
    if nones:
        for k in nones:
            object.__setattr__(hf, k, None)
        hf.__post_init__()
    return hf


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path


def assert_text_matches(ours: ModelConfig, hf: Llama4TextConfig) -> None:
    assert ours.vocab_size == hf.vocab_size
    assert ours.hidden_size == hf.hidden_size
    assert ours.num_layers == hf.num_hidden_layers
    assert ours.num_heads == hf.num_attention_heads
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == hf.head_dim
    assert ours.intermediate_size == hf.intermediate_size
    assert ours.intermediate_size_mlp == hf.intermediate_size_mlp
    assert ours.num_experts == hf.num_local_experts
    assert ours.num_experts_per_tok == hf.num_experts_per_tok
    assert ours.moe_layers == tuple(hf.moe_layers)
    assert ours.rope_layers == tuple(bool(x) for x in hf.no_rope_layers)
    assert ours.attention_chunk_size == hf.attention_chunk_size
    assert ours.use_qk_norm == hf.use_qk_norm
    assert ours.attn_temperature_tuning == hf.attn_temperature_tuning
    assert ours.floor_scale == hf.floor_scale
    assert ours.attn_scale == hf.attn_scale
    assert ours.rope.theta == hf.rope_parameters["rope_theta"]
    assert ours.rope.rope_type == hf.rope_parameters["rope_type"]
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.attention_bias == hf.attention_bias
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.bos_token_id == hf.bos_token_id
    eos = hf.eos_token_id
    assert ours.eos_token_ids == (() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,))
    assert ours.pad_token_id == hf.pad_token_id
    # per-layer facts as transformers' modeling code applies them
    for i in range(hf.num_hidden_layers):
        use_rope = bool(hf.no_rope_layers[i])
        assert ours.is_moe_layer(i) == (i in hf.moe_layers)
        assert ours.qk_norm(i) == (hf.use_qk_norm and use_rope)
        assert ours.temperature_tuning(i) == (hf.attn_temperature_tuning and not use_rope)
        chunked = hf.layer_types[i] == "chunked_attention" and hf.attention_chunk_size is not None
        assert (ours.chunk_size(i) is not None) == chunked
    # the rotary frequencies transformers' Llama 4 model builds from this config
    hf_inv = Llama4TextRotaryEmbedding(hf).inv_freq
    assert torch.allclose(torch.tensor(ours.rope.inv_freq(ours.head_dim)), hf_inv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(LLAMA4_TEXT_KWARGS))
def test_llama4_text_matches_transformers(tmp_path: Path, name: str) -> None:
    kw = LLAMA4_TEXT_KWARGS[name]
    hf = hf_text_config(kw)
    if name == "head_dim_none":
        assert hf.head_dim == 96 // 8
    if name == "kv_heads_none":
        assert hf.num_key_value_heads == 8
    # 1. transformers' own serialisation (every derived field written out)
    full = ModelConfig.from_path(_write(tmp_path / "full", hf.to_dict()))
    assert full.layout is CheckpointLayout.LLAMA4_CAUSAL
    assert full.architecture == "Llama4ForCausalLM"
    assert_text_matches(full, hf)
    # 2. the minimal hand-written file: only the kwargs, defaults derived by us
    minimal = ModelConfig.from_path(_write(tmp_path / "min", {"model_type": "llama4_text", **kw}))
    assert_text_matches(minimal, hf)
    # 3. with an explicit architectures entry
    arch = ModelConfig.from_hf_dict({"architectures": ["Llama4ForCausalLM"], **kw})
    assert arch == minimal


@pytest.mark.parametrize("name", ["defaults", "interleave_moe_2", "chunk_none", "llama3_old"])
def test_llama4_conditional_matches_transformers(tmp_path: Path, name: str) -> None:
    kw = LLAMA4_TEXT_KWARGS[name]
    hf = Llama4Config(text_config=dict(kw), vision_config=dict(TINY_VISION))
    raw = hf.to_dict()
    raw["architectures"] = ["Llama4ForConditionalGeneration"]
    ours = ModelConfig.from_path(_write(tmp_path / "full", raw))
    assert ours.layout is CheckpointLayout.LLAMA4_CONDITIONAL
    assert ours.architecture == "Llama4ForConditionalGeneration"
    assert_text_matches(ours, hf.text_config)
    # minimal: model_type only, text_config holding just the kwargs
    minimal = ModelConfig.from_hf_dict({"model_type": "llama4", "text_config": dict(kw)})
    assert minimal.layout is CheckpointLayout.LLAMA4_CONDITIONAL
    assert_text_matches(minimal, hf.text_config)


def test_conditional_tie_word_embeddings_comes_from_text_config() -> None:
    """transformers ties the language model's head from `text_config.tie_word_embeddings`."""
    raw = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {"tie_word_embeddings": True},
    }
    assert ModelConfig.from_hf_dict(raw).tie_word_embeddings is True


def test_conditional_tie_defaults_like_transformers() -> None:
    raw = {"architectures": ["Llama4ForConditionalGeneration"], "tie_word_embeddings": True,
           "text_config": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "head_dim": 8}}
    hf = Llama4Config.from_dict(dict(raw))
    assert ModelConfig.from_hf_dict(raw).tie_word_embeddings == hf.text_config.tie_word_embeddings


# ---- dense Llama ------------------------------------------------------------------------------

LLAMA_KWARGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "smollm_like": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    "head_dim_explicit": {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32},
    "llama3_new": {"rope_parameters": LLAMA3_ROPE},
    "llama3_old": {
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    },
}


@pytest.mark.parametrize("name", list(LLAMA_KWARGS))
def test_dense_llama_matches_transformers(tmp_path: Path, name: str) -> None:
    kw = LLAMA_KWARGS[name]
    hf = LlamaConfig(**kw)
    raw = hf.to_dict()
    raw["architectures"] = ["LlamaForCausalLM"]
    for ours in (
        ModelConfig.from_path(_write(tmp_path, raw)),
        ModelConfig.from_hf_dict({"model_type": "llama", **hf.to_diff_dict()}),
    ):
        assert ours.layout is CheckpointLayout.LLAMA and ours.permute_qk
        assert ours.vocab_size == hf.vocab_size
        assert ours.hidden_size == hf.hidden_size
        assert ours.num_layers == hf.num_hidden_layers
        assert ours.num_heads == hf.num_attention_heads
        assert ours.num_kv_heads == hf.num_key_value_heads
        assert ours.head_dim == hf.head_dim
        assert ours.intermediate_size == ours.intermediate_size_mlp == hf.intermediate_size
        assert ours.rms_norm_eps == hf.rms_norm_eps
        assert ours.tie_word_embeddings == hf.tie_word_embeddings
        assert ours.max_position_embeddings == hf.max_position_embeddings
        assert ours.rope.theta == hf.rope_parameters["rope_theta"]
        assert ours.rope.rope_type == hf.rope_parameters["rope_type"]
        # a dense Llama has none of the Llama 4 quirks
        assert ours.moe_layers == () and ours.num_experts == 0
        assert ours.rope_layers == (True,) * hf.num_hidden_layers
        assert ours.attention_chunk_size is None
        assert not ours.use_qk_norm and not ours.attn_temperature_tuning
        for i in range(ours.num_layers):
            assert not ours.is_moe_layer(i) and ours.uses_rope(i)
            assert ours.chunk_size(i) is None
            assert not ours.qk_norm(i) and not ours.temperature_tuning(i)
        hf_inv = LlamaRotaryEmbedding(hf).inv_freq
        ours_inv = torch.tensor(ours.rope.inv_freq(ours.head_dim))
        assert torch.allclose(ours_inv, hf_inv, atol=1e-6, rtol=0)


# ---- rope ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("theta", "head_dim", "factor", "low", "high", "old_len"),
    [
        (500000.0, 128, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 / Llama 4
        (500000.0, 64, 32.0, 1.0, 4.0, 8192),  # Llama 3.2
        (500000.0, 8, 8.0, 1.0, 4.0, 256),  # tiny: one frequency in the smooth band
        (10000.0, 32, 4.0, 2.0, 8.0, 64),
    ],
)
@pytest.mark.parametrize("layout", ["new", "old"])
def test_llama3_inv_freq_matches_transformers(
    theta: float, head_dim: int, factor: float, low: float, high: float, old_len: int, layout: str
) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_len,
    }
    hf = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_factor == 1.0
    if layout == "new":
        raw = {"model_type": "llama", **hf.to_diff_dict()}
    else:
        raw = {"model_type": "llama", "hidden_size": head_dim * 4, "num_attention_heads": 4,
               "head_dim": head_dim, "num_hidden_layers": 1, "vocab_size": 16,
               "intermediate_size": 8, "rope_theta": theta,
               "rope_scaling": {**scaling, "type": "llama3"}}
        del raw["rope_scaling"]["rope_type"]
    rope = ModelConfig.from_hf_dict(raw).rope
    assert rope == RopeConfig(theta, "llama3", factor, low, high, old_len)
    ours = torch.tensor(rope.inv_freq(head_dim), dtype=torch.float64)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref.double(), atol=1e-6, rtol=0)
    # all three regimes are exercised by at least the tiny case
    if head_dim == 8:
        base = torch.tensor(RopeConfig(theta).inv_freq(head_dim), dtype=torch.float64)
        ratio = (ours / base).tolist()
        assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / factor)
        assert 1 / factor < ratio[1] < 1.0


def test_linear_inv_freq_matches_transformers() -> None:
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4,
                     rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf, "cpu")
    rope = ModelConfig.from_hf_dict({"model_type": "llama", **hf.to_diff_dict()}).rope
    assert rope.rope_type == "linear" and rope.factor == 4.0
    assert torch.allclose(torch.tensor(rope.inv_freq(16), dtype=torch.float64), ref.double(),
                          atol=1e-6, rtol=0)


# ---- errors -----------------------------------------------------------------------------------


def test_unknown_architecture() -> None:
    with pytest.raises(ConfigError, match=r"unsupported architecture.*MistralForCausalLM") as e:
        ModelConfig.from_hf_dict({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert "LlamaForCausalLM" in str(e.value)  # the message lists what is supported
    with pytest.raises(ConfigError, match=r"unsupported architecture.*gpt2"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({})


@pytest.mark.parametrize(
    "raw",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
        {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    ],
)
def test_unknown_rope_type(raw: dict[str, Any]) -> None:
    rope_type = (raw.get("rope_parameters") or raw["rope_scaling"]).get("rope_type", "dynamic")
    llama = {k: v for k, v in LlamaConfig().to_diff_dict().items() if k != "rope_parameters"}
    for base in ({"model_type": "llama4_text"}, {"model_type": "llama", **llama}):
        with pytest.raises(ConfigError, match=rf"unsupported rope type '{rope_type}'"):
            ModelConfig.from_hf_dict({**base, **raw})


def test_incomplete_rope_scaling() -> None:
    with pytest.raises(ConfigError, match=r"llama3.*original_max_position_embeddings"):
        ModelConfig.from_hf_dict({
            "model_type": "llama4_text",
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0},
        })
    with pytest.raises(ConfigError, match="factor"):
        ModelConfig.from_hf_dict({"model_type": "llama4_text",
                                  "rope_parameters": {"rope_type": "linear"}})


def test_bad_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama4_text",')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        ModelConfig.from_path(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig.from_path(tmp_path)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"model_type": "llama4_text", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "llama4_text", "num_attention_heads": 6, "num_key_value_heads": 4},
         "not a multiple"),
        ({"model_type": "llama4_text", "num_hidden_layers": 3, "no_rope_layers": [1, 1]},
         "no_rope_layers has 2 entries for 3 layers"),
        ({"model_type": "llama4_text", "num_hidden_layers": 2, "moe_layers": [2]}, "moe_layers"),
        ({"model_type": "llama4_text", "num_local_experts": 2, "num_experts_per_tok": 3},
         "num_experts_per_tok"),
        ({"model_type": "llama4_text", "head_dim": 7}, "head_dim=7"),
        ({"model_type": "llama4", "text_config": None}, "no text_config"),
        ({"model_type": "llama", **LlamaConfig(mlp_bias=True).to_diff_dict()}, "mlp_bias"),
    ],
)
def test_refused_configs(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(raw)
