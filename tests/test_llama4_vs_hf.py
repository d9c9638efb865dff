"""Our Llama 4 (and dense Llama) against transformers on tiny random checkpoints, fp32.

Each case switches on one Llama 4 feature (then all of them together). Our engine decodes a batch
of mixed-length prompts greedily through the paged KV cache; transformers then runs one full
forward over prompt + generated tokens, which must agree token by token and logprob by logprob.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from .tiny_models import Checkpoint, compare_with_hf, hf_logprobs, make_checkpoint, random_prompts

TOL = 1e-4  # max |logprob difference| against transformers, fp32
NEW_TOKENS = 16
PROMPT_LENGTHS = (1, 5, 13)

LLAMA3_ROPE = {
    # theta 5e5, head_dim 8: wavelengths 6.3, 167, 4.4e3, 1.2e5 -> one kept, one in the smooth
    # band (64 < 167 < 256), two divided by `factor`
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

ALL_FEATURES: dict[str, Any] = {
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "moe_layers": None,
    "interleave_moe_layer_step": 2,  # MoE on layers 1, 3
    "intermediate_size_mlp": 40,
    "num_experts_per_tok": 2,
    "attention_chunk_size": 4,
    "no_rope_layers": None,
    "no_rope_layer_interval": 3,  # NoPE on layer 2
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 2,
    "attn_scale": 0.5,
    "rope_parameters": LLAMA3_ROPE,
    "tie_word_embeddings": True,
}

# name -> (builder kind, overrides)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "a_plain_dense": ("llama4", {}),
    "b_moe_every_layer": ("llama4", {"moe_layers": None, "interleave_moe_layer_step": 1}),
    "b_moe_top2": ("llama4", {"moe_layers": None, "num_experts_per_tok": 2}),
    "c_interleaved_moe": (
        "llama4",
        {
            "num_hidden_layers": 4,
            "moe_layers": None,
            "interleave_moe_layer_step": 2,
            "intermediate_size_mlp": 40,
        },
    ),
    "d_chunked_attention": ("llama4", {"attention_chunk_size": 4}),
    "e_nope_temperature_tuning": (
        "llama4",
        {
            "num_hidden_layers": 4,
            "no_rope_layers": None,
            "no_rope_layer_interval": 2,  # NoPE on layers 1, 3
            "attn_temperature_tuning": True,
            "floor_scale": 2,
            "attn_scale": 0.5,
        },
    ),
    "f_qk_norm": ("llama4", {"use_qk_norm": True}),
    "g_llama3_rope": ("llama4", {"rope_parameters": LLAMA3_ROPE}),
    "h_gqa_ratio_1": ("llama4", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "h_gqa_ratio_4": ("llama4", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "i_tied_embeddings": ("llama4", {"tie_word_embeddings": True}),
    "j_all_features": ("llama4", ALL_FEATURES),
    "k_conditional_generation": ("llama4_conditional", {}),
    "k_conditional_all_features": ("llama4_conditional", ALL_FEATURES),
    "m_attention_bias": ("llama4", {"attention_bias": True, "use_qk_norm": True}),
    "l_dense_llama": ("llama", {}),
    "l_dense_llama_bias_head_dim_16": ("llama", {"attention_bias": True, "head_dim": 16}),
    "l_dense_llama_tied_llama3_gqa1": (
        "llama",
        {"num_key_value_heads": 4, "rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True},
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("llama4_vs_hf")
    return {
        name: make_checkpoint(root / name, kind, seed=i, **overrides)
        for i, (name, (kind, overrides)) in enumerate(CASES.items())
    }


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(checkpoints: dict[str, Checkpoint], case: str) -> None:
    ckpt = checkpoints[case]
    engine = ckpt.engine(page_size=16)
    prompts = random_prompts(PROMPT_LENGTHS, seed=len(case))
    compare_with_hf(engine, ckpt.hf, prompts, NEW_TOKENS, TOL)


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize(
    "case", ["d_chunked_attention", "j_all_features", "k_conditional_all_features", "l_dense_llama"]
)
def test_paged_decode_equals_full_forward(
    checkpoints: dict[str, Checkpoint], case: str, page_size: int
) -> None:
    """Page sizes that divide, equal one token, and do not divide the chunk size (4)."""
    ckpt = checkpoints[case]
    engine = ckpt.engine(page_size=page_size, max_total_tokens=400)
    prompts = random_prompts((3, 9, 14, 4), seed=7)
    compare_with_hf(engine, ckpt.hf, prompts, 18, TOL)
    # every page is back in the pool once the batch finished
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_chunked_prompts_cross_chunk_boundaries(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["d_chunked_attention"]
    assert ckpt.hf.config.attention_chunk_size == 4
    engine = ckpt.engine(page_size=5)
    # prompt ends exactly on, just before and just after a chunk boundary; decode spans 4 chunks
    prompts = random_prompts((4, 7, 9, 12), seed=3)
    compare_with_hf(engine, ckpt.hf, prompts, 16, TOL)


@pytest.mark.parametrize("chunk", [3, 5])
def test_chunked_prefill_matches_transformers(checkpoints: dict[str, Checkpoint], chunk: int) -> None:
    """Prompts fed 3 or 5 tokens per forward (cutting them anywhere, across the attention chunks
    of 4 too): the greedy tokens are transformers' argmax and their logprobs agree within TOL."""
    ckpt = checkpoints["d_chunked_attention"]
    engine = ckpt.engine(page_size=5, chunked_prefill_size=chunk)
    prompts = random_prompts((13, 9, 22), seed=5)
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 10},
                           return_logprob=True)
    for prompt, out in zip(prompts, outs, strict=True):
        gen = out["output_ids"]
        lp = hf_logprobs(ckpt.hf, prompt + gen)[len(prompt) - 1 : len(prompt) - 1 + len(gen)]
        chosen = lp.gather(1, torch.tensor(gen)[:, None])[:, 0]
        assert float((lp.max(-1).values - chosen).max()) < TOL  # argmax (or a genuine tie)
        ours = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        assert float((ours - chosen).abs().max()) < TOL
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_temperature_tuning_scales_differ_from_one(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["e_nope_temperature_tuning"]
    engine = ckpt.engine()
    cfg = engine.model_config
    assert cfg.rope_layers == (True, False, True, False)
    assert cfg.temperature_tuning(1) and not cfg.temperature_tuning(0)
    positions = torch.arange(20).float()
    scales = 1 + cfg.attn_scale * torch.log1p(torch.floor((positions + 1) / cfg.floor_scale))
    assert len(set(scales.tolist())) > 5  # the test prompts really see several scales


@pytest.mark.parametrize("case", ["b_moe_every_layer", "b_moe_top2", "j_all_features"])
def test_routing_is_not_trivial(checkpoints: dict[str, Checkpoint], case: str) -> None:
    """The MoE cases only test something if different tokens go to different experts."""
    ckpt = checkpoints[case]
    engine = ckpt.engine()
    chosen: dict[int, set[int]] = {}
    hooks = []
    for i in engine.model_config.moe_layers:
        router = engine.model.layers[i].feed_forward.router

        def hook(_m: Any, _inp: Any, out: torch.Tensor, i: int = i) -> None:
            k = engine.model_config.num_experts_per_tok
            chosen.setdefault(i, set()).update(out.topk(k, dim=-1).indices.flatten().tolist())

        hooks.append(router.register_forward_hook(hook))
    try:
        compare_with_hf(engine, ckpt.hf, random_prompts((6, 11), seed=5), 8, TOL)
    finally:
        for h in hooks:
            h.remove()
    assert chosen and set(chosen) == set(engine.model_config.moe_layers)
    for layer, experts in chosen.items():
        assert len(experts) >= 3, f"layer {layer} only routed to experts {experts}"


def test_batched_equals_one_by_one(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["j_all_features"]
    engine = ckpt.engine(page_size=5)
    prompts = random_prompts((2, 10, 6), seed=11)
    params = {"temperature": 0, "max_new_tokens": 10}
    batched = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    alone = [engine.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
    assert batched == alone


def test_conditional_layout_skips_vision_tensors(
    checkpoints: dict[str, Checkpoint], caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = checkpoints["k_conditional_all_features"]
    with safe_open(str(Path(ckpt.path) / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert vision, "the tiny conditional checkpoint should carry vision tensors"
    assert all(
        k.startswith(("language_model.", "vision_model.", "multi_modal_projector.")) for k in keys
    )
    with caplog.at_level(logging.INFO, logger="specdec.target.loader"):
        engine = ckpt.engine()
    assert engine.model_config.layout.value == "llama4_conditional"
    assert f"skipped {len(vision)} vision/projector tensors" in caplog.text
    names = [n for n, _ in engine.model.named_parameters()]
    assert not any("vision" in n or "projector" in n for n in names)
