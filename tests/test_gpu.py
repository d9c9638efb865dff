"""The CUDA path, on a machine with a GPU (`bench/gpu_check.sh` runs these; skipped elsewhere):
each attention backend against the torch reference on the GPU, the engine against transformers,
EAGLE3 lossless, the Triton MoE kernel in the model, images, seeded sampling reproducible.

Tiny random Llama 4 checkpoints with every text quirk on (top-1 MoE on alternate layers,
chunked attention with a chunk of 8, a NoPE layer, QK norm, temperature tuning)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from .spec_models import make_random_eagle3
from .test_multimodal import SIZES, check_against_hf, picture
from .tiny_models import (
    VOCAB,
    Checkpoint,
    compare_with_hf,
    make_checkpoint,
    make_multimodal_checkpoint,
    random_prompts,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

FEATURES: dict[str, Any] = {
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "moe_layers": [1, 3],
    "num_experts_per_tok": 1, "attention_chunk_size": 8, "no_rope_layers": [1, 1, 0, 1], "use_qk_norm": True,
    "attn_temperature_tuning": True, "floor_scale": 8, "intermediate_size_mlp": 40,
}
BACKENDS = ["torch", "triton", "flashinfer"]
PROMPTS = random_prompts((5, 19, 33), seed=11)  # crossing several chunks


def needs(backend: str) -> None:
    if backend == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer-python is not installed (pip install -e '.[gpu]')")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("gpu_target"), "llama4", seed=5, **FEATURES)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpu_head")
    make_random_eagle3(path, target_hidden=32, vocab=VOCAB, aux_layer_ids=(0, 1, 2))
    return path


def prompt_logprobs(engine: Any) -> torch.Tensor:
    outs = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 1},
                           return_logprob=True, logprob_start_len=0)
    return torch.tensor([e[0] for o in outs for e in o["meta_info"]["input_token_logprobs"][1:]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_on_the_gpu_matches_transformers(ckpt: Checkpoint, backend: str) -> None:
    engine = ckpt.engine(device="cuda", attention_backend=backend, page_size=4)
    assert engine.runner.backend.name == backend and engine.device.type == "cuda"
    assert sum(getattr(layer.feed_forward, "kernel", "") == "triton" for layer in engine.model.layers) == 2
    compare_with_hf(engine, ckpt.hf, PROMPTS, max_new_tokens=12, tol=2e-3)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_gives_the_torch_backend_s_logprobs(ckpt: Checkpoint, backend: str) -> None:
    """bfloat16 (what FlashInfer takes), teacher-forced: every prompt position's logprob."""
    needs(backend)
    ref = prompt_logprobs(ckpt.engine(device="cuda", attention_backend="torch", dtype="bfloat16"))
    got = prompt_logprobs(ckpt.engine(device="cuda", attention_backend=backend, dtype="bfloat16"))
    assert float((got - ref).abs().max()) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_eagle3_on_the_gpu_is_lossless(ckpt: Checkpoint, head: Path, backend: str) -> None:
    needs(backend)
    dtype = "bfloat16" if backend == "flashinfer" else "float32"
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    plain = ckpt.engine(device="cuda", attention_backend=backend, dtype=dtype)
    spec = ckpt.engine(device="cuda", attention_backend=backend, dtype=dtype, speculative_algorithm="EAGLE3",
                       speculative_draft_model_path=str(head), speculative_num_steps=3, speculative_eagle_topk=2,
                       speculative_num_draft_tokens=6)
    want = [o["output_ids"] for o in plain.generate(input_ids=PROMPTS, sampling_params=params)]
    outs = spec.generate(input_ids=PROMPTS, sampling_params=params)
    assert [o["output_ids"] for o in outs] == want
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)


def test_seeded_sampling_on_the_gpu_is_reproducible(ckpt: Checkpoint, head: Path) -> None:
    params = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 16, "ignore_eos": True}
    engine = ckpt.engine(device="cuda", speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head))
    first = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=params)]
    again = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=params)]
    assert first == again


def test_images_on_the_gpu_match_transformers(tmp_path: Path) -> None:
    mm = make_multimodal_checkpoint(tmp_path, seed=3)
    engine = mm.engine(device="cuda", enable_multimodal=True, skip_tokenizer_init=False)
    assert next(engine.vision.parameters()).device.type == "cuda"
    prompt = [1, 40, 41, 7, 42]  # <|begin_of_text|> . . <|image|> .
    check_against_hf(mm, engine, prompt, [picture(SIZES["tiles"], 1)])
